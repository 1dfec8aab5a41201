//! A container's cgroup, as the agent reads and changes it after libcontainer made it: statistics,
//! limits, the list of processes (through libcgroups, on cgroup v2 and on v1 alike), and OOM kills.
//!
//! OOM kills are counted by the kernel (`oom_kill` in v2's `memory.events`, in v1's
//! `memory.oom_control`); [`OomWatch`] compares that counter with the last value seen and queues
//! one event per new kill. It checks when the kernel says the file changed (inotify on v2's
//! `memory.events`; on v1 an eventfd registered in `cgroup.event_control`) and each time one of
//! the container's processes ends, before its status is published: a waiter that sees 137 from an
//! OOM kill finds the event already queued.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, AnyCgroupManager, CgroupConfig, CgroupManager,
    CgroupSetup, ControllerOpt, FreezerState,
};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use oci_spec::runtime::LinuxResources;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// The cgroup of one container.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// The cgroups path of the spec (`/hull/<id>`), relative to each hierarchy's root.
    path: PathBuf,
    id: String,
}

impl Cgroup {
    /// The cgroup at `path` (the spec's cgroupsPath) of container `id`.
    pub fn new(path: PathBuf, id: &str) -> Self {
        Self {
            path,
            id: id.to_owned(),
        }
    }

    fn manager(&self) -> Result<AnyCgroupManager, String> {
        create_cgroup_manager(CgroupConfig {
            cgroup_path: self.path.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| format!("cgroup {}: {e}", self.path.display()))
    }

    /// The directory of the memory controller's cgroup.
    pub fn memory_dir(&self) -> Result<(PathBuf, bool), String> {
        let rel = self.path.strip_prefix("/").unwrap_or(&self.path);
        match get_cgroup_setup().map_err(|e| format!("detect the cgroup setup: {e}"))? {
            CgroupSetup::Unified => Ok((Path::new("/sys/fs/cgroup").join(rel), true)),
            CgroupSetup::Legacy | CgroupSetup::Hybrid => {
                let mount = libcgroups::v1::util::get_subsystem_mount_point(
                    &libcgroups::v1::ControllerType::Memory,
                )
                .map_err(|e| format!("find the v1 memory controller: {e}"))?;
                Ok((mount.join(rel), false))
            }
        }
    }

    /// Statistics: CPU, memory, PIDs, I/O.
    pub fn stats(&self) -> Result<Stats, String> {
        let s = self
            .manager()?
            .stats()
            .map_err(|e| format!("cgroup {} stats: {e}", self.path.display()))?;
        let oom_kills = self
            .memory_dir()
            .ok()
            .and_then(|(dir, v2)| read_oom_kills(&dir, v2).ok())
            .unwrap_or(0);
        let v2 = matches!(get_cgroup_setup(), Ok(CgroupSetup::Unified));
        Ok(Stats::from_libcgroups(&s, v2, oom_kills))
    }

    /// The PIDs of every process in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, String> {
        let mut pids: Vec<i32> = self
            .manager()?
            .get_all_pids()
            .map_err(|e| format!("cgroup {} processes: {e}", self.path.display()))?
            .into_iter()
            .map(|p| p.as_raw())
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// Applies new limits.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), String> {
        self.manager()?
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| format!("cgroup {} update: {e}", self.path.display()))
    }
}

impl Cgroup {
    /// Sends `signal` to every process at once: frozen while it is sent (as runc does), so none
    /// can fork or be torn down by another's exit in between; `frozen` says whether the cgroup is
    /// paused (then left so).
    pub fn signal_all(&self, signal: nix::sys::signal::Signal, frozen: bool) -> Result<(), String> {
        let m = self.manager()?;
        if !frozen {
            m.freeze(FreezerState::Frozen)
                .map_err(|e| format!("cgroup {} freeze: {e}", self.path.display()))?;
        }
        let pids = m.get_all_pids();
        if let Ok(pids) = &pids {
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.as_raw()), signal);
            }
        }
        if !frozen {
            m.freeze(FreezerState::Thawed)
                .map_err(|e| format!("cgroup {} thaw: {e}", self.path.display()))?;
        }
        pids.map(drop)
            .map_err(|e| format!("cgroup {} processes: {e}", self.path.display()))
    }
}

