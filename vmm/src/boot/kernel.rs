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

/// Loads the kernel and the initrd (if any) into RAM that ends at `low_end` (below the MMIO gap).
///
/// They are the two big copies of a VM's start (tens of MiB) and run side by side: the initrd goes
/// to the top of low memory as if nothing bounded it lower, and the two are checked against each
/// other afterwards. An initrd that ends up below the kernel's end did not fit (and overlapped
/// it): [`BootError::TooSmall`]. One that a bzImage wants lower (`initrd_addr_max`) is copied
/// again there.
pub fn load_kernel_and_initrd(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    low_end: u64,
) -> Result<(LoadedKernel, Option<(u64, u64)>), BootError> {
    let (loaded, early) = std::thread::scope(|s| {
        let job = initrd.map(|p| s.spawn(move || load_initrd(mem, p, 0, low_end)));
        let loaded = load_kernel(mem, kernel);
        let early = job.map(|j| j.join().unwrap_or(Err(BootError::Write("initrd"))));
        (loaded, early)
    });
    let loaded = loaded?;
    if loaded.end >= low_end {
        return Err(BootError::TooSmall {
            what: "the kernel",
            need: loaded.end,
            at: 0,
            end: low_end,
        });
    }
    let initrd_max = match &loaded.setup_header {
        Some(h) if h.initrd_addr_max != 0 => low_end.min(u64::from(h.initrd_addr_max) + 1),
        _ => low_end,
    };
    let placed = match (early, initrd) {
        (Some(Ok((addr, size))), Some(path)) => {
            if addr < loaded.end {
                return Err(BootError::TooSmall {
                    what: "the initrd",
                    need: size,
                    at: loaded.end,
                    end: initrd_max,
                });
            }
            if addr + size <= initrd_max {
                Some((addr, size))
            } else {
                Some(load_initrd(mem, path, loaded.end, initrd_max)?)
            }
        }
        (Some(Err(e)), _) => return Err(e),
        _ => None,
    };
    Ok((loaded, placed))
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
    // Its last byte must be RAM (an initrd that ends exactly at the top of RAM fits).
    let region_ok = mem
        .checked_offset(GuestAddress(addr), size.saturating_sub(1) as usize)
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

    /// A minimal x86-64 ELF kernel: one PT_LOAD of `body` at physical 16 MiB, entry there.
    fn tiny_elf(body: &[u8]) -> Vec<u8> {
        const LOAD: u64 = 0x100_0000;
        const DATA_AT: u64 = 0x1000;
        let mut f = vec![0u8; DATA_AT as usize];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1; // version
        f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        f[0x18..0x20].copy_from_slice(&LOAD.to_le_bytes()); // entry
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[0x08..0x10].copy_from_slice(&DATA_AT.to_le_bytes()); // offset
        ph[0x10..0x18].copy_from_slice(&LOAD.to_le_bytes()); // vaddr
        ph[0x18..0x20].copy_from_slice(&LOAD.to_le_bytes()); // paddr
        let len = body.len() as u64;
        ph[0x20..0x28].copy_from_slice(&len.to_le_bytes()); // filesz
        ph[0x28..0x30].copy_from_slice(&len.to_le_bytes()); // memsz
        ph[0x30..0x38].copy_from_slice(&0x1000u64.to_le_bytes()); // align
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn kernel_and_initrd_load_side_by_side_intact() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let body: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let k = tmpfile("tiny-elf", &tiny_elf(&body));
        let rd: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 241) as u8).collect();
        let i = tmpfile("tiny-initrd", &rd);
        let (kernel, initrd) = load_kernel_and_initrd(&mem, &k, Some(&i), 64 << 20).unwrap();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.end, 0x100_0000 + (3 << 20));
        let (addr, size) = initrd.unwrap();
        assert_eq!((addr, size), ((64 << 20) - (5 << 20), 5 << 20));
        let mut back = vec![0u8; body.len()];
        mem.read_slice(&mut back, GuestAddress(0x100_0000)).unwrap();
        assert!(back == body, "the kernel's bytes");
        let mut back = vec![0u8; rd.len()];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert!(back == rd, "the initrd's bytes");
        // Without an initrd.
        let (_, none) = load_kernel_and_initrd(&mem, &k, None, 64 << 20).unwrap();
        assert_eq!(none, None);
        let _ = std::fs::remove_file(k);
        let _ = std::fs::remove_file(i);
    }

    #[test]
    fn an_initrd_that_does_not_fit_above_the_kernel_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let k = tmpfile("tiny-elf-2", &tiny_elf(&vec![0x90u8; 8 << 20]));
        let i = tmpfile("big-initrd", &vec![1u8; 12 << 20]);
        let err = load_kernel_and_initrd(&mem, &k, Some(&i), 32 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::TooSmall {
                    what: "the initrd",
                    ..
                }
            ),
            "{err}"
        );
        let missing =
            load_kernel_and_initrd(&mem, &k, Some(Path::new("/nonexistent/rd")), 32 << 20)
                .unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/rd"), "{missing}");
        let _ = std::fs::remove_file(k);
        let _ = std::fs::remove_file(i);
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
