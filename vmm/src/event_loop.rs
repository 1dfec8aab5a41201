//! The VMM's one event loop for device I/O, on its own thread apart from the vCPUs: rust-vmm's
//! event-manager over epoll. Devices are subscribers; a stop eventfd ends the loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How subscribers are held: shared with the vCPU side (a device's transport), each behind a mutex.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Failed to start the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll or eventfd creation.
    #[error("cannot create the device event loop: {0}")]
    Create(String),
    /// The thread.
    #[error("cannot spawn the device event loop thread: {0}")]
    Spawn(std::io::Error),
}

struct Stopper {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the event loop's stop eventfd");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::Release);
    }
}

/// Builds the event loop: add subscribers, then [`EventLoopBuilder::spawn`].
pub struct EventLoopBuilder {
    manager: EventManager<Subscriber>,
}

impl EventLoopBuilder {
    /// An empty loop.
    pub fn new() -> Result<Self, EventLoopError> {
        let manager = EventManager::new().map_err(|e| EventLoopError::Create(format!("{e:?}")))?;
        Ok(Self { manager })
    }

    /// Adds a subscriber (its `init` runs now, on this thread).
    pub fn add(&mut self, s: Subscriber) {
        self.manager.add_subscriber(s);
    }

    /// Starts the loop's thread.
    pub fn spawn(mut self) -> Result<EventLoop, EventLoopError> {
        let stop = Arc::new(AtomicBool::new(false));
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| EventLoopError::Create(e.to_string()))?;
        let stopper = Stopper {
            evt: evt
                .try_clone()
                .map_err(|e| EventLoopError::Create(e.to_string()))?,
            stop: stop.clone(),
        };
        self.manager.add_subscriber(Arc::new(Mutex::new(stopper)));
        let handle = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if let Err(e) = self.manager.run() {
                        tracing::error!(error = ?e, "device event loop failed");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoop {
            handle: Some(handle),
            stop: evt,
        })
    }
}

/// The running loop; stopped and joined on drop.
pub struct EventLoop {
    handle: Option<JoinHandle<()>>,
    stop: EventFd,
}

impl EventLoop {
    /// Stops the loop and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.stop.write(1);
            let _ = h.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo {
        evt: EventFd,
        seen: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Echo {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _e: Events, _ops: &mut EventOps) {
            let n = self.evt.read().unwrap();
            self.seen.send(n).unwrap();
        }
    }

    #[test]
    fn dispatches_on_its_thread_and_stops() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut b = EventLoopBuilder::new().unwrap();
        b.add(Arc::new(Mutex::new(Echo {
            evt: evt.try_clone().unwrap(),
            seen: tx,
        })));
        let mut lp = b.spawn().unwrap();
        evt.write(3).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(),
            3
        );
        lp.stop();
        assert!(lp.handle.is_none());
    }
}