/// Removes the (empty) parent cgroup `parent` from every hierarchy: a host-mode agent's cleanup.
pub fn remove_parent(parent: &str) {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let mut dirs = vec![Path::new("/sys/fs/cgroup").join(rel)];
    if let Ok(points) = libcgroups::v1::util::list_subsystem_mount_points() {
        dirs.extend(points.into_iter().map(|p| p.join(rel)));
    }
    dirs.push(Path::new("/sys/fs/cgroup/unified").join(rel));
    for d in dirs {
        if d.is_dir() {
            if let Err(e) = std::fs::remove_dir(&d) {
                tracing::warn!(cgroup = %d.display(), error = %e, "cgroup parent not removed");
            }
        }
    }
}

/// Makes the ancestors of cgroups path `path` on a cgroup v2 host (not the container's own
/// cgroup). libcgroups creates each missing level with a plain `mkdir` and fails on EEXIST, so
/// two containers created at once under a parent that did not exist yet raced (one failed with
/// "failed to create dir /sys/fs/cgroup/hull: File exists"); `create_dir_all` takes the race.
/// libcgroups still enables the controllers on levels that exist. On v1 (libcgroups uses
/// `create_dir_all` there) nothing is needed.
pub fn prepare_ancestors(path: &Path) -> io::Result<()> {
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        return Ok(());
    }
    match path.strip_prefix("/").unwrap_or(path).parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            std::fs::create_dir_all(root.join(parent))
        }
        _ => Ok(()),
    }
}

/// A container's statistics, in the API's units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// CPU time, µs: total, user, system.
    pub cpu_usec: [u64; 3],
    /// Memory now, the limit (0: none), the peak (v1 only; 0 on v2), OOM kills.
    pub memory: [u64; 4],
    /// PIDs now, the limit (0: none).
    pub pids: [u64; 2],
    /// Bytes read and written on block devices.
    pub io: [u64; 2],
}

/// Limits at or above this are "no limit" (v1 reports ~2^63, v2 `max`).
const UNLIMITED: u64 = 1 << 62;

impl Stats {
    fn from_libcgroups(s: &libcgroups::stats::Stats, v2: bool, oom_kills: u64) -> Self {
        // v2's cpu.stat is in µs; v1's cpuacct in ns.
        let usec = |v: u64| if v2 { v } else { v / 1000 };
        let limit = |v: u64| if v >= UNLIMITED { 0 } else { v };
        let io = |op: &str| {
            s.blkio
                .service_bytes
                .iter()
                .filter(|d| {
                    d.op_type
                        .as_deref()
                        .is_some_and(|t| t.eq_ignore_ascii_case(op))
                })
                .map(|d| d.value)
                .sum()
        };
        Self {
            cpu_usec: [
                usec(s.cpu.usage.usage_total),
                usec(s.cpu.usage.usage_user),
                usec(s.cpu.usage.usage_kernel),
            ],
            memory: [
                s.memory.memory.usage,
                limit(s.memory.memory.limit),
                s.memory.memory.max_usage,
                oom_kills,
            ],
            pids: [s.pids.current, limit(s.pids.limit)],
            io: [io("read"), io("write")],
        }
    }
}

/// The kernel's OOM-kill counter of a memory cgroup.
fn read_oom_kills(dir: &Path, v2: bool) -> io::Result<u64> {
    let file = if v2 {
        "memory.events"
    } else {
        "memory.oom_control"
    };
    let text = std::fs::read_to_string(dir.join(file))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// OOM events not yet taken by `GetOOMEvent`, in order.
#[derive(Debug, Default)]
pub struct OomQueue {
    events: Mutex<VecDeque<String>>,
    notify: Notify,
}

impl OomQueue {
    fn push(&self, id: &str, n: u64) {
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..n {
            q.push_back(id.to_owned());
        }
        drop(q);
        self.notify.notify_waiters();
    }

    /// The next event, waiting for one.
    pub async fn next(&self) -> String {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(id) = self
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return id;
            }
            notified.await;
        }
    }
}

