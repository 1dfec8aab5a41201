//! Warm sandboxes (`[factory] warm_vms`, Kata's VMCache): shims that booted a default-sized
//! sandbox before any pod asked for one, so a pod's `start` can hand one of them containerd's
//! socket instead of launching a shim that would boot a VM on the pod's time.
//!
//! Life of one, in `<state_dir>`:
//! 1. `start` (of any pod) brings the pool of its configuration file to `warm_vms` ([`refill`]):
//!    it launches `containerd-shim-kata-v2 -id .boot-<key>-<conf>-<n> warm` at the lowest CPU
//!    priority (`SCHED_IDLE`, inherited by its hull-vmm and virtiofsd: a pool that refills never
//!    slows a pod that is starting) and records it as `.boot-….pid`; it stops that file's warm
//!    shims of another key or past `warm_vms`. `<key>` is [`key`] of the default size, `<conf>`
//!    names the configuration file. One `start` at a time does this (a `flock`).
//! 2. That shim starts the sandbox as for a pod (directory `.boot-…`, its own host cgroup), binds
//!    `warm.sock` in it and renames the directory to `.warm-<key>-<conf>-<n>`: only then may it be
//!    claimed (a booted VM whose agent answered), and removes its `.pid` record.
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

/// The tag of the configuration file a warm sandbox was launched for (in its name, after the
/// key): a pool is the warm sandboxes of one configuration file, and only that file's `start`s
/// claim, count or retire them.
fn source_tag(cfg: &Config) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(cfg.source.as_os_str().as_encoded_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The launcher's record of a warm shim that is booting: `<state>/<its id>.pid`, written under
/// the pool lock as the shim is launched (its directory appears only later), removed by the shim
/// once its sandbox is ready.
const MARKER: &str = ".pid";
/// The pool lock (`<state>/.warm.lock`): counting and launching are one step.
const LOCK: &str = ".warm.lock";

/// One warm sandbox as the state directory shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Its directory (`.warm-…`, `.boot-…`) or its launcher's marker (`.boot-….pid`).
    path: PathBuf,
    /// Ready to be claimed (a `.warm-` directory).
    ready: bool,
    /// A marker, not a directory.
    marker: bool,
    key: String,
    source: String,
    /// Its shim, while it runs.
    pid: Option<i32>,
}

/// Splits a warm sandbox's name: (ready, marker, key, source tag). `None` for other names.
fn parse_name(name: &str) -> Option<(bool, bool, &str, &str)> {
    let (ready, rest) = match (name.strip_prefix(READY), name.strip_prefix(BOOTING)) {
        (Some(r), _) => (true, r),
        (_, Some(r)) => (false, r),
        _ => return None,
    };
    let marker = !ready && rest.ends_with(MARKER);
    let mut parts = rest.splitn(3, '-');
    let (key, source, _) = (parts.next()?, parts.next()?, parts.next()?);
    Some((ready, marker, key, source))
}

/// Every warm sandbox under `state_dir` (all keys and configurations), sorted by name.
fn list(state_dir: &Path) -> Vec<Entry> {
    let Ok(dir) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut v: Vec<Entry> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (ready, marker, key, source) = parse_name(&name)?;
            let path = e.path();
            let pid = if marker {
                live_shim(&path)
            } else {
                live_shim(&path.join(PID_FILE))
            };
            Some(Entry {
                ready,
                marker,
                key: key.to_string(),
                source: source.to_string(),
                pid,
                path,
            })
        })
        .collect();
    v.sort_by(|a, b| a.path.cmp(&b.path));
    v
}

/// The pid in pid file `file`, if that process still runs and is a shim.
fn live_shim(file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(file)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 1)?;
    is_shim(pid).then_some(pid)
}

/// Whether process `pid` runs and is a shim (a zombie no longer is).
fn is_shim(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim"))
    })
}

/// The shim of warm sandbox directory `dir`, while it runs.
fn shim_pid(dir: &Path) -> Option<i32> {
    live_shim(&dir.join(PID_FILE))
}

