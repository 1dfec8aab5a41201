//! Hull's nested-KVM test harness: runs a command where guest VMs can boot.
//!
//! On a host with hardware KVM the command simply runs on the host. On a PVM host (whose `/dev/kvm` never
//! boots an ordinary guest kernel) or a host without KVM, it runs inside **L1**: QEMU with TCG emulating an
//! AMD CPU with SVM, booting Debian's generic kernel with `kvm_amd` loaded, so that `/dev/kvm` inside L1
//! is hardware-style KVM with nested paging. L1 sees the host's root file system (read-only, with a tmpfs
//! overlay on top) and the workspace `target/` read-write, so host-built binaries run unchanged inside L1
//! and whatever they write under `target/` lands on the host. See shared/harness-notes.md for the
//! measurements behind every choice.
//!
//! Booting L1 costs ~7 s, so callers batch: [`run_script`] runs a whole shell script in one boot.
//!
//! ```no_run
//! use hull_harness::{run, RunOptions};
//! let status = run(&["cargo".into(), "test".into()], &RunOptions::default())?;
//! # Ok::<(), hull_harness::HarnessError>(())
//! ```
//!
//! Modules, one per concern: [`host`] (where to run), [`image`] (the L1 kernel + initramfs), [`pvh`]
//! (the kernel as an ELF for a faster boot),
//! [`script`] (the command as a shell script), [`qemu`] (the L1 command line), [`console`] (reading
//! L1's console and its markers), [`watchdog`] (time limits), [`run`](mod@run) (putting it together).
#![warn(missing_docs)]

pub mod console;
pub mod host;
pub mod image;
pub mod pvh;
pub mod qemu;
pub mod run;
pub mod script;
pub mod watchdog;

pub use host::{detect, HostKind};
pub use image::{ImageError, L1Image};
pub use run::{
    default_target_dir, forwarded_env, run, run_script, HarnessError, RunError, RunOptions,
    DEFAULT_SILENCE_TIMEOUT, DEFAULT_TIMEOUT, MAX_ATTEMPTS,
};
