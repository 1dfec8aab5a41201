//! The disk behind a virtio-blk device: a raw image file or a host block device, opened
//! read-only or read-write, with synchronous I/O straight between it and guest memory.
//!
//! The size comes from `lseek(SEEK_END)`, which for a block device is its size in bytes (the
//! value `BLKGETSIZE64` returns) and for a regular file its length, so no ioctl is needed. It must
//! be a whole number of 512-byte sectors: the guest could not address a partial one, and a file
//! that is not is more likely a mistake (a truncated download, the wrong file) than a disk.
//!
//! I/O goes through the page cache (no `O_DIRECT`); `VIRTIO_BLK_T_FLUSH` is `fdatasync(2)`, so
//! what the guest flushed is on stable storage. Data moves without a bounce buffer: the file is
//! positioned once per request (only the event-loop thread touches it) and each guest buffer is
//! read into or written from as a vm-memory `VolatileSlice` (`read(2)`/`write(2)` on the mapped
//! guest RAM), looping over short transfers.

use std::fs::{File, OpenOptions};
use std::io::{Error, ErrorKind, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, WriteVolatile};

use super::request::{Segment, SECTOR_SIZE};

/// The disk could not be opened or is not usable.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening failed.
    #[error("cannot open drive {path} {mode}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// "read-only" or "read-write".
        mode: &'static str,
        /// Why.
        source: Error,
    },
    /// Neither a regular file nor a block device.
    #[error("drive {0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    /// Finding the size failed.
    #[error("cannot find the size of drive {path}: {source}")]
    Size {
        /// The path.
        path: PathBuf,
        /// Why.
        source: Error,
    },
    /// The size is not a whole number of sectors.
    #[error(
        "drive {path} is {size} bytes, not a multiple of {SECTOR_SIZE}: a raw disk image is a \
         whole number of 512-byte sectors"
    )]
    NotSectorAligned {
        /// The path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

/// An open disk image or block device.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    size: u64,
}

fn mem_err(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("guest memory: {e}"))
}

impl DiskFile {
    /// Opens `path` read-only or read-write and checks its size.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                mode: if read_only { "read-only" } else { "read-write" },
                source,
            })?;
        let size_err = |source| DiskError::Size {
            path: path.to_path_buf(),
            source,
        };
        let kind = file.metadata().map_err(size_err)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::NotADisk(path.to_path_buf()));
        }
        let mut file = file;
        let size = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        if size % SECTOR_SIZE != 0 {
            return Err(DiskError::NotSectorAligned {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Reads the disk from byte `offset` into the guest buffers `segs`, in order.
    pub fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segs: &[Segment],
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        for s in segs {
            for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
                let mut slice = slice.map_err(mem_err)?;
                self.file.read_exact_volatile(&mut slice).map_err(|e| {
                    match e {
                        // Only if the file shrank under us: the range was checked.
                        vm_memory::VolatileMemoryError::IOError(e) => e,
                        e => mem_err(e),
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Writes the guest buffers `segs`, in order, to the disk from byte `offset`.
    pub fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segs: &[Segment],
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        for s in segs {
            for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
                let slice = slice.map_err(mem_err)?;
                self.file.write_all_volatile(&slice).map_err(|e| match e {
                    vm_memory::VolatileMemoryError::IOError(e) => e,
                    e => mem_err(e),
                })?;
            }
        }
        Ok(())
    }

    /// Makes completed writes durable (`fdatasync`).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn io_crosses_guest_buffers_and_checks_the_size() {
        let dir = TempDir::new().unwrap();
        let p = dir.as_path().join("disk.img");
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let mut disk = DiskFile::open(&p, false).unwrap();
        assert_eq!(disk.sectors(), 8);
        assert_eq!(disk.path(), p.as_path());

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 100,
            },
            Segment {
                addr: GuestAddress(0x3000),
                len: 412,
            },
        ];
        disk.read_into(&mem, 512, &segs).unwrap();
        let mut got = vec![0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got, bytes[512..612]);
        let mut got = vec![0u8; 412];
        mem.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert_eq!(got, bytes[612..1024]);

        // Write them back two sectors further on.
        disk.write_from(&mem, 1536, &segs).unwrap();
        disk.flush().unwrap();
        let file = std::fs::read(&p).unwrap();
        assert_eq!(file[1536..2048], bytes[512..1024]);

        let outside = [Segment {
            addr: GuestAddress(0x2_0000),
            len: 512,
        }];
        assert!(disk.read_into(&mem, 0, &outside).is_err());
        assert!(disk.write_from(&mem, 0, &outside).is_err());

        // Shrunk under the device: a short read is an error, not stale bytes.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(1024)
            .unwrap();
        assert_eq!(
            disk.read_into(&mem, 512, &segs[1..]).map_err(|e| e.kind()),
            Ok(())
        );
        assert_eq!(
            disk.read_into(&mem, 1024, &segs[1..]).map_err(|e| e.kind()),
            Err(ErrorKind::UnexpectedEof)
        );
    }

    #[test]
    fn bad_disks_are_refused() {
        let dir = TempDir::new().unwrap();
        let odd = dir.as_path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = DiskFile::open(&odd, true).unwrap_err();
        assert!(matches!(e, DiskError::NotSectorAligned { size: 1000, .. }));
        assert!(
            e.to_string()
                .contains("is 1000 bytes, not a multiple of 512"),
            "{e}"
        );

        let e = DiskFile::open(dir.as_path(), true).unwrap_err();
        assert!(matches!(e, DiskError::NotADisk(_)), "{e}");

        let e = DiskFile::open(&dir.as_path().join("missing"), false).unwrap_err();
        assert!(e.to_string().starts_with("cannot open drive "), "{e}");
        assert!(e.to_string().contains("read-write"), "{e}");

        // Read-only opens need no write permission, and the empty disk is allowed.
        let empty = dir.as_path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(DiskFile::open(&empty, true).unwrap().sectors(), 0);
    }
}
