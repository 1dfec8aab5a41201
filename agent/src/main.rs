//! `hull-agent`: the guest side of Hull. As the guest's PID 1 it does the init duties (see [`init`]);
//! later it also serves the host's ttrpc API over vsock (a `--listen` mode).

mod init;

use std::process::ExitCode;

fn main() -> ExitCode {
    if init::is_pid1() {
        init::run();
    }
    eprintln!(
        "hull-agent: this program must run as the guest's init (PID 1, the initramfs's /init); \
         it is PID {}. Boot it with `cargo xtask guest-image` and a VMM.",
        std::process::id()
    );
    ExitCode::from(2)
}