/// Watches one container's OOM-kill counter (see the module docs).
#[derive(Debug)]
pub struct OomWatch {
    id: String,
    dir: PathBuf,
    v2: bool,
    seen: Mutex<u64>,
    queue: Arc<OomQueue>,
}

impl OomWatch {
    /// Starts watching `cgroup` (which exists: the container was created); events go to `queue`.
    /// The task ends when the cgroup goes away or the returned handle is aborted.
    pub fn start(
        cgroup: &Cgroup,
        queue: Arc<OomQueue>,
    ) -> Result<(Arc<Self>, tokio::task::AbortHandle), String> {
        let (dir, v2) = cgroup.memory_dir()?;
        let seen = read_oom_kills(&dir, v2).unwrap_or(0);
        let watch = Arc::new(Self {
            id: cgroup.id.clone(),
            dir,
            v2,
            seen: Mutex::new(seen),
            queue,
        });
        let source = if v2 {
            Source::inotify(&watch.dir)
        } else {
            Source::eventfd(&watch.dir)
        }
        .map_err(|e| format!("watch {} for OOM kills: {e}", watch.dir.display()))?;
        let task = {
            let watch = watch.clone();
            tokio::spawn(async move {
                while source.wait().await.is_ok() {
                    if !watch.dir.exists() {
                        break;
                    }
                    watch.check();
                }
            })
        };
        Ok((watch, task.abort_handle()))
    }

    /// Queues an event per kill since the last check.
    pub fn check(&self) {
        let Ok(now) = read_oom_kills(&self.dir, self.v2) else {
            return;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if now > *seen {
            tracing::info!(container = %self.id, kills = now - *seen, "OOM kill");
            self.queue.push(&self.id, now - *seen);
            *seen = now;
        }
    }
}

/// What wakes an [`OomWatch`]: an inotify instance (v2) or an eventfd (v1). Either way a
/// wake-up is a readable fd, drained and otherwise ignored (the counter says what happened).
struct Source(AsyncFd<OwnedFd>);

impl Source {
    fn inotify(dir: &Path) -> io::Result<Self> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        ino.add_watch(&dir.join("memory.events"), AddWatchFlags::IN_MODIFY)?;
        Self::register(OwnedFd::from(ino))
    }

    fn eventfd(dir: &Path) -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the fd it returns is new and owned below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let control = std::fs::File::open(dir.join("memory.oom_control"))?;
        std::fs::write(
            dir.join("cgroup.event_control"),
            format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
        )?;
        // The kernel holds its own reference to `control` now.
        Self::register(efd)
    }

    fn register(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the AsyncFd owns `fd`, so the fd stays open for as long as it is registered.
        Ok(Self(unsafe { AsyncFd::register(fd) }?))
    }

    /// Waits for the next wake-up.
    async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.0.readable().await?;
            let mut buf = [0u8; 4096];
            match guard.try_io(|f| {
                nix::unistd::read(f.get_ref().as_fd(), &mut buf).map_err(io::Error::from)
            }) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_counters() {
        let dir = std::env::temp_dir().join(format!("hull-oom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n",
        )
        .unwrap();
        assert_eq!(read_oom_kills(&dir, true).unwrap(), 2);
        assert_eq!(read_oom_kills(&dir, false).unwrap(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn queue_keeps_order_and_wakes_waiters() {
        let q = Arc::new(OomQueue::default());
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.next().await })
        };
        tokio::task::yield_now().await;
        q.push("a", 1);
        q.push("b", 2);
        assert_eq!(waiter.await.unwrap(), "a");
        assert_eq!(q.next().await, "b");
        assert_eq!(q.next().await, "b");
    }
}
