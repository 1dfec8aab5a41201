//! Loading the guest kernel, initrd and command line into guest memory, and writing the boot
//! parameters the entry protocol needs (Linux `boot_params` or PVH `hvm_start_info`).
pub mod kernel;
pub mod params;

pub use kernel::{
    load_initrd, load_kernel, load_kernel_and_initrd, probe_initrd, probe_kernel, KernelFormat,
    LoadedKernel,
};
pub use params::{e820_map, write_linux_boot_params, write_pvh_start_info, E820Entry};

/// Failed to load the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file could not be opened or read.
    #[error("cannot read {what} {path}: {err}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        err: std::io::Error,
    },
    /// The kernel file is neither a bzImage nor an ELF vmlinux.
    #[error("{0} is not a Linux kernel: expected a bzImage or an ELF vmlinux")]
    NotAKernel(std::path::PathBuf),
    /// linux-loader rejected the image.
    #[error("cannot load kernel {path}: {err}")]
    Load {
        /// The file.
        path: std::path::PathBuf,
        /// The loader's error.
        err: linux_loader::loader::Error,
    },
    /// The images do not fit in guest RAM.
    #[error("guest memory too small: {what} needs {need} bytes at {at:#x} but RAM below the MMIO gap ends at {end:#x}; give the VM more memory")]
    TooSmall {
        /// What did not fit.
        what: &'static str,
        /// Its size.
        need: u64,
        /// Where it would have gone.
        at: u64,
        /// End of usable low RAM.
        end: u64,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("failed to write the {0} into guest memory")]
    Write(&'static str),
}
