//! Kernel and initrd loading: detects a bzImage or an ELF vmlinux and loads it with linux-loader.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestMemoryBackend};
use vm_memory::{GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::BootError;
use crate::arch::layout::HIMEM_START;

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// What kind of kernel image a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage (Linux boot protocol, setup header at 0x1f1).
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

impl KernelFormat {
    /// Identifies a kernel from its first 0x206 bytes (or fewer for a short file).
    pub fn detect(head: &[u8]) -> Option<Self> {
        if head.starts_with(b"\x7fELF") {
            Some(Self::Elf)
        } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
            Some(Self::BzImage)
        } else {
            None
        }
    }
}

/// The loaded kernel.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Image format.
    pub format: KernelFormat,
    /// 64-bit entry point (Linux boot protocol).
    pub entry: u64,
    /// PVH entry point, when the ELF carries the note.
    pub pvh_entry: Option<u64>,
    /// First byte past the loaded image.
    pub end: u64,
    /// The bzImage's setup header, to copy into `boot_params`.
    pub setup_header: Option<setup_header>,
}

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    move |err| BootError::Read {
        what,
        path: path.to_path_buf(),
        err,
    }
}

/// Opens the kernel at `path` and tells its format, without loading it: lets a bad path or a
/// non-kernel file be reported before any VM resource is created.
pub fn probe_kernel(path: &Path) -> Result<KernelFormat, BootError> {
    let file = File::open(path).map_err(read_err("kernel", path))?;
    let mut head = Vec::with_capacity(0x206);
    file.take(0x206)
        .read_to_end(&mut head)
        .map_err(read_err("kernel", path))?;
    KernelFormat::detect(&head).ok_or_else(|| BootError::NotAKernel(path.into()))
}

/// Checks that the initrd at `path` can be opened.
pub fn probe_initrd(path: &Path) -> Result<(), BootError> {
    File::open(path).map(drop).map_err(read_err("initrd", path))
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(read_err("kernel", path))?;
    let mut head = Vec::with_capacity(0x206);
    (&mut file)
        .take(0x206)
        .read_to_end(&mut head)
        .map_err(read_err("kernel", path))?;
    let format = KernelFormat::detect(&head).ok_or_else(|| BootError::NotAKernel(path.into()))?;
    let load_err = |err| BootError::Load {
        path: path.to_path_buf(),
        err,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let file_len = file.metadata().map_err(read_err("kernel", path))?.len();
    let (dest, len) = match format {
        KernelFormat::Elf => elf_load_range(&mut file).unwrap_or((HIMEM_START, 0)),
        KernelFormat::BzImage => (HIMEM_START, file_len),
    };
    crate::memory::populate(mem, GuestAddress(dest), len);
    match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                pvh_entry: None,
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let pvh_entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            };
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                pvh_entry,
                end: r.kernel_end,
                setup_header: None,
            })
        }
    }
}

/// The guest-physical range an ELF's PT_LOAD segments fill from the file: (lowest p_paddr, span
/// up to the highest p_paddr + p_filesz). `None` if the headers cannot be read (the loader then
/// reports the real error).
fn elf_load_range(file: &mut File) -> Option<(u64, u64)> {
    use std::io::{Seek, SeekFrom};
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut ehdr).ok()?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
    };
    let phoff = u64_at(&ehdr, 0x20)?;
    let phentsize = usize::from(u16_at(&ehdr, 0x36));
    let phnum = usize::from(u16_at(&ehdr, 0x38));
    if phentsize < 56 || phnum > 64 {
        return None;
    }
    let mut phdrs = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).ok()?;
    file.read_exact(&mut phdrs).ok()?;
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for ph in phdrs.chunks(phentsize) {
        const PT_LOAD: u32 = 1;
        if u32::from_le_bytes(ph[0..4].try_into().ok()?) != PT_LOAD {
            continue;
        }
        let paddr = u64_at(ph, 0x18)?;
        let filesz = u64_at(ph, 0x20)?;
        lo = lo.min(paddr);
        hi = hi.max(paddr.checked_add(filesz)?);
    }
    (lo < hi).then(|| (lo, hi - lo))
}

/// Loads the initrd at the top of RAM below `max_end` (page-aligned), above `kernel_end`.
/// Returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(read_err("initrd", path))?;
    let size = file.metadata().map_err(read_err("initrd", path))?.len();
    let too_small = BootError::TooSmall {
        what: "the initrd",
        need: size,
        at: kernel_end,
        end: max_end,
    };
    let addr = max_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(too_small)?;
    let region_ok = mem
        .checked_offset(GuestAddress(addr), size as usize)
        .is_some();
    if !region_ok {
        return Err(BootError::Write("initrd"));
    }
    crate::memory::populate(mem, GuestAddress(addr), size);
    read_into(mem, GuestAddress(addr), &mut file, size as usize)
        .map_err(read_err("initrd", path))?;
    Ok((addr, size))
}

fn read_into<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    src: &mut F,
    len: usize,
) -> std::io::Result<()> {
    mem.read_exact_volatile_from(addr, src, len)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        assert_eq!(
            KernelFormat::detect(b"\x7fELF\x02\x01"),
            Some(KernelFormat::Elf)
        );
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(KernelFormat::detect(&bz), Some(KernelFormat::BzImage));
        assert_eq!(KernelFormat::detect(b"#!/bin/sh\n"), None);
        assert_eq!(KernelFormat::detect(&[0u8; 0x300]), None);
    }

    fn tmpfile(name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("hull-boot-{name}-{}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn non_kernel_is_rejected() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let p = tmpfile("notkernel", b"hello, I am a text file\n");
        let err = load_kernel(&mem, &p).unwrap_err();
        assert!(err.to_string().contains("is not a Linux kernel"), "{err}");
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot read kernel /nonexistent/vmlinuz"),
            "{err}"
        );
    }

    #[test]
    fn initrd_goes_to_the_top_page_aligned() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let p = tmpfile("initrd", &data);
        let (addr, size) = load_initrd(&mem, &p, 0x200_0000, 64 << 20).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        let mut back = vec![0u8; 10_000];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
        // Does not fit above the kernel.
        let err = load_initrd(&mem, &p, (64 << 20) - 4096, 64 << 20).unwrap_err();
        assert!(matches!(err, BootError::TooSmall { .. }), "{err}");
    }
}
