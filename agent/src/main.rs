//! `hull-agent`: the guest side of Hull.
//!
//! As the guest's PID 1 (the initramfs's `/init`) it does the init duties ([`init`]), then serves
//! the host's ttrpc API over vsock ([`guest`], [`rpc`]) until `DestroySandbox` powers the guest
//! off; with `hull.oneshot` on the kernel command line it only prints the readiness marker and
//! powers off (boot tests, the boot benchmark). Run by hand it is in host mode ([`host`]): the same
//! API on a Unix socket, for tests. The kernel command-line keys are in [`cmdline`].
//!
//! The binary is linked statically (`-C target-feature=+crt-static`, see guest-image): nothing
//! here may need glibc's NSS (no getpwnam, no getaddrinfo).

#![warn(missing_docs)]

mod cmdline;
mod container;
mod echo;
mod error;
mod guest;
mod host;
mod init;
mod log;
mod net;
mod reaper;
mod rpc;
mod sysinfo;

use std::process::ExitCode;

use error::ServeError;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == container::helper::HELPER_ARG)
    {
        return container::helper::main();
    }
    if init::is_pid1() {
        init::run();
    }
    host::main(std::env::args_os().skip(1))
}

/// The agent's tokio runtime: multi-threaded (the echo service's throughput), one worker per CPU up
/// to 4.
fn runtime() -> Result<tokio::runtime::Runtime, ServeError> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("hull-agent")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)
}
