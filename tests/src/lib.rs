//! Helpers shared by Hull's end-to-end suites: where the built artefacts are, running `hull-vmm`
//! with a deadline, and reading the guest's marker lines.
//!
//! The suites under `guest/` need a KVM that boots ordinary kernels; `cargo xtask test` builds them
//! with `--features guest` and runs them inside the nested-KVM harness (or directly on a
//! hardware-KVM host).

pub mod containerd;
pub mod containers;
pub mod virtiofsd;

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

/// `hull-vmm` booting `kernel` with the guest image's initramfs, `vcpus` and `memory_mib`; the
/// caller adds the rest.
pub fn vmm_command(kernel: &Path, vcpus: u8, memory_mib: u32) -> Command {
    vmm_command_with(kernel, &guest_image().initramfs, vcpus, memory_mib)
}

/// [`vmm_command`] with another initramfs.
pub fn vmm_command_with(kernel: &Path, initrd: &Path, vcpus: u8, memory_mib: u32) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--vcpus", &vcpus.to_string()])
        .args(["--memory", &memory_mib.to_string()]);
    cmd
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

/// A `hull-vmm` running in the background with a vsock device, for tests that talk to the agent.
/// Killed (and its socket directory removed) on drop.
pub struct RunningVm {
    child: Option<std::process::Child>,
    output: Option<std::thread::JoinHandle<(String, String)>>,
    /// The hybrid-vsock socket.
    pub uds: PathBuf,
    /// A private directory for this VM's sockets.
    pub dir: PathBuf,
}

impl RunningVm {
    /// Boots the guest image (ELF/PVH) with `vcpus`, `memory_mib` and a vsock device, the agent
    /// serving, plus `extra_cmdline` on the kernel command line.
    pub fn start(name: &str, vcpus: u8, memory_mib: u32, extra_cmdline: &str) -> Self {
        Self::start_in(Self::prepare(name), vcpus, memory_mib, extra_cmdline)
    }

    /// A fresh, empty socket directory for VM `name` (to bind host listeners in before the boot).
    pub fn prepare(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hull-vm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the VM's socket directory");
        dir
    }

    /// [`RunningVm::start`] in a directory from [`RunningVm::prepare`]; the hybrid-vsock socket is
    /// `dir/vsock.sock`.
    pub fn start_in(dir: PathBuf, vcpus: u8, memory_mib: u32, extra_cmdline: &str) -> Self {
        Self::start_with(
            dir,
            &guest_image().initramfs,
            vcpus,
            memory_mib,
            extra_cmdline,
        )
    }

    /// [`RunningVm::start_in`] with another initramfs. The VMM is killed (SIGKILL) if the thread
    /// that called this ends, so a VM kept for a whole test process never outlives it.
    pub fn start_with(
        dir: PathBuf,
        initrd: &Path,
        vcpus: u8,
        memory_mib: u32,
        extra_cmdline: &str,
    ) -> Self {
        Self::start_full(dir, initrd, vcpus, memory_mib, extra_cmdline, &[])
    }

    /// [`RunningVm::start_with`] with more `hull-vmm` arguments (devices).
    pub fn start_full(
        dir: PathBuf,
        initrd: &Path,
        vcpus: u8,
        memory_mib: u32,
        extra_cmdline: &str,
        vmm_args: &[String],
    ) -> Self {
        use std::os::unix::process::CommandExt as _;
        let img = guest_image();
        let uds = dir.join("vsock.sock");
        // Debugging aids: `HULL_TEST_CMDLINE` is appended to every guest's command line (e.g.
        // `hull.debug`), and with `HULL_TEST_CONSOLE_DIR` each console goes to `<dir>/<vm>.log`.
        let debug_cmdline = std::env::var("HULL_TEST_CMDLINE").unwrap_or_default();
        let cmdline = format!(
            "console=ttyS0 quiet reboot=k panic=-1 pci=off cryptomgr.notests {extra_cmdline} {debug_cmdline}"
        );
        let mut cmd = vmm_command_with(&img.vmlinux, initrd, vcpus, memory_mib);
        if let Some(d) = std::env::var_os("HULL_TEST_CONSOLE_DIR") {
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let log = PathBuf::from(d).join(format!("{name}.log"));
            cmd.arg("--console").arg(format!("file:{}", log.display()));
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .args(vmm_args)
            .args(["--cmdline", &cmdline])
            .arg("--vsock-uds")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hull-vmm");
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        // With `HULL_TEST_LOG_DIR` (set by `cargo xtask test`), the VMM's stderr is also kept in
        // `<dir>/<vm>.stderr` once it ends: why a VM died is then on disk even when no test
        // waited for it (a VM shared by a suite).
        let keep = std::env::var_os("HULL_TEST_LOG_DIR").map(|d| {
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            PathBuf::from(d).join(format!("{name}.stderr"))
        });
        let output = std::thread::spawn(move || {
            let e = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                if let Some(path) = keep {
                    let _ = std::fs::write(path, &s);
                }
                s
            });
            let mut o = String::new();
            let _ = out.read_to_string(&mut o);
            (o, e.join().unwrap_or_default())
        });
        Self {
            child: Some(child),
            output: Some(output),
            uds,
            dir,
        }
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Whether the VMM process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits (at most `limit`) for the VMM to exit by itself; returns its status and output.
    pub fn wait(mut self, limit: Duration) -> VmRun {
        let mut child = self.child.take().expect("not waited yet");
        let output = self.output.take().expect("not waited yet");
        let (tx, rx) = mpsc::channel();
        let pid = child.id();
        let waiter = std::thread::spawn(move || {
            let status = child.wait().expect("wait");
            let _ = tx.send(());
            status
        });
        if rx.recv_timeout(limit).is_err() {
            // SAFETY: plain kill(2) of our own unreaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = waiter.join();
            let (stdout, stderr) = output.join().unwrap_or_default();
            panic!("hull-vmm did not exit within {limit:?}; stdout:\n{stdout}\nstderr:\n{stderr}");
        }
        let status = waiter.join().expect("waiter");
        let (stdout, stderr) = output.join().unwrap_or_default();
        VmRun {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens a hybrid-vsock stream to guest `port` through the VM's socket `uds`: connects, sends
/// `CONNECT <port>\n` and expects `OK <n>\n`. Fails if the guest has no listener there (the VMM then
/// closes the connection).
pub fn hybrid_connect(uds: &Path, port: u32) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::io::{Error, ErrorKind, Write};
    let mut s = std::os::unix::net::UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b)? {
            0 => return Err(Error::new(ErrorKind::ConnectionRefused, "closed before OK")),
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("bad handshake reply {line:?}"),
        ));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// [`hybrid_connect`], retried (10 ms doubling to 200 ms) until it works or `limit` passes: for a
/// guest service that may not be listening yet.
pub fn hybrid_connect_retry(
    uds: &Path,
    port: u32,
    limit: Duration,
) -> std::os::unix::net::UnixStream {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match hybrid_connect(uds, port) {
            Ok(s) => return s,
            Err(e) if start.elapsed() > limit => {
                panic!("no guest service on vsock port {port} after {limit:?}: {e}")
            }
            // Polling a service that is starting up: the backoff is the retry policy, not a
            // synchronisation.
            Err(_) => std::thread::sleep(pause),
        }
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Deterministic test bytes for stream `seed` (xorshift).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
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
