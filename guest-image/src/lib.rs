//! Builds Hull's guest image: a Debian kernel (fetched with `apt-get download`, never installed on the
//! host), or with [`GuestKernel::Hull`] Hull's own build of Debian's kernel source, and an initramfs
//! whose `/init` is the static `hull-agent`. Also used by the nested-KVM harness to fetch its L1
//! kernel and pack its L1 initramfs.
//!
//! API contract (the harness codes against these signatures):
//! - [`fetch_kernel`] downloads + unpacks a kernel package into a cache dir, incrementally.
//! - [`KernelPackage::module_load_order`] resolves modules + dependencies in load order.
//! - [`cpio::Writer`] writes a newc cpio archive.
//! - [`extract_vmlinux`] turns a bzImage into its uncompressed ELF vmlinux.
//! - [`build`] produces the whole guest image (`cargo xtask guest-image`).
//!
//! One module per concern: `kbuild` (the guest kernel build), `kernel` (Debian package fetch/unpack),
//! `modules` (depmod, load order), [`cpio`], `vmlinux` (bzImage payload), `agent` (the static
//! `/init`), `image` (the incremental build), `error`.

mod agent;
mod cmd;
pub mod cpio;
mod elf;
mod error;
mod image;
mod kbuild;
mod kernel;
mod modules;
mod vmlinux;

use std::path::PathBuf;

pub use agent::{AGENT_RUSTFLAGS, AGENT_TARGET};
pub use error::{Error, Result};
pub use image::{
    build, human, BuildOptions, GuestImage, GuestKernel, GUEST_MODULES, KERNEL_CONFIG,
    LOAD_ORDER_PATH,
};
pub use kbuild::{BuiltKernel, BUILD_PACKAGES, SOURCE_TARBALL};
pub use kernel::fetch_kernel;
pub use vmlinux::extract_vmlinux;

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
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
    /// `lib/modules/<release>` inside the unpacked package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
    // `module_load_order` lives in modules.rs.
}
