//! Building the guest's `/init`: `hull-agent`, built for size (the workspace's `guest-agent` profile:
//! release, `opt-level = "s"`, fat LTO, one codegen unit; 6.6 MiB instead of 8.4), statically linked with glibc
//! (`-C target-feature=+crt-static`, explicit `--target` so the flags never touch host builds and the
//! artifacts live in their own `target/x86_64-unknown-linux-gnu/` subdir). Cargo's own incremental
//! build makes a second run a no-op.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use crate::cmd::{self, Tool};
use crate::elf;
use crate::error::{Error, Result};

/// The target triple the agent is built for.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The Cargo profile it is built with (in the workspace's Cargo.toml).
pub const AGENT_PROFILE: &str = "guest-agent";
/// The Rust flags that make it static.
pub const AGENT_RUSTFLAGS: &str = "-C target-feature=+crt-static";

const CARGO: Tool = Tool {
    program: "cargo",
    package: "rustup (or cargo)",
};

/// A built agent.
#[derive(Debug, Clone)]
pub(crate) struct Agent {
    pub path: PathBuf,
    /// False when cargo had nothing to do.
    pub rebuilt: bool,
}

/// `cargo build --profile guest-agent -p hull-agent --target x86_64-unknown-linux-gnu`, static; checks the result
/// has no `PT_INTERP`.
pub(crate) fn build(cargo: &Path, workspace: &Path, target_dir: &Path) -> Result<Agent> {
    let path = target_dir
        .join(AGENT_TARGET)
        .join(AGENT_PROFILE)
        .join("hull-agent");
    let before = stamp(&path);
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--quiet",
            "--profile",
            AGENT_PROFILE,
            "-p",
            "hull-agent",
            "--target",
            AGENT_TARGET,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace)
        // CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS: make ours the only one.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", AGENT_RUSTFLAGS)
        // For when the agent links libseccomp (youki): link it statically too.
        .env("LIBSECCOMP_LINK_TYPE", "static")
        .env("LIBSECCOMP_LIB_PATH", "/usr/lib/x86_64-linux-gnu")
        .stdin(Stdio::null());
    let status = command
        .status()
        .map_err(|e| cmd::spawn_error(CARGO, &command, e))?;
    if !status.success() {
        return Err(cmd::failed(
            &command,
            &status,
            b"",
            "see the compiler output above",
        ));
    }
    let bytes = fs::read(&path).map_err(Error::io("read the built agent", &path))?;
    if let Some(reason) = elf::not_static_reason(&bytes) {
        return Err(Error::AgentNotStatic { path, reason });
    }
    let rebuilt = before.is_none() || before != stamp(&path);
    Ok(Agent { path, rebuilt })
}

fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let md = fs::metadata(path).ok()?;
    Some((md.len(), md.modified().ok()?))
}
