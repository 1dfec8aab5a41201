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
    Ok((mem, file))
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
