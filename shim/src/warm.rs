//! Warm sandboxes (`[factory] warm_vms`, Kata's VMCache): shims that booted a default-sized
//! sandbox before any pod asked for one, so a pod's `start` can hand one of them containerd's
//! socket instead of launching a shim that would boot a VM on the pod's time.
//!
//! Life of one, in `<state_dir>`:
//! 1. `start` (of any pod, with `warm_vms` > 0) tops the pool up: it launches
//!    `containerd-shim-kata-v2 -id .boot-<key>-<n> warm` ([`refill`]), at the lowest CPU priority
//!    (`SCHED_IDLE`, inherited by its hull-vmm and virtiofsd): a pool that refills never slows a
//!    pod that is starting. `<key>` is [`key`] of the default size.
//! 2. That shim starts the sandbox as for a pod (directory `.boot-…`, its own host cgroup), binds
//!    `warm.sock` in it and renames the directory to `.warm-<key>-<n>`: only then may it be
//!    claimed (a booted VM whose agent answered).
//! 3. A pod's `start` claims one by renaming its directory to the pod's sandbox id (atomic,
//!    `RENAME_NOREPLACE`: one claimer wins) and sends an [`Adopt`] request on `warm.sock`, with
//!    the task socket it bound for containerd as an `SCM_RIGHTS` descriptor ([`claim`]).
//! 4. The warm shim takes the pod's identity: the sandbox's new directory and namespace, the
//!    pod's host cgroup (memory its boot was charged for stays with the parent `hull/`: cgroup v2
//!    moves no charges), normal CPU priority, the bundle's log; answers `ok <pid>` and serves
//!    containerd from then on exactly as a shim `start` launched. At the pod's first Create it
//!    checks the key again and boots afresh on a mismatch.
//!
//! A warm sandbox is never reused: each one serves one pod and goes with it. A claim that fails
//! (the warm shim died, or did not answer) cleans that directory up and the pod boots its own VM.
//! `containerd-shim-kata-v2 drain-warm` stops them all ([`drain`]).

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::sandbox::sandbox_dir;

/// Directory prefix of a warm sandbox still booting.
pub const BOOTING: &str = ".boot-";
/// Directory prefix of a warm sandbox ready to be claimed.
pub const READY: &str = ".warm-";
/// The warm shim's socket in its sandbox directory.
pub const SOCKET: &str = "warm.sock";
/// The warm shim's pid, in its sandbox directory.
pub const PID_FILE: &str = "shim.pid";
/// Where warm shims log until a pod adopts them (then: that pod's shim log).
pub const LOG: &str = ".warm.log";
/// Size past which the warm log is started afresh (the previous one kept as `.warm.log.old`).
const MAX_LOG: u64 = 1 << 20;
/// How long a claimer waits for the warm shim's answer.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a pod's `start` tells the warm shim it claimed: what containerd gave `start`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Adopt {
    /// The container (task) id containerd started the shim for.
    pub id: String,
    /// The sandbox id (the directory the claimer renamed the warm sandbox to).
    pub sandbox: String,
    /// containerd namespace.
    pub namespace: String,
    /// containerd's socket (`-address`).
    pub address: String,
    /// `-publish-binary`.
    pub publish_binary: String,
    /// The bundle (the shim's working directory and its `log` FIFO).
    pub bundle: PathBuf,
    /// `-debug`.
    pub debug: bool,
    /// `$TTRPC_ADDRESS` (containerd's event socket).
    pub ttrpc_address: String,
}

/// The pool key of sandboxes of `size` under `cfg`: [`Config::vm_key`] and the shim binary
/// itself (its size and modification time, read once per process), so that a shim of another
/// build never adopts (nor is counted as) a warm shim of this one.
pub fn key(cfg: &Config, size: crate::config::Sizing) -> String {
    static EXE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let exe = EXE.get_or_init(|| {
        std::env::current_exe()
            .and_then(std::fs::metadata)
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                format!("{}:{}.{}", m.len(), m.mtime(), m.mtime_nsec())
            })
            .unwrap_or_default()
    });
    use sha2::{Digest, Sha256};
    Sha256::digest(format!("{}|{exe}", cfg.vm_key(size)).as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The warm sandboxes of `key` in `state_dir`, ready (`.warm-`) or booting (`.boot-`), whose shim
/// still runs.
fn entries(state_dir: &Path, key: &str, prefixes: &[&str]) -> Vec<PathBuf> {
    let Ok(list) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = list
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            prefixes
                .iter()
                .any(|p| name.starts_with(&format!("{p}{key}-")))
        })
        .map(|e| e.path())
        .filter(|p| shim_pid(p).is_some())
        .collect();
    v.sort();
    v
}

