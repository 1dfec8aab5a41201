//! Builds Hull's guest image: a Debian kernel (fetched with `apt-get download`, never installed on the
//! host) and an initramfs whose `/init` is the static `hull-agent`. Also used by the nested-KVM harness
//! to fetch its L1 kernel and pack its L1 initramfs.
//!
//! API contract (implemented by the guest-image work; the harness codes against these signatures):
//! - [`fetch_kernel`] downloads + unpacks a kernel package into a cache dir, incrementally.
//! - [`KernelPackage::module_load_order`] resolves modules + dependencies in load order.
//! - [`cpio::Writer`] writes a newc cpio archive.
//! - [`extract_vmlinux`] turns a bzImage into its uncompressed ELF vmlinux.

pub mod cpio {
    //! newc cpio writer (placeholder; see crate docs). Signatures are the contract.
    use std::io::{self, Write};

    /// Writes a newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it.
    pub struct Writer<W: Write> {
        out: W,
    }

    impl<W: Write> Writer<W> {
        /// Starts an archive on `out`.
        pub fn new(out: W) -> Self {
            Self { out }
        }
        /// Adds a directory (`mode` = permission bits, e.g. 0o755).
        pub fn dir(&mut self, _path: &str, _mode: u32) -> io::Result<()> {
            todo!()
        }
        /// Adds a regular file with these contents.
        pub fn file(&mut self, _path: &str, _mode: u32, _data: &[u8]) -> io::Result<()> {
            todo!()
        }
        /// Adds a symbolic link.
        pub fn symlink(&mut self, _path: &str, _target: &str) -> io::Result<()> {
            todo!()
        }
        /// Adds a character device node.
        pub fn char_dev(&mut self, _path: &str, _mode: u32, _major: u32, _minor: u32) -> io::Result<()> {
            todo!()
        }
        /// Writes the trailer and returns the output.
        pub fn finish(self) -> io::Result<W> {
            Ok(self.out)
        }
    }
}

use std::path::{Path, PathBuf};

/// Which Debian kernel flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// `linux-image-*-cloud-amd64`: the L2 guest kernel.
    Cloud,
    /// `linux-image-*-amd64`: the harness's L1 kernel (has 9p).
    Generic,
}

/// An unpacked Debian kernel package.
#[derive(Debug, Clone)]
pub struct KernelPackage {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// Where the .deb was unpacked (`dpkg-deb -x`).
    pub root: PathBuf,
}

impl KernelPackage {
    /// The bzImage.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.release))
    }
    /// `lib/modules/<release>` inside the unpacked package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
    /// The named modules (e.g. `"virtio_mmio"`, `"kvm-amd"`) and everything they depend on, as paths
    /// of `.ko` files, dependencies first, each once.
    pub fn module_load_order(&self, _names: &[&str]) -> Result<Vec<PathBuf>, Error> {
        todo!()
    }
}

/// Downloads (if not cached) and unpacks the newest kernel of `flavour` under `cache_dir`.
pub fn fetch_kernel(_cache_dir: &Path, _flavour: Flavour) -> Result<KernelPackage, Error> {
    todo!()
}

/// Decompresses the kernel payload of a bzImage into the ELF vmlinux it carries.
pub fn extract_vmlinux(_bzimage: &[u8]) -> Result<Vec<u8>, Error> {
    todo!()
}

/// Errors of the guest-image build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Placeholder.
    #[error("{0}")]
    Other(String),
}
