//! Helpers shared by Hull's end-to-end suites: where the built artefacts are, running `hull-vmm`
//! with a deadline, and reading the guest's marker lines.
//!
//! The suites under `guest/` need a KVM that boots ordinary kernels; `cargo xtask test` builds them
//! with `--features guest` and runs them inside the nested-KVM harness (or directly on a
//! hardware-KVM host).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The marker the guest agent prints when it is up.
pub const READY_MARKER: &str = "HULL_GUEST_READY";

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `hull-vmm` binary: `$HULL_VMM`, or `target/debug/hull-vmm`.
pub fn vmm_bin() -> PathBuf {
    let p = std::env::var_os("HULL_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/hull-vmm"));
    assert!(
        p.exists(),
        "{} is missing: run 'cargo build -p hull-vmm' (cargo xtask test does)",
        p.display()
    );
    p
}

/// The guest image built by `cargo xtask guest-image`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// bzImage.
    pub vmlinuz: PathBuf,
    /// ELF vmlinux (PVH).
    pub vmlinux: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Kernel release.
    pub release: String,
}

/// The guest image under `$HULL_GUEST_DIR` or `target/guest`.
pub fn guest_image() -> GuestImage {
    let dir = std::env::var_os("HULL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"));
    let release = std::fs::read_to_string(dir.join("kernel-release")).unwrap_or_else(|e| {
        panic!(
            "{}/kernel-release: {e}: run 'cargo xtask guest-image'",
            dir.display()
        )
    });
    GuestImage {
        vmlinuz: dir.join("vmlinuz"),
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        release: release.trim().to_string(),
    }
}

/// What the agent reported in its ready line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Guest uptime at the marker.
    pub uptime_ms: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// MemTotal.
    pub mem_kib: u64,
    /// `uname -r`.
    pub kernel: String,
}

/// Parses `HULL_GUEST_READY uptime_ms=.. cpus=.. mem_kib=.. kernel=..` anywhere in `line`.
pub fn parse_ready(line: &str) -> Option<Ready> {
    let rest = &line[line.find(READY_MARKER)? + READY_MARKER.len()..];
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
    };
    Some(Ready {
        uptime_ms: field("uptime_ms")?.parse().ok()?,
        cpus: field("cpus")?.parse().ok()?,
        mem_kib: field("mem_kib")?.parse().ok()?,
        kernel: field("kernel")?.to_string(),
    })
}

/// The outcome of one `hull-vmm` run.
#[derive(Debug)]
pub struct VmRun {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout (the guest console by default).
    pub stdout: String,
    /// Everything on stderr (the VMM's own messages).
    pub stderr: String,
}

impl VmRun {
    /// The ready line, if the guest printed one.
    pub fn ready(&self) -> Option<Ready> {
        self.stdout.lines().find_map(parse_ready)
    }
}

/// Runs `cmd` (stdin from /dev/null), collecting its output; kills it and panics after `limit`,
/// so a hung guest fails the test instead of blocking the suite.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> VmRun {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut stdout = String::new();
        let mut stderr = String::new();
        let _ = out.read_to_string(&mut stdout);
        let _ = err.read_to_string(&mut stderr);
        let status = child.wait().expect("wait");
        let _ = tx.send(());
        VmRun {
            status,
            stdout,
            stderr,
        }
    });
    if rx.recv_timeout(limit).is_err() {
        // SAFETY: plain kill(2) of the child we spawned and have not reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let run = waiter.join().expect("waiter");
        panic!(
            "{cmd:?} did not finish within {limit:?}; stdout:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        );
    }
    waiter.join().expect("waiter")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_line() {
        let r = parse_ready("[ 1.2] HULL_GUEST_READY uptime_ms=812 cpus=2 mem_kib=491520 kernel=6.1.0-56-cloud-amd64").unwrap();
        assert_eq!(
            r,
            Ready {
                uptime_ms: 812,
                cpus: 2,
                mem_kib: 491_520,
                kernel: "6.1.0-56-cloud-amd64".into()
            }
        );
        assert_eq!(
            parse_ready("HULL_GUEST_READY uptime_ms=1 cpus=x mem_kib=1 kernel=k"),
            None
        );
        assert_eq!(parse_ready("HULL_GUEST_READY uptime_ms=1 cpus=1"), None);
        assert_eq!(parse_ready("nothing here"), None);
    }

    #[test]
    fn deadline_kills_a_hung_process() {
        let r = std::panic::catch_unwind(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            run_with_deadline(cmd, Duration::from_millis(200))
        });
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("did not finish within"), "{msg}");
    }

    #[test]
    fn collects_output_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let r = run_with_deadline(cmd, Duration::from_secs(30));
        assert_eq!(
            (r.status.code(), r.stdout.as_str(), r.stderr.as_str()),
            (Some(3), "out\n", "err\n")
        );
    }
}