/// What the pool of configuration `source` should do, given `entries`: how many shims to launch
/// so that `want` of `key` are ready or booting, and which live shims to stop (those of another
/// key: the configuration or the shim binary changed since they booted; and those past `want`).
/// Ready ones are kept before booting ones. A shim seen twice (its marker and its directory)
/// counts once.
fn plan(entries: &[Entry], key: &str, source: &str, want: usize) -> (usize, Vec<i32>) {
    let mut live: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.source == source && e.pid.is_some())
        .collect();
    live.sort_by_key(|e| !e.ready);
    let mut seen = std::collections::HashSet::new();
    let (mut kept, mut stop) = (0, Vec::new());
    for e in live {
        let pid = e.pid.unwrap_or_default();
        if !seen.insert(pid) {
            continue;
        }
        if e.key == key && kept < want {
            kept += 1;
        } else {
            stop.push(pid);
        }
    }
    stop.sort_unstable();
    (want.saturating_sub(kept), stop)
}

/// The directories in `entries` whose shim is gone (a booting one's shim runs until its marker's
/// is gone too).
fn orphans(entries: &[Entry]) -> Vec<&Entry> {
    let live_markers: std::collections::HashSet<&Path> = entries
        .iter()
        .filter(|e| e.marker && e.pid.is_some())
        .map(|e| e.path.as_path())
        .collect();
    entries
        .iter()
        .filter(|e| !e.marker && e.pid.is_none())
        .filter(|e| {
            let mut marker = e.path.clone().into_os_string();
            marker.push(MARKER);
            e.ready || !live_markers.contains(Path::new(&marker))
        })
        .collect()
}

/// Removes what dead warm shims left: their markers, and their [`orphans`] (hull-vmm and
/// virtiofsd killed; mounts, directory and host cgroup removed).
fn sweep(entries: &[Entry]) {
    for e in entries.iter().filter(|e| e.marker && e.pid.is_none()) {
        let _ = std::fs::remove_file(&e.path);
    }
    for e in orphans(entries) {
        let name = e.path.file_name().map(|n| n.to_string_lossy().into_owned());
        discard(&e.path, name.as_deref().unwrap_or_default());
    }
}

/// Claims a ready warm sandbox for sandbox `group` and hands its shim `listener` (the task
/// socket containerd will connect to). Returns the adopted shim's pid; `None` when there was
/// none to claim or every claim failed (the pod then boots its own).
pub fn claim(cfg: &Config, group: &str, listener: &OwnedFd, req: &Adopt) -> Option<u32> {
    let state = &cfg.runtime.state_dir;
    let key = key(cfg, cfg.default_sizing());
    let source = source_tag(cfg);
    let target = sandbox_dir(cfg, group);
    let ready = list(state)
        .into_iter()
        .filter(|e| e.ready && e.pid.is_some() && e.key == key && e.source == source)
        .map(|e| e.path);
    for entry in ready {
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

/// Brings the pool of `cfg`'s configuration file to `warm_vms` warm sandboxes of its default
/// size, ready or booting: launches the missing ones, stops (SIGTERM, not waited for) those it no
/// longer wants (another key: the configuration or the shim changed; more than `warm_vms`, which
/// may be 0 now) and clears what dead ones left. Never blocks: when another `start` or a
/// `drain-warm` holds the pool lock, it leaves the pool to them.
pub fn refill(cfg: &Config) {
    let state = &cfg.runtime.state_dir;
    let want = cfg.factory.warm_vms as usize;
    let source = source_tag(cfg);
    // No pool asked for and nothing of this configuration's (or dead) to clear: the usual cold
    // start, without the lock.
    if want == 0
        && !list(state)
            .iter()
            .any(|e| e.source == source || e.pid.is_none())
    {
        return;
    }
    let _lock = match lock(state, false) {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => {
            eprintln!("containerd-shim-kata-v2: warm pool: {e:#}");
            return;
        }
    };
    let entries = list(state);
    sweep(&entries);
    let key = key(cfg, cfg.default_sizing());
    let (missing, stop) = plan(&entries, &key, &source, want);
    for pid in stop {
        // SAFETY: kill(2) on a warm shim (checked by its executable): it stops its sandbox.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    for n in 0..missing {
        if let Err(e) = launch(cfg, &key, &source, n) {
            eprintln!("containerd-shim-kata-v2: cannot launch a warm sandbox: {e:#}");
            return;
        }
    }
}

/// Takes the pool lock of `state` (`None`: busy, when not `wait`ing).
fn lock(state: &Path, wait: bool) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use nix::fcntl::{Flock, FlockArg};
    std::fs::create_dir_all(state).with_context(|| format!("create {}", state.display()))?;
    let path = state.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let arg = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(file, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("lock {}", path.display())),
    }
}