/// The pid of the warm shim of sandbox directory `dir`, if it still runs.
fn shim_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 1)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    exe.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim"))
        .then_some(pid)
}

/// Claims a ready warm sandbox for sandbox `group` and hands its shim `listener` (the task
/// socket containerd will connect to). Returns the adopted shim's pid; `None` when there was
/// none to claim or every claim failed (the pod then boots its own).
pub fn claim(cfg: &Config, group: &str, listener: &OwnedFd, req: &Adopt) -> Option<u32> {
    let state = &cfg.runtime.state_dir;
    let key = key(cfg, cfg.default_sizing());
    let target = sandbox_dir(cfg, group);
    for entry in entries(state, &key, &[READY]) {
        match rename_noreplace(&entry, &target) {
            Ok(()) => {}
            // Another pod's start took it first, or the target exists (cleaned up by the
            // cold path).
            Err(_) => continue,
        }
        match hand_over(&target, listener, req) {
            Ok(pid) => return Some(pid),
            Err(e) => {
                eprintln!(
                    "containerd-shim-kata-v2: warm sandbox {} failed its claim ({e:#}): booting one for {group}",
                    entry.display()
                );
                discard(&target, group);
                if let Some(name) = entry.file_name() {
                    crate::hostcg::force_remove(&name.to_string_lossy());
                }
            }
        }
    }
    None
}

/// Stops what is left of a warm sandbox whose claim failed (now at `dir`, named `name`).
fn discard(dir: &Path, name: &str) {
    if let Some(pid) = shim_pid(dir) {
        // SAFETY: kill(2) on the pid file's process, checked to be a shim.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    crate::sandbox::kill_recorded(dir);
    crate::sandbox::cleanup_dir(dir);
    crate::hostcg::force_remove(name);
}

fn hand_over(dir: &Path, listener: &OwnedFd, req: &Adopt) -> Result<u32> {
    let sock = dir.join(SOCKET);
    let stream =
        UnixStream::connect(&sock).with_context(|| format!("connect {}", sock.display()))?;
    stream.set_read_timeout(Some(ADOPT_TIMEOUT))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    let fds = [listener.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .context("send the adopt request")?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("read the warm shim's answer")?;
    match answer.trim().strip_prefix("ok ") {
        Some(pid) => pid.parse().context("the warm shim's pid"),
        None if answer.is_empty() => bail!("the warm shim closed the connection"),
        None => bail!("the warm shim said: {}", answer.trim()),
    }
}

/// The warm shim's side of [`claim`]: reads one request and its descriptor from `stream`.
pub fn receive(stream: &UnixStream) -> Result<(Adopt, OwnedFd)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receive the adopt request")?;
        let mut fd = None;
        for c in msg.cmsgs().context("read the request's descriptors")? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: SCM_RIGHTS gave us this descriptor; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    let req: Adopt =
        serde_json::from_slice(buf[..n].trim_ascii_end()).context("parse the adopt request")?;
    let fd = fd.context("the adopt request carried no socket")?;
    Ok((req, fd))
}

/// Whether the peer of `stream` runs as our user (the claimer is a `start` that containerd ran;
/// nobody else may hand this shim a socket and a bundle to serve).
pub fn peer_is_us(stream: &tokio::net::UnixStream) -> bool {
    // SAFETY: geteuid has no failure mode.
    let me = unsafe { libc::geteuid() };
    stream.peer_cred().is_ok_and(|c| c.uid() == me)
}

/// Answers a claimer.
pub fn answer(mut stream: &UnixStream, text: &str) {
    let _ = stream.write_all(format!("{text}\n").as_bytes());
}

/// Launches warm shims until `warm_vms` of this configuration's default size are ready or
/// booting. `config` is the file they read (passed as `$HULL_CONF_FILE`).
pub fn refill(cfg: &Config) {
    let want = cfg.factory.warm_vms as usize;
    if want == 0 {
        return;
    }
    let state = &cfg.runtime.state_dir;
    let key = key(cfg, cfg.default_sizing());
    let have = entries(state, &key, &[READY, BOOTING]).len();
    for n in have..want {
        if let Err(e) = launch(cfg, &key, n) {
            eprintln!("containerd-shim-kata-v2: cannot launch a warm sandbox: {e:#}");
            return;
        }
    }
}

fn launch(cfg: &Config, key: &str, n: usize) -> Result<()> {
    let state = &cfg.runtime.state_dir;
    std::fs::create_dir_all(state).with_context(|| format!("create {}", state.display()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = format!("{BOOTING}{key}-{}{n}{nanos:08x}", std::process::id());
    let log_path = state.join(LOG);
    if std::fs::metadata(&log_path).is_ok_and(|m| m.len() > MAX_LOG) {
        let _ = std::fs::rename(&log_path, state.join(format!("{LOG}.old")));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join(LOG))
        .with_context(|| format!("open {}", state.join(LOG).display()))?;
    let exe = std::env::current_exe().context("find the shim's own binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["-id", &id, "warm"])
        .env(crate::config::ENV_PATH, &cfg.source)
        .current_dir(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setsid and sched_setscheduler are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            set_idle(0, true);
            Ok(())
        });
    }
    cmd.spawn().context("launch a warm shim")?;
    Ok(())
}

/// Puts thread or process `pid` (0: the caller) at `SCHED_IDLE` (`idle`) or back to
/// `SCHED_OTHER`. Best effort: a host that refuses only loses the priority difference.
pub fn set_idle(pid: libc::pid_t, idle: bool) {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: sched_setscheduler with a valid param struct; it changes only scheduling.
    unsafe { libc::sched_setscheduler(pid, policy, &param) };
}

/// Every thread of process `pid` back to normal priority (hull-vmm's vCPUs, virtiofsd's
/// workers: a warm sandbox's processes once a pod adopted it).
pub fn unidle_process(pid: u32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
            set_idle(tid, false);
        }
    }
}

