//! Extracting the ELF `vmlinux` from a bzImage: the x86 boot protocol's setup header locates the
//! compressed payload; the payload (LZ4 legacy format in Debian's cloud kernel) is decoded in Rust.

use crate::elf;
use crate::error::{Error, Result};

/// Magic of the LZ4 legacy frame format (`lz4 -l`), little-endian 0x184C2102.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Each LZ4 legacy block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Decompresses the kernel payload of a bzImage into the ELF vmlinux it carries.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let payload = payload(bzimage)?;
    let vmlinux = match detect(payload) {
        Format::Lz4Legacy => unlz4_legacy(payload)?,
        Format::Elf => payload.to_vec(),
        Format::Other(format) => return Err(Error::UnsupportedCompression { format }),
    };
    if !elf::is_elf(&vmlinux) {
        return Err(Error::NotElf {
            head: vmlinux.iter().take(8).copied().collect(),
        });
    }
    Ok(vmlinux)
}

/// The compressed payload inside a bzImage.
fn payload(bz: &[u8]) -> Result<&[u8]> {
    if bz.len() < 0x250 {
        return Err(Error::NotBzImage(format!("only {} bytes", bz.len())));
    }
    if &bz[0x202..0x206] != b"HdrS" {
        return Err(Error::NotBzImage(
            "no \"HdrS\" setup header at 0x202".into(),
        ));
    }
    let version = u16::from_le_bytes([bz[0x206], bz[0x207]]);
    if version < 0x0208 {
        return Err(Error::NotBzImage(format!(
            "boot protocol {}.{:02} has no payload fields",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let payload_offset = le32(bz, 0x248) as usize;
    let payload_length = le32(bz, 0x24c) as usize;
    let start = (setup_sects + 1) * 512 + payload_offset;
    let end = start
        .checked_add(payload_length)
        .filter(|&e| e <= bz.len())
        .ok_or_else(|| {
            Error::NotBzImage(format!(
            "payload {start:#x}+{payload_length:#x} runs past the end of the file ({:#x} bytes)",
            bz.len()
        ))
        })?;
    Ok(&bz[start..end])
}

#[derive(Debug, PartialEq, Eq)]
enum Format {
    Lz4Legacy,
    Elf,
    Other(&'static str),
}

/// The payload format, by its magic (the same table as the kernel's `decompress_method`).
fn detect(p: &[u8]) -> Format {
    const MAGICS: &[(&[u8], &str)] = &[
        (&[0x1f, 0x8b], "gzip"),
        (&[0x1f, 0x9e], "gzip"),
        (b"BZh", "bzip2"),
        (&[0x5d, 0x00, 0x00], "lzma"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
        (&[0x89, b'L', b'Z', b'O'], "lzo"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    ];
    if p.starts_with(&LZ4_LEGACY_MAGIC) {
        Format::Lz4Legacy
    } else if elf::is_elf(p) {
        Format::Elf
    } else {
        Format::Other(
            MAGICS
                .iter()
                .find(|(magic, _)| p.starts_with(magic))
                .map_or("an unknown format", |(_, name)| name),
        )
    }
}

/// Decodes an LZ4 legacy stream: magic, then blocks of (u32 LE compressed size, block). The kernel's
/// build appends the u32 uncompressed size after the last block; that is where decoding stops.
fn unlz4_legacy(p: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(p.len() * 3);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = LZ4_LEGACY_MAGIC.len();
    loop {
        let rest = p.len() - pos;
        if rest == 0 {
            break;
        }
        if rest == 4 {
            // The appended uncompressed size (mod 2^32): a free integrity check.
            let size = le32(p, pos);
            if size as usize != out.len() & 0xffff_ffff {
                return Err(Error::Lz4 {
                    offset: pos,
                    reason: format!("trailer says {size} bytes, decoded {}", out.len()),
                });
            }
            break;
        }
        if rest < 4 {
            return Err(Error::Lz4 {
                offset: pos,
                reason: format!("{rest} stray bytes at the end"),
            });
        }
        let chunk = p[pos..pos + 4].try_into().unwrap_or([0; 4]);
        pos += 4;
        if chunk == LZ4_LEGACY_MAGIC {
            // Concatenated legacy streams: another magic, go on.
            continue;
        }
        let size = u32::from_le_bytes(chunk) as usize;
        let data = p.get(pos..pos + size).ok_or_else(|| Error::Lz4 {
            offset: pos - 4,
            reason: format!(
                "block of {size} bytes runs past the end ({} left)",
                p.len() - pos
            ),
        })?;
        let n = lz4_flex::block::decompress_into(data, &mut block).map_err(|e| Error::Lz4 {
            offset: pos,
            reason: e.to_string(),
        })?;
        out.extend_from_slice(&block[..n]);
        pos += size;
    }
    Ok(out)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake ELF "vmlinux": magic plus compressible and incompressible parts.
    fn fake_elf(len: usize) -> Vec<u8> {
        let mut v = b"\x7fELF\x02\x01\x01\0".to_vec();
        let mut x: u32 = 1;
        while v.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if v.len() % 3000 < 1500 {
                v.push(0);
            } else {
                v.push((x >> 16) as u8);
            }
        }
        v
    }

    /// LZ4 legacy stream as `lz4 -l` + the kernel's `size_append` write it.
    fn lz4_legacy(data: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// A minimal bzImage around `payload`.
    fn bzimage(payload: &[u8], setup_sects: u8) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        };
        let mut bz = vec![0u8; (sects + 1) * 512];
        bz[0x1f1] = setup_sects;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let payload_offset = 0x100u32;
        bz[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bz.extend(std::iter::repeat_n(0xaa, payload_offset as usize));
        bz.extend_from_slice(payload);
        bz.extend_from_slice(&[0xcc; 64]);
        bz
    }

    #[test]
    fn lz4_payload_round_trips_across_blocks() {
        let elf = fake_elf(LZ4_LEGACY_BLOCK + 123_457);
        for sects in [0, 27] {
            let bz = bzimage(&lz4_legacy(&elf), sects);
            assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
        }
    }

    #[test]
    fn wrong_trailer_is_caught() {
        let elf = fake_elf(10_000);
        let mut p = lz4_legacy(&elf);
        let n = p.len();
        p[n - 4] ^= 1;
        assert!(matches!(
            extract_vmlinux(&bzimage(&p, 4)),
            Err(Error::Lz4 { .. })
        ));
    }

    #[test]
    fn other_formats_are_named() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0x00, 1, 2, 3];
        match extract_vmlinux(&bzimage(&xz, 4)) {
            Err(Error::UnsupportedCompression { format }) => assert_eq!(format, "xz"),
            other => panic!("{other:?}"),
        }
        match extract_vmlinux(&bzimage(&[0x1f, 0x8b, 8, 0], 4)) {
            Err(Error::UnsupportedCompression { format }) => assert_eq!(format, "gzip"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_elf_result_is_an_error() {
        let bz = bzimage(&lz4_legacy(b"not an elf at all, no"), 4);
        assert!(matches!(extract_vmlinux(&bz), Err(Error::NotElf { .. })));
    }

    #[test]
    fn not_a_bzimage() {
        assert!(matches!(
            extract_vmlinux(&[0; 100]),
            Err(Error::NotBzImage(_))
        ));
        assert!(matches!(
            extract_vmlinux(&[0; 4096]),
            Err(Error::NotBzImage(_))
        ));
    }
}
