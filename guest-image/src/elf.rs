//! The little ELF reading the build needs: the magic, whether a binary asks for a dynamic loader
//! (a `PT_INTERP` program header), which `/init` in an initramfs without libraries must not, and
//! trimming the zero tails of a kernel's loadable segments.

/// ELF magic.
const MAGIC: &[u8; 4] = b"\x7fELF";
const PT_INTERP: u32 = 3;

/// Whether `bytes` starts with the ELF magic.
pub(crate) fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Why a binary cannot run without a dynamic loader, or `None` if it is a static 64-bit
/// little-endian ELF executable.
pub(crate) fn not_static_reason(b: &[u8]) -> Option<String> {
    if !is_elf(b) {
        return Some("not an ELF file".into());
    }
    if b.len() < 64 || b[4] != 2 || b[5] != 1 {
        return Some("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap_or([0xff; 8]));
    let phentsize = u16_at(0x36);
    let phnum = u16_at(0x38);
    let Ok(phoff) = usize::try_from(phoff) else {
        return Some("program header offset out of range".into());
    };
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(ph) = b.get(at..at + 4) else {
            return Some("program headers run past the end of the file".into());
        };
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP {
            return Some("it has a PT_INTERP program header: it needs a dynamic loader".into());
        }
    }
    None
}

const PT_LOAD: u32 = 1;

/// Shrinks each `PT_LOAD` segment's `p_filesz` by the zero bytes at its end, leaving `p_memsz`:
/// a loader zero-fills (or, in a fresh VM, finds zero) what lies between the two, so the bytes
/// need not be copied at every boot. Returns how many bytes no longer need copying. A malformed
/// header leaves the image as it is.
pub(crate) fn trim_zero_tails(elf: &mut [u8]) -> u64 {
    let u16_at = |b: &[u8], o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit little-endian only (what x86_64 kernels are).
    if !is_elf(elf) || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return 0;
    }
    let (Some(phoff), Some(entsize), Some(count)) =
        (u64_at(elf, 0x20), u16_at(elf, 0x36), u16_at(elf, 0x38))
    else {
        return 0;
    };
    let (entsize, mut trimmed) = (usize::from(entsize), 0);
    if entsize < 56 {
        return 0;
    }
    for i in 0..usize::from(count) {
        let Some(ph) = usize::try_from(phoff).ok().map(|p| p + i * entsize) else {
            return trimmed;
        };
        let Some(kind) = elf
            .get(ph..ph + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        else {
            return trimmed;
        };
        let (Some(offset), Some(filesz)) = (u64_at(elf, ph + 0x08), u64_at(elf, ph + 0x20)) else {
            return trimmed;
        };
        if kind != PT_LOAD {
            continue;
        }
        let (Ok(start), Ok(len)) = (usize::try_from(offset), usize::try_from(filesz)) else {
            continue;
        };
        let Some(data) = start.checked_add(len).and_then(|end| elf.get(start..end)) else {
            continue;
        };
        let kept = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1) as u64;
        elf[ph + 0x20..ph + 0x28].copy_from_slice(&kept.to_le_bytes());
        trimmed += filesz - kept;
    }
    trimmed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 * types.len()];
        b[..4].copy_from_slice(MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            b[64 + 56 * i..68 + 56 * i].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// A 64-bit ELF with one PT_LOAD of `data` at offset 0x100 and a PT_NOTE.
    fn elf_with_load(data: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 0x100];
        e[..4].copy_from_slice(MAGIC);
        e[4] = 2;
        e[5] = 1;
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        let ph = |e: &mut Vec<u8>, at: usize, kind: u32, off: u64, filesz: u64, memsz: u64| {
            e[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            e[at + 0x08..at + 0x10].copy_from_slice(&off.to_le_bytes());
            e[at + 0x20..at + 0x28].copy_from_slice(&filesz.to_le_bytes());
            e[at + 0x28..at + 0x30].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(
            &mut e,
            0x40,
            PT_LOAD,
            0x100,
            data.len() as u64,
            data.len() as u64 + 16,
        );
        ph(&mut e, 0x78, 4, 0x100, 4, 4);
        e.extend_from_slice(data);
        e
    }

    fn ph_u64(e: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(e[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn zero_tails_are_trimmed_and_memsz_kept() {
        let mut data = vec![7u8; 100];
        data.extend_from_slice(&[0u8; 4000]);
        let mut e = elf_with_load(&data);
        assert_eq!(trim_zero_tails(&mut e), 4000);
        assert_eq!(ph_u64(&e, 0x40 + 0x20), 100, "filesz");
        assert_eq!(ph_u64(&e, 0x40 + 0x28), 4116, "memsz unchanged");
        assert_eq!(ph_u64(&e, 0x78 + 0x20), 4, "PT_NOTE untouched");
        assert_eq!(trim_zero_tails(&mut e), 0, "idempotent");
        // All zeros: nothing left to copy.
        let mut z = elf_with_load(&[0u8; 64]);
        assert_eq!(trim_zero_tails(&mut z), 64);
        // Not an ELF, or truncated headers: left alone.
        assert_eq!(trim_zero_tails(&mut b"not an elf".to_vec()), 0);
        let mut short = elf_with_load(&[1u8; 8]);
        short.truncate(0x50);
        assert_eq!(trim_zero_tails(&mut short), 0);
    }

    #[test]
    fn static_and_dynamic() {
        assert_eq!(not_static_reason(&elf_with(&[6, 1, 1, 2])), None);
        assert!(not_static_reason(&elf_with(&[6, 3, 1]))
            .unwrap()
            .contains("PT_INTERP"));
        assert!(not_static_reason(b"#!/bin/sh\n").is_some());
    }

    #[test]
    fn this_test_binary_is_judged() {
        // Whatever this test binary is, the check must not panic on a real ELF file.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let _ = not_static_reason(&me);
    }
}
