//! The little ELF reading the build needs: the magic, and whether a binary asks for a dynamic loader
//! (a `PT_INTERP` program header), which `/init` in an initramfs without libraries must not.

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
