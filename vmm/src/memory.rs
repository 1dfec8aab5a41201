//! Guest RAM: one memfd holds all of it (so a vhost-user backend such as virtiofsd can map the same
//! pages later), mapped as one or two regions around the 32-bit MMIO gap.
//!
//! Pages are allocated by the host kernel on first touch: a 512 MiB guest that uses 60 MiB costs
//! 60 MiB.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};

/// Failed to create guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("memfd_create for guest RAM failed: {0}")]
    Memfd(std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest RAM memfd to {0} bytes: {1}")]
    Truncate(u64, std::io::Error),
    /// Mapping failed.
    #[error("cannot map {0} MiB of guest RAM: {1}")]
    Map(u64, vm_memory::mmap::FromRangesError),
}

/// The guest-physical RAM ranges for `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(FIRST_ADDR_PAST_32BITS), size - MMIO_GAP_START),
        ]
    }
}

/// Creates `size` bytes of memfd-backed guest RAM. Returns the memory and the memfd.
pub fn create_guest_memory(size: u64) -> Result<(GuestMemoryMmap, File), MemoryError> {
    let name = CString::new("hull-guest-ram").expect("no NUL in a literal");
    // SAFETY: memfd_create takes a valid NUL-terminated string and flags; it returns a new fd or
    // -1, checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;

    let mut offset = 0u64;
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| {
            let fo = FileOffset::new(file.try_clone().expect("dup of memfd"), offset);
            offset += len;
            (addr, len as usize, Some(fo))
        })
        .collect();
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| MemoryError::Map(size >> 20, e))?;
    advise_huge_pages(&mem);
    Ok((mem, file))
}

/// Asks for transparent huge pages on guest RAM. Backed by 2 MiB pages, the guest takes 512 times
/// fewer nested-paging faults as it touches memory, which is most of a kernel's boot. For a memfd
/// this takes effect when the host allows shmem THP
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = `advise`, `within_size` or `always`);
/// otherwise it is a no-op.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    if let Ok(mode) = std::fs::read_to_string(SHMEM_THP) {
        if mode.contains("[never]") || mode.contains("[deny]") {
            tracing::info!(
                "guest RAM is on 4 KiB pages: 'echo advise > {SHMEM_THP}' lets it use huge pages and boot faster"
            );
        }
    }
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        // SAFETY: the range is exactly one live mapping owned by `mem`; MADV_HUGEPAGE only changes
        // how the kernel backs it, never its contents.
        let r = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_HUGEPAGE refused");
        }
    }
}

/// Allocates and maps the pages of `addr..addr+len` in one call (`MADV_POPULATE_WRITE`) before a
/// bulk copy, instead of taking one page fault per 4 KiB inside the copy: much cheaper, above all
/// under nested virtualization. Best effort: a kernel without it (< 5.14) just faults as usual.
pub fn populate(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
    use vm_memory::GuestMemoryBackend;
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let Some(slice) = mem
        .get_slice(addr, len as usize)
        .ok()
        .filter(|s| s.len() == len as usize)
    else {
        return;
    };
    let page = 4096usize;
    let start = slice.ptr_guard_mut().as_ptr() as usize;
    let aligned = start & !(page - 1);
    let end = start + len as usize;
    // SAFETY: the range lies inside a live mapping owned by `mem`; MADV_POPULATE_WRITE only
    // allocates and maps pages there (it does not change their contents).
    let r = unsafe {
        libc::madvise(
            aligned as *mut libc::c_void,
            end - aligned,
            MADV_POPULATE_WRITE,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE unavailable");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ranges_split_around_the_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1], (GuestAddress(1 << 32), (4 << 30) - MMIO_GAP_START));
    }

    #[test]
    fn populate_keeps_contents_and_tolerates_bad_ranges() {
        let (mem, _f) = create_guest_memory(64 << 20).unwrap();
        mem.write_obj(7u8, GuestAddress(0x20_0000)).unwrap();
        populate(&mem, GuestAddress(0x10_0000), 8 << 20);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 7);
        populate(&mem, GuestAddress(60 << 20), 8 << 20); // runs past the end: ignored
    }

    #[test]
    fn memfd_backed_memory_reads_back() {
        let (mem, file) = create_guest_memory(64 << 20).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 64 << 20);
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1234)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
