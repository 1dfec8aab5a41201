//! Reaping children. As PID 1 the agent inherits every orphan of the guest; each one it does not
//! wait(2) for stays a zombie forever. On each SIGCHLD the reaper calls `waitpid(-1, WNOHANG)` until
//! no exited child is left (signals coalesce: one SIGCHLD may stand for many exits).
//!
//! Children the agent spawns itself (container processes, next) must not lose their status to this
//! blanket wait. Their spawner holds the bookkeeping lock across spawn and registration
//! ([`Reaper::lock`], then [`SpawnGuard::watch`]): no reap can run in between, so a child that
//! exits at once is still recognised, and a PID reused after an orphan cannot be confused with it.
//! The status of a watched PID goes to its receiver; an orphan's is logged and dropped.
//!
//! Consequence: nothing else in the agent may wait for children (no `std::process::Child::wait`,
//! no `tokio::process`): the reaper would steal their statuses.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// exit(2) with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The end of a child in a wait status; `None` for stops and continues.
    pub fn from_wait_status(status: WaitStatus) -> Option<(i32, Exit)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid.as_raw(), Exit::Code(code))),
            WaitStatus::Signaled(pid, sig, _core) => Some((pid.as_raw(), Exit::Signal(sig as i32))),
            _ => None,
        }
    }

    /// The shell's convention: the code, or 128 + the signal.
    pub fn as_shell_status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// What became of a reaped status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent to the watcher.
    Delivered,
    /// Nobody watched this PID: an orphan (or a child whose watcher was never registered).
    Orphan,
    /// Watched, but the receiver was dropped meanwhile.
    Unwanted,
}

/// The bookkeeping: which PIDs someone waits for. Pure (no syscalls), unit-tested.
#[derive(Debug, Default)]
pub struct Book {
    watched: HashMap<i32, oneshot::Sender<Exit>>,
    orphans: u64,
}

impl Book {
    /// Registers interest in `pid`'s end. A second watch of the same PID replaces the first.
    pub fn watch(&mut self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        self.watched.insert(pid, tx);
        rx
    }

    /// Routes one reaped status.
    pub fn on_exit(&mut self, pid: i32, exit: Exit) -> Delivery {
        match self.watched.remove(&pid) {
            Some(tx) => match tx.send(exit) {
                Ok(()) => Delivery::Delivered,
                Err(_) => Delivery::Unwanted,
            },
            None => {
                self.orphans += 1;
                Delivery::Orphan
            }
        }
    }

    /// How many PIDs are watched.
    #[cfg(test)]
    pub fn watched(&self) -> usize {
        self.watched.len()
    }

    /// How many orphans were reaped so far.
    #[cfg(test)]
    pub fn orphans(&self) -> u64 {
        self.orphans
    }
}

/// The process's reaper (one per process: it waits for any child).
#[derive(Debug, Clone)]
pub struct Reaper {
    book: Arc<Mutex<Book>>,
}

/// The bookkeeping, locked: nothing is reaped while it lives. See the module docs.
#[derive(Debug)]
pub struct SpawnGuard<'a>(MutexGuard<'a, Book>);

impl SpawnGuard<'_> {
    /// Registers interest in the end of `pid`, a child just spawned.
    pub fn watch(&mut self, pid: i32) -> oneshot::Receiver<Exit> {
        self.0.watch(pid)
    }
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task (needs a tokio runtime), after
    /// one pass for children that ended before.
    pub fn start() -> io::Result<Self> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Self {
            book: Arc::new(Mutex::new(Book::default())),
        };
        reaper.reap();
        let task = reaper.clone();
        tokio::spawn(async move {
            while sigchld.recv().await.is_some() {
                task.reap();
            }
        });
        Ok(reaper)
    }

    /// Locks the bookkeeping for a spawn: spawn, then [`SpawnGuard::watch`], then drop the guard.
    pub fn lock(&self) -> SpawnGuard<'_> {
        SpawnGuard(self.book())
    }

    /// How many orphans were reaped so far.
    #[cfg(test)]
    pub fn orphans(&self) -> u64 {
        self.book().orphans()
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding it aborts the process (panic = "abort"): no poisoned state to see.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for every child that has ended, without blocking.
    fn reap(&self) {
        let mut book = self.book();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    if let Some((pid, exit)) = Exit::from_wait_status(status) {
                        let delivery = book.on_exit(pid, exit);
                        tracing::debug!(pid, ?exit, ?delivery, "reaped");
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    tracing::warn!(%errno, "waitpid(-1) failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nix::sys::signal::Signal;

    use super::*;

    #[test]
    fn bookkeeping() {
        let mut book = Book::default();
        let mut rx = book.watch(10);
        let dropped = book.watch(11);
        drop(dropped);
        assert_eq!(book.watched(), 2);

        assert_eq!(book.on_exit(10, Exit::Code(3)), Delivery::Delivered);
        assert_eq!(rx.try_recv().unwrap(), Exit::Code(3));
        assert_eq!(book.on_exit(11, Exit::Signal(9)), Delivery::Unwanted);
        assert_eq!(book.on_exit(12, Exit::Code(0)), Delivery::Orphan);
        // Each PID is delivered once: a second status of a reused PID is an orphan's.
        assert_eq!(book.on_exit(10, Exit::Code(0)), Delivery::Orphan);
        assert_eq!(book.watched(), 0);
        assert_eq!(book.orphans(), 2);
    }

    #[test]
    fn a_new_watch_replaces_the_old_one() {
        let mut book = Book::default();
        let mut old = book.watch(7);
        let mut new = book.watch(7);
        assert_eq!(book.on_exit(7, Exit::Code(1)), Delivery::Delivered);
        assert_eq!(new.try_recv().unwrap(), Exit::Code(1));
        assert!(old.try_recv().is_err());
    }

    #[test]
    fn wait_statuses() {
        let pid = Pid::from_raw(42);
        assert_eq!(
            Exit::from_wait_status(WaitStatus::Exited(pid, 2)),
            Some((42, Exit::Code(2)))
        );
        assert_eq!(
            Exit::from_wait_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some((42, Exit::Signal(9)))
        );
        assert_eq!(
            Exit::from_wait_status(WaitStatus::Stopped(pid, Signal::SIGSTOP)),
            None
        );
        assert_eq!(Exit::Code(3).as_shell_status(), 3);
        assert_eq!(Exit::Signal(15).as_shell_status(), 143);
    }

    /// The only test of this binary that spawns children: the reaper waits for any child.
    #[tokio::test]
    #[allow(
        clippy::zombie_processes,
        reason = "the reaper under test waits for them"
    )]
    async fn reaps_watched_children_and_orphans() {
        let reaper = Reaper::start().unwrap();
        let watched = {
            let mut guard = reaper.lock();
            let child = std::process::Command::new("sh")
                .args(["-c", "exit 3"])
                .spawn()
                .unwrap();
            guard.watch(i32::try_from(child.id()).unwrap())
        };
        let exit = tokio::time::timeout(Duration::from_secs(10), watched)
            .await
            .expect("reaped in time")
            .unwrap();
        assert_eq!(exit, Exit::Code(3));

        // Not watched: reaped all the same, counted as an orphan.
        let before = reaper.orphans();
        let child = std::process::Command::new("true").spawn().unwrap();
        let stat = format!("/proc/{}", child.id());
        drop(child);
        let t = std::time::Instant::now();
        while reaper.orphans() == before || std::path::Path::new(&stat).exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "orphan not reaped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
