//! Booting L1 through PVH: QEMU's `-kernel` takes the uncompressed ELF `vmlinux` (Debian's kernels carry
//! the Xen PVH ELF note) and jumps straight to it, so L1 skips the bzImage's decompressor — the XZ
//! payload of the generic kernel takes ~3 s to unpack under TCG, about a third of an L1 boot (measured:
//! the command starts at ~5.5 s instead of ~8.5 s).
//!
//! The payload is located with the x86 boot protocol's setup header (`payload_offset`/`payload_length`,
//! protocol 2.08+). `hull_guest_image::extract_vmlinux` is tried first (it decodes LZ4 in Rust); for XZ,
//! the generic flavour's format, the payload is piped through `xz -dc --single-stream` (xz-utils), which
//! also ignores the 4-byte uncompressed size the kernel build appends to the stream.

use std::io::Write;
use std::process::{Command, Stdio};

/// Why no ELF vmlinux could be had (L1 then boots the bzImage, slower).
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// Not a bzImage this code understands.
    #[error("not a bzImage with a boot protocol 2.08+ setup header: {0}")]
    NotBzImage(String),
    /// The payload is neither handled by hull-guest-image nor XZ.
    #[error("the kernel payload is not XZ and hull-guest-image could not extract it: {0}")]
    Unsupported(Box<hull_guest_image::Error>),
    /// Running `xz` failed.
    #[error("decompressing the kernel payload with `xz -dc` failed ({0}); install xz-utils (`apt-get install xz-utils`)")]
    Xz(String),
    /// The result is not an ELF file.
    #[error("the decompressed kernel payload is not an ELF file")]
    NotElf,
}

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";

/// The ELF vmlinux inside `bzimage`.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, PvhError> {
    let payload = payload(bzimage)?;
    let vmlinux = if payload.starts_with(XZ_MAGIC) {
        unxz(payload)?
    } else {
        hull_guest_image::extract_vmlinux(bzimage)
            .map_err(|e| PvhError::Unsupported(Box::new(e)))?
    };
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(PvhError::NotElf);
    }
    Ok(vmlinux)
}

/// The compressed payload of a bzImage.
fn payload(bz: &[u8]) -> Result<&[u8], PvhError> {
    let u32_at = |at: usize| {
        bz.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        return Err(PvhError::NotBzImage("no \"HdrS\" magic at 0x202".into()));
    }
    let version = bz
        .get(0x206..0x208)
        .map_or(0, |v| u16::from_le_bytes([v[0], v[1]]));
    if version < 0x0208 {
        return Err(PvhError::NotBzImage(format!(
            "boot protocol {version:#06x}"
        )));
    }
    let setup_sects = match bz.get(0x1f1) {
        Some(0) | None => 4,
        Some(&n) => usize::from(n),
    };
    let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Err(PvhError::NotBzImage("truncated setup header".into()));
    };
    let start = (setup_sects + 1) * 512 + offset as usize;
    bz.get(start..start + length as usize).ok_or_else(|| {
        PvhError::NotBzImage(format!(
            "payload at {start:#x}+{length:#x} runs past the end"
        ))
    })
}

/// Decompresses an XZ stream with the `xz` tool.
fn unxz(payload: &[u8]) -> Result<Vec<u8>, PvhError> {
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| PvhError::Xz(e.to_string()))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| PvhError::Xz("no stdin".into()))?;
    // With --single-stream, xz may exit before reading the trailing size bytes: a failed write is
    // judged by xz's exit status, not on its own.
    let output = std::thread::scope(|scope| {
        scope.spawn(move || stdin.write_all(payload));
        child.wait_with_output()
    });
    let output = output.map_err(|e| PvhError::Xz(e.to_string()))?;
    if !output.status.success() {
        return Err(PvhError::Xz(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake bzImage whose payload is `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut bz = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        bz[0x1f1] = setup_sects;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        bz[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bz.extend([0u8; 16]);
        bz.extend(payload);
        bz.extend(b"trailing");
        bz
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut child = Command::new("xz")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz is installed (xz-utils)");
        child.stdin.take().unwrap().write_all(data).unwrap();
        child.wait_with_output().unwrap().stdout
    }

    #[test]
    fn xz_payload_with_appended_size() {
        let elf = b"\x7fELF fake vmlinux".repeat(100);
        let mut payload = xz(&elf);
        payload.extend((elf.len() as u32).to_le_bytes());
        assert_eq!(extract_vmlinux(&bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn not_elf_is_refused() {
        let payload = xz(b"not an elf");
        assert!(matches!(
            extract_vmlinux(&bzimage(&payload)),
            Err(PvhError::NotElf)
        ));
    }

    #[test]
    fn broken_images() {
        assert!(matches!(
            extract_vmlinux(b"short"),
            Err(PvhError::NotBzImage(_))
        ));
        let mut bz = bzimage(b"x");
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(extract_vmlinux(&bz), Err(PvhError::NotBzImage(_))));
        let bad_xz = [XZ_MAGIC, b"garbage"].concat();
        assert!(matches!(
            extract_vmlinux(&bzimage(&bad_xz)),
            Err(PvhError::Xz(_))
        ));
    }
}
