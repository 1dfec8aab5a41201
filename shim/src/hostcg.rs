//! The sandbox's host cgroup: the shim, hull-vmm and virtiofsd of one sandbox in
//! `hull/<sandbox id>` of every cgroup hierarchy the host mounts (the unified one on a cgroup v2
//! host; each v1 controller's on a v1 or hybrid host), so the pod's whole host footprint is
//! accounted, limited and listed in one place. Removed at teardown, after the shim moved back.
//!
//! A host without cgroups mounted (or where the shim may not write them) runs the sandbox
//! without: logged, not fatal.

use std::path::{Path, PathBuf};

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The sandbox's cgroup directories.
#[derive(Debug)]
pub struct HostCgroup {
    dirs: Vec<PathBuf>,
    /// Where the shim was before, per directory (to move back before removal).
    shim_origin: Vec<PathBuf>,
}

/// The hierarchies to use: the unified root on v2; else each v1 hierarchy's root.
fn hierarchies(root: &Path) -> Vec<PathBuf> {
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        // Real directories with cgroup.procs (not the cpu -> cpu,cpuacct symlinks).
        .filter(|p| {
            std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
                && p.join("cgroup.procs").exists()
        })
        .collect();
    v.sort();
    v
}

/// The shim's current cgroup in hierarchy `h` (from /proc/self/cgroup).
fn own_cgroup(h: &Path, root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let name = h.strip_prefix(root).ok()?.to_string_lossy().into_owned();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if name.is_empty() {
            controllers.is_empty()
        } else {
            controllers
                .split(',')
                .any(|c| name.split(',').any(|n| n == c || n == format!("name={c}")))
                || controllers == name
        };
        if matches {
            return Some(h.join(path.trim_start_matches('/')));
        }
    }
    None
}

impl HostCgroup {
    /// Creates `hull/<id>` in every hierarchy and moves `pids` (and the shim) there.
    pub fn create(id: &str, pids: &[u32]) -> Option<Self> {
        Self::create_under(Path::new(CGROUP_ROOT), id, pids)
    }

    fn create_under(root: &Path, id: &str, pids: &[u32]) -> Option<Self> {
        let mut cg = Self {
            dirs: Vec::new(),
            shim_origin: Vec::new(),
        };
        for h in hierarchies(root) {
            let dir = h.join("hull").join(id);
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::info!(cgroup = %dir.display(), "no host cgroup for the sandbox: {e}");
                continue;
            }
            let origin = own_cgroup(&h, root).unwrap_or_else(|| h.clone());
            let me = std::process::id();
            for pid in pids.iter().copied().chain([me]) {
                if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
                    tracing::info!(cgroup = %dir.display(), pid, "cannot move into the sandbox cgroup: {e}");
                }
            }
            cg.dirs.push(dir);
            cg.shim_origin.push(origin);
        }
        tracing::debug!(dirs = ?cg.dirs, "sandbox cgroup");
        (!cg.dirs.is_empty()).then_some(cg)
    }

    /// Moves the sandbox to `hull/<id>`: creates it, moves every process of the old directories
    /// (hull-vmm, virtiofsd and its sandboxed child, the shim) there and removes the old ones
    /// (cgroup v2 renames no cgroup). Charges stay where they were made.
    pub fn rehome(&mut self, id: &str) {
        for dir in self.dirs.iter_mut() {
            let Some(parent) = dir.parent() else { continue };
            let new = parent.join(id);
            if let Err(e) = std::fs::create_dir_all(&new) {
                tracing::warn!(cgroup = %new.display(), "cannot create the sandbox cgroup: {e}");
                continue;
            }
            // A process forking while we move it may leave its child behind: a few rounds.
            let mut removed = Err(std::io::Error::from(std::io::ErrorKind::Other));
            for _ in 0..5 {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    if let Err(e) = std::fs::write(new.join("cgroup.procs"), pid) {
                        tracing::warn!(cgroup = %new.display(), pid, "cannot move into the sandbox cgroup: {e}");
                    }
                }
                removed = std::fs::remove_dir(&*dir);
                if removed.is_ok() {
                    break;
                }
            }
            if let Err(e) = removed {
                tracing::warn!(cgroup = %dir.display(), "old sandbox cgroup not removed: {e}");
            }
            *dir = new;
        }
    }

    /// The processes in the sandbox's cgroup (of its first hierarchy).
    pub fn procs(&self) -> Vec<u32> {
        self.dirs
            .first()
            .and_then(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Moves the shim back where it was and removes the directories (their other processes
    /// must have ended).
    pub fn remove(self) {
        let me = std::process::id().to_string();
        for (dir, origin) in self.dirs.iter().zip(&self.shim_origin) {
            let _ = std::fs::write(origin.join("cgroup.procs"), &me);
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::warn!(cgroup = %dir.display(), "sandbox cgroup not removed: {e}");
            }
        }
    }
}

/// After a shim died: kills what is left in sandbox `id`'s cgroups and removes them (`delete`).
pub fn force_remove(id: &str) {
    for h in hierarchies(Path::new(CGROUP_ROOT)) {
        let dir = h.join("hull").join(id);
        if !dir.is_dir() {
            continue;
        }
        let procs = |d: &Path| -> Vec<i32> {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        };
        // Bounded: `delete` has 5 s in all.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let left = procs(&dir);
            if left.is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            for pid in left {
                // SAFETY: kill(2); the pids are the sandbox cgroup's own processes.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if let Err(e) = std::fs::remove_dir(&dir) {
            tracing::warn!(cgroup = %dir.display(), "sandbox cgroup not removed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_hierarchies_skip_symlinks_and_files() {
        let d = tempfile::tempdir().unwrap();
        for h in ["cpu,cpuacct", "memory", "pids"] {
            std::fs::create_dir(d.path().join(h)).unwrap();
            std::fs::write(d.path().join(h).join("cgroup.procs"), "").unwrap();
        }
        std::os::unix::fs::symlink(d.path().join("cpu,cpuacct"), d.path().join("cpu")).unwrap();
        std::fs::create_dir(d.path().join("empty")).unwrap();
        let names: Vec<String> = hierarchies(d.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["cpu,cpuacct", "memory", "pids"]);
        std::fs::write(d.path().join("cgroup.controllers"), "cpu memory").unwrap();
        assert_eq!(hierarchies(d.path()), vec![d.path().to_path_buf()]);
    }
}
