//! `containerd-shim-kata-v2`: Hull's containerd shim (runtime type `io.containerd.kata.v2`).
//!
//! A stub for now: the shim v2 Task API, the per-pod sandbox (hull-vmm, virtiofsd) and the agent
//! client arrive with the shim issue. Until then it refuses to start, clearly, so containerd reports
//! the failure instead of waiting on a socket.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "containerd-shim-kata-v2: Hull's shim is not implemented yet; use hull-vmm directly (cargo xtask run)"
    );
    ExitCode::from(1)
}