/// The marker of warm shim `id` (see [`MARKER`]).
pub fn marker(cfg: &Config, id: &str) -> PathBuf {
    cfg.runtime.state_dir.join(format!("{id}{MARKER}"))
}

fn launch(cfg: &Config, key: &str, source: &str, n: usize) -> Result<()> {
    let state = &cfg.runtime.state_dir;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = format!(
        "{BOOTING}{key}-{source}-{}{n}{nanos:08x}",
        std::process::id()
    );
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
    let child = cmd.spawn().context("launch a warm shim")?;
    let marker = marker(cfg, &id);
    if let Err(e) = std::fs::write(&marker, child.id().to_string()) {
        // Uncounted, it would be launched again and again: stop it.
        // SAFETY: kill(2) on the child we just spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        return Err(e).with_context(|| format!("write {}", marker.display()));
    }
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

/// `drain-warm`: stops every warm sandbox under the configuration's state directory (of every
/// configuration file and key), booting or ready, waits for them, clears what is left and prints
/// how many there were.
pub fn drain(cfg: &Config) -> Result<usize> {
    let state = &cfg.runtime.state_dir;
    let files = [LOG, &format!("{LOG}.old"), LOCK].map(|f| state.join(f));
    if list(state).is_empty() {
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
        return Ok(0);
    }
    // Held throughout: no `start` refills the pool meanwhile.
    let _lock = lock(state, true)?;
    let entries = list(state);
    let pids: std::collections::BTreeSet<i32> = entries.iter().filter_map(|e| e.pid).collect();
    let dead_dirs = orphans(&entries).len();
    for &pid in &pids {
        // SAFETY: kill(2) on a warm shim (checked by its executable): it stops its sandbox (one
        // still booting kills its hull-vmm and virtiofsd, and the failed boot cleans up).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|&p| is_shim(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids.iter().filter(|&&p| is_shim(p)) {
        // SAFETY: as above; it did not stop in time.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| is_shim(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    sweep(&list(state));
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    Ok(pids.len() + dead_dirs)
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
    fn warm_names_split_into_state_key_and_configuration() {
        assert_eq!(
            parse_name(".warm-k1-s1-123ab"),
            Some((true, false, "k1", "s1"))
        );
        assert_eq!(
            parse_name(".boot-k1-s1-123ab"),
            Some((false, false, "k1", "s1"))
        );
        assert_eq!(
            parse_name(".boot-k1-s1-123ab.pid"),
            Some((false, true, "k1", "s1"))
        );
        for other in [
            ".warm.log",
            ".warm.lock",
            ".warm-k1",
            ".boot-k1-s1",
            "pod1",
            "",
        ] {
            assert_eq!(parse_name(other), None, "{other}");
        }
    }

    /// A running "shim": a copy of sleep under a shim's name, in `dir`.
    fn fake_shim(dir: &Path) -> std::process::Child {
        let exe = dir.join("containerd-shim-test");
        if !exe.exists() {
            std::fs::copy("/bin/sleep", &exe).unwrap();
        }
        Command::new(&exe).arg("30").spawn().unwrap()
    }

    #[test]
    fn live_dead_and_orphaned_warm_sandboxes_are_told_apart_and_swept() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let (mut ready, mut booting) = (fake_shim(d.path()), fake_shim(d.path()));
        let (r, b) = (ready.id().to_string(), booting.id().to_string());
        let me = std::process::id().to_string();
        let dirs = [
            (".warm-k1-s1-a", Some(r.as_str())),
            (".warm-k1-s1-dead", Some("999999999")),
            // Alive, but not a shim.
            (".warm-k1-s1-notshim", Some(me.as_str())),
            // Booting: its shim is known by its marker only.
            (".boot-k1-s1-b", None),
            // Booting, without a marker: its launcher is gone.
            (".boot-k1-s1-c", None),
            ("pod1", None),
        ];
        for (name, pid) in dirs {
            std::fs::create_dir(state.join(name)).unwrap();
            if let Some(pid) = pid {
                std::fs::write(state.join(name).join(PID_FILE), pid).unwrap();
            }
        }
        std::fs::write(state.join(".boot-k1-s1-b.pid"), &b).unwrap();
        std::fs::write(state.join(".boot-k1-s1-e.pid"), "999999999").unwrap();
        std::fs::write(state.join(LOG), "log").unwrap();

        let entries = list(&state);
        let seen: Vec<(String, Option<i32>)> = entries
            .iter()
            .map(|e| {
                let name = e.path.file_name().unwrap().to_string_lossy().into_owned();
                (name, e.pid)
            })
            .collect();
        let (rp, bp) = (r.parse().ok(), b.parse().ok());
        assert_eq!(
            seen,
            [
                (".boot-k1-s1-b".to_string(), None),
                (".boot-k1-s1-b.pid".to_string(), bp),
                (".boot-k1-s1-c".to_string(), None),
                (".boot-k1-s1-e.pid".to_string(), None),
                (".warm-k1-s1-a".to_string(), rp),
                (".warm-k1-s1-dead".to_string(), None),
                (".warm-k1-s1-notshim".to_string(), None),
            ]
        );
        let mut orphaned: Vec<String> = orphans(&entries)
            .iter()
            .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        orphaned.sort();
        assert_eq!(
            orphaned,
            [".boot-k1-s1-c", ".warm-k1-s1-dead", ".warm-k1-s1-notshim"]
        );

        sweep(&entries);
        let mut left: Vec<String> = std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".boot-k1-s1-b",
                ".boot-k1-s1-b.pid",
                ".warm-k1-s1-a",
                LOG,
                "pod1"
            ]
        );
        for c in [&mut ready, &mut booting] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        // Once the booting shim is gone, its directory is an orphan too.
        assert_eq!(orphans(&list(&state)).len(), 2);
    }

    fn entry(ready: bool, marker: bool, key: &str, source: &str, pid: Option<i32>) -> Entry {
        Entry {
            path: PathBuf::from(format!("{key}-{source}-{pid:?}-{ready}-{marker}")),
            ready,
            marker,
            key: key.into(),
            source: source.into(),
            pid,
        }
    }

    #[test]
    fn the_pool_keeps_what_its_configuration_wants_and_stops_the_rest() {
        let pool = [
            // Booting (its marker and its directory, once it wrote its pid there): one shim.
            entry(false, true, "k", "s", Some(11)),
            entry(false, false, "k", "s", Some(11)),
            entry(true, false, "k", "s", Some(10)),
            entry(true, false, "k", "s", None),
            // Booted before the configuration (or the shim) changed.
            entry(true, false, "old", "s", Some(12)),
            // Another configuration file's pool.
            entry(true, false, "k", "other", Some(13)),
        ];
        // The ready one is kept first.
        assert_eq!(plan(&pool, "k", "s", 1), (0, vec![11, 12]));
        assert_eq!(plan(&pool, "k", "s", 2), (0, vec![12]));
        assert_eq!(plan(&pool, "k", "s", 4), (2, vec![12]));
        // warm_vms = 0 now: all of this configuration's go, none of the other's.
        assert_eq!(plan(&pool, "k", "s", 0), (0, vec![10, 11, 12]));
        assert_eq!(plan(&[], "k", "s", 1), (1, vec![]));
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
