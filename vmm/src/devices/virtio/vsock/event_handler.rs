//! The vsock device on the VMM's event loop (event-manager's `MutEventSubscriber`).
//!
//! Sources, told apart by the `data` of their epoll registration ([`Events::with_data`]):
//! - [`TOKEN_ACTIVATE`]: the device's own eventfd. [`super::Vsock`]'s `activate` and `reset`
//!   run on a vCPU thread and cannot touch the event loop's interest list; they queue the
//!   registrations (queue eventfds in, stale fds out) and signal this eventfd, and the next
//!   `process` applies them here, on the right thread;
//! - [`TOKEN_RXQ`], [`TOKEN_TXQ`], [`TOKEN_EVQ`]: the guest's kicks of the three queues;
//! - [`TOKEN_LISTENER`]: the host Unix listener (edge-triggered; accepts until it would block);
//! - [`TOKEN_TIMER`]: a timerfd armed for the earliest stream deadline;
//! - [`FIRST_STREAM_TOKEN`] and up: one per host socket (edge-triggered, see `csm`).
//!
//! Stream tokens are never reused while their socket lives, so an event for a socket that was
//! closed earlier in the same epoll batch cannot be mistaken for a newer socket that got the
//! same fd number. A socket leaves the interest list before it is closed: the muxer hands
//! closed sockets to an [`FdTable`] which unregisters them and only then drops them, because
//! event-manager keeps its own fd-to-subscriber map that a silently closed fd would corrupt.

use std::os::unix::io::{AsRawFd, RawFd};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Vsock;

/// The device's activation/reset eventfd.
pub const TOKEN_ACTIVATE: u32 = 0;
/// The rx queue's kick.
pub const TOKEN_RXQ: u32 = 1;
/// The tx queue's kick.
pub const TOKEN_TXQ: u32 = 2;
/// The event queue's kick.
pub const TOKEN_EVQ: u32 = 3;
/// The host listener socket.
pub const TOKEN_LISTENER: u32 = 4;
/// The deadline timer.
pub const TOKEN_TIMER: u32 = 5;
/// The first token given to a host socket.
pub const FIRST_STREAM_TOKEN: u32 = 16;

/// What a host stream socket is registered for: edge-triggered input, output and peer
/// shutdown (HUP and ERR are always reported).
pub fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// The event loop's interest list, as the device needs it.
pub trait FdRegistry {
    /// Starts watching `fd` for `events`, tagged with `token`.
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet) -> Result<(), String>;
    /// Stops watching `fd`.
    fn remove(&mut self, fd: RawFd) -> Result<(), String>;
}

impl FdRegistry for EventOps<'_> {
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet) -> Result<(), String> {
        EventOps::add(self, Events::with_data_raw(fd, token, events)).map_err(|e| e.to_string())
    }

    fn remove(&mut self, fd: RawFd) -> Result<(), String> {
        EventOps::remove(self, Events::empty_raw(fd)).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdChange {
    Add {
        fd: RawFd,
        token: u32,
        events: EventSet,
    },
    Remove {
        fd: RawFd,
        token: u32,
    },
}

/// Interest-list changes waiting for the event loop, and the fds to close once they are
/// unregistered.
#[derive(Default)]
pub struct FdTable {
    changes: Vec<FdChange>,
    closing: Vec<Box<dyn AsRawFd + Send>>,
}

impl FdTable {
    /// Queues the registration of `fd`.
    pub fn add(&mut self, fd: &dyn AsRawFd, token: u32, events: EventSet) {
        self.changes.push(FdChange::Add {
            fd: fd.as_raw_fd(),
            token,
            events,
        });
    }

    /// Queues the unregistration of `owner`'s fd; `owner` is dropped (closing the fd) after.
    pub fn close<T: AsRawFd + Send + 'static>(&mut self, owner: T, token: u32) {
        self.changes.push(FdChange::Remove {
            fd: owner.as_raw_fd(),
            token,
        });
        self.closing.push(Box::new(owner));
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.closing.is_empty()
    }

    /// Applies the queued changes in order, then closes the fds that left.
    pub fn apply(&mut self, reg: &mut dyn FdRegistry) {
        for change in self.changes.drain(..) {
            let res = match change {
                FdChange::Add { fd, token, events } => reg.add(fd, token, events),
                FdChange::Remove { fd, .. } => reg.remove(fd),
            };
            if let Err(e) = res {
                tracing::warn!(?change, "vsock: event loop registration failed: {e}");
            }
        }
        self.closing.clear();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let fixed = [
            (self.activate_evt.as_raw_fd(), TOKEN_ACTIVATE, EventSet::IN),
            // Edge-triggered: the muxer accepts until EWOULDBLOCK, and a persistent accept()
            // error (EMFILE) then waits for the next client instead of spinning.
            (
                self.muxer.listener_fd(),
                TOKEN_LISTENER,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.timer.as_raw_fd(), TOKEN_TIMER, EventSet::IN),
        ];
        for (fd, token, events) in fixed {
            if let Err(e) = FdRegistry::add(ops, fd, token, events) {
                tracing::error!(token, "vsock: cannot register with the event loop: {e}");
            }
        }
        self.sync_event_loop(ops, Instant::now());
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let now = Instant::now();
        let set = events.event_set();
        match events.data() {
            TOKEN_ACTIVATE => self.on_activate_event(now),
            TOKEN_RXQ => self.on_queue_event(0, events.fd(), now),
            TOKEN_TXQ => self.on_queue_event(1, events.fd(), now),
            TOKEN_EVQ => self.on_queue_event(2, events.fd(), now),
            TOKEN_LISTENER => self.on_listener_event(now),
            TOKEN_TIMER => self.on_timer_event(now),
            token if token >= FIRST_STREAM_TOKEN => self.on_stream_event(token, set, now),
            token => tracing::warn!(token, "vsock: event with an unknown token"),
        }
        self.sync_event_loop(ops, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[derive(Default)]
    struct Recorder {
        log: Vec<String>,
        /// Whether each fd was still open when it was removed.
        open_at_removal: Vec<bool>,
    }

    impl FdRegistry for Recorder {
        fn add(&mut self, fd: RawFd, token: u32, _events: EventSet) -> Result<(), String> {
            self.log.push(format!("add {fd} {token}"));
            Ok(())
        }

        fn remove(&mut self, fd: RawFd) -> Result<(), String> {
            self.log.push(format!("remove {fd}"));
            let open = std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok();
            self.open_at_removal.push(open);
            Ok(())
        }
    }

    #[test]
    fn changes_apply_in_order_and_fds_close_after_removal() {
        let (a, b) = UnixStream::pair().unwrap();
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        let mut t = FdTable::default();
        t.add(&a, 16, stream_events());
        t.close(a, 16);
        t.add(&b, 17, stream_events());
        assert!(!t.is_empty());
        let mut r = Recorder::default();
        t.apply(&mut r);
        assert_eq!(
            r.log,
            vec![
                format!("add {fa} 16"),
                format!("remove {fa}"),
                format!("add {fb} 17")
            ]
        );
        assert_eq!(r.open_at_removal, vec![true]);
        assert!(t.is_empty());
        // `a` is closed now: its peer sees EOF.
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &b, &mut buf).unwrap(), 0);
    }
}
