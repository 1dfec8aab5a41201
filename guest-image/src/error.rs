//! The crate's error type: one variant per thing that can go wrong, each message saying what failed, on
//! what, and what to do about it.

use std::io;
use std::path::PathBuf;

/// Errors of the guest-image build.
#[allow(
    clippy::error_impl_error,
    reason = "`hull_guest_image::Error` is the crate's API contract (the harness names it)"
)]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A host tool the build shells out to is not installed.
    #[error("{tool} not found: apt-get install {package}")]
    ToolMissing {
        /// The program, e.g. `dpkg-deb`.
        tool: &'static str,
        /// The Debian package that ships it.
        package: &'static str,
    },

    /// A host command ran but failed.
    #[error("{command} failed ({status}){stderr}: {hint}")]
    CommandFailed {
        /// The command line, for the reader.
        command: String,
        /// How it ended, e.g. `exit status: 100`.
        status: String,
        /// The tail of its standard error, prefixed with ": " when not empty.
        stderr: String,
        /// What to do about it.
        hint: String,
    },

    /// `apt-cache depends <metapackage>` names no versioned kernel package.
    #[error(
        "apt-cache depends {metapackage} names no linux-image-* package: run 'apt-get update' and retry \
         (is deb.debian.org bookworm in /etc/apt/sources.list?)"
    )]
    NoKernelPackage {
        /// The metapackage asked about.
        metapackage: &'static str,
    },

    /// The unpacked kernel package holds no `boot/vmlinuz-*`.
    #[error(
        "no boot/vmlinuz-* in {root}: the package is not a kernel image; delete {root} and retry"
    )]
    NoKernelImage {
        /// The unpacked package.
        root: PathBuf,
    },

    /// The kernel source tarball is not installed.
    #[error("no kernel source at {path}: apt-get install {packages}")]
    KernelSource {
        /// Where the tarball should be.
        path: PathBuf,
        /// What to install.
        packages: &'static str,
    },

    /// Kconfig dropped options of Hull's kernel configuration (their dependencies are off).
    #[error(
        "the kernel configuration did not take these settings of {fragment}: {options}: \
         add the options they depend on to the fragment (see 'make menuconfig', '/' to search)"
    )]
    KernelConfig {
        /// The fragment.
        fragment: PathBuf,
        /// The settings that did not take.
        options: String,
    },

    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `read`.
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },

    /// A module was asked for that neither `modules.dep` nor `modules.builtin` knows.
    #[error(
        "unknown kernel module {name}: not in {modules_dep} nor built in; check the name \
         (modinfo -b ROOT -k RELEASE NAME) or the kernel flavour"
    )]
    UnknownModule {
        /// The name as asked for.
        name: String,
        /// The `modules.dep` searched.
        modules_dep: PathBuf,
    },

    /// `modules.dep` has a dependency cycle (depmod refuses to write those, so the file is damaged).
    #[error("dependency cycle through module {name} in {modules_dep}: delete that file so depmod rewrites it")]
    ModuleCycle {
        /// A module on the cycle.
        name: String,
        /// The file.
        modules_dep: PathBuf,
    },

    /// A module file is compressed: the guest init loads plain `.ko` files only.
    #[error(
        "module {path} is compressed: the guest init loads only plain .ko files; \
         decompress it or teach the init MODULE_INIT_COMPRESSED_FILE"
    )]
    CompressedModule {
        /// The module file.
        path: PathBuf,
    },

    /// The input is not a bzImage this code understands.
    #[error("not a usable bzImage: {0}; pass the boot/vmlinuz-* file of an x86 kernel (boot protocol >= 2.08)")]
    NotBzImage(String),

    /// The bzImage payload uses a compression this crate does not decode.
    #[error(
        "kernel payload is {format}-compressed, only LZ4 (the Debian cloud flavour) is supported: \
         use Flavour::Cloud or add a {format} decoder"
    )]
    UnsupportedCompression {
        /// The format, e.g. `xz`.
        format: &'static str,
    },

    /// The LZ4 payload is damaged.
    #[error(
        "corrupt LZ4 kernel payload at byte {offset}: {reason}; the download may be damaged: \
         delete the kernel cache and retry"
    )]
    Lz4 {
        /// Offset inside the payload.
        offset: usize,
        /// What is wrong.
        reason: String,
    },

    /// The decompressed payload is not an ELF file.
    #[error("the decompressed kernel payload is not an ELF file (starts with {head:02x?}): the bzImage is damaged")]
    NotElf {
        /// Its first bytes.
        head: Vec<u8>,
    },

    /// The agent binary is dynamically linked: it cannot run as /init in an initramfs without libraries.
    #[error(
        "{path} is not statically linked ({reason}): build it with RUSTFLAGS=\"-C target-feature=+crt-static\" \
         --target x86_64-unknown-linux-gnu"
    )]
    AgentNotStatic {
        /// The binary.
        path: PathBuf,
        /// What gave it away.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Io`] for `action` on `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