/// `rename(2)` that fails instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(std::io::Error::from)
}

/// `drain-warm`: stops every warm sandbox under the configuration's state directory, booting or
/// ready, and prints how many.
pub fn drain(cfg: &Config) -> Result<usize> {
    let state = &cfg.runtime.state_dir;
    let Ok(list) = std::fs::read_dir(state) else {
        return Ok(0);
    };
    let dirs: Vec<PathBuf> = list
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(READY) || n.starts_with(BOOTING)
        })
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    for d in &dirs {
        if let Some(pid) = shim_pid(d) {
            // SAFETY: kill(2) on a warm shim (checked by its executable): it stops its sandbox.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for d in &dirs {
        while d.exists() && shim_pid(d).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if d.exists() {
            let name = d.file_name().map(|n| n.to_string_lossy().into_owned());
            discard(d, name.as_deref().unwrap_or_default());
        }
    }
    let _ = std::fs::remove_file(state.join(LOG));
    let _ = std::fs::remove_file(state.join(format!("{LOG}.old")));
    Ok(dirs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_socket_cross_over() {
        let (a, b) = UnixStream::pair().unwrap();
        let (listener_ours, _listener_peer) = UnixStream::pair().unwrap();
        let req = Adopt {
            id: "c1".into(),
            sandbox: "c1".into(),
            namespace: "default".into(),
            address: "/run/containerd/containerd.sock".into(),
            publish_binary: "/usr/bin/containerd".into(),
            bundle: "/run/b".into(),
            debug: false,
            ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
        };
        let line = serde_json::to_vec(&req).unwrap();
        let fds = [listener_ours.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&line)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let (got, fd) = receive(&b).unwrap();
        assert_eq!(got, req);
        // The descriptor is a new one for the same socket.
        assert_ne!(fd.as_raw_fd(), listener_ours.as_raw_fd());
        let st = nix::sys::stat::fstat(&fd).unwrap();
        let ours = nix::sys::stat::fstat(&listener_ours).unwrap();
        assert_eq!(st.st_ino, ours.st_ino);
    }

    #[test]
    fn only_live_entries_of_the_key_count() {
        let d = tempfile::tempdir().unwrap();
        // A running "shim": a copy of sleep under a shim's name.
        let exe = d.path().join("containerd-shim-test");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let mut shim = Command::new(&exe).arg("30").spawn().unwrap();
        let live = shim.id().to_string();
        for (name, pid) in [
            (".warm-k1-a", live.as_str()),
            (".warm-k1-dead", "999999999"),
            (".boot-k1-b", live.as_str()),
            (".warm-k2-c", live.as_str()),
            // Alive, but not a shim.
            (".warm-k1-d", &std::process::id().to_string()),
        ] {
            std::fs::create_dir(d.path().join(name)).unwrap();
            std::fs::write(d.path().join(name).join(PID_FILE), pid).unwrap();
        }
        let names = |prefixes: &[&str]| -> Vec<String> {
            entries(d.path(), "k1", prefixes)
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(&[READY]), [".warm-k1-a"]);
        assert_eq!(names(&[READY, BOOTING]), [".boot-k1-b", ".warm-k1-a"]);
        shim.kill().unwrap();
        shim.wait().unwrap();
        assert!(names(&[READY, BOOTING]).is_empty());
    }

    #[test]
    fn a_claimed_name_is_not_taken_twice() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, t) = (d.path().join("a"), d.path().join("b"), d.path().join("t"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        rename_noreplace(&a, &t).unwrap();
        assert!(rename_noreplace(&b, &t).is_err());
        assert!(b.is_dir() && t.is_dir() && !a.exists());
    }
}
