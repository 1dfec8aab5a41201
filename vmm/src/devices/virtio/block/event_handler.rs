//! The block device on the VMM's event loop (event-manager's `MutEventSubscriber`).
//!
//! Two sources, told apart by the `data` of their epoll registration ([`Events::with_data`]):
//! - [`TOKEN_ACTIVATE`]: the device's own eventfd. `activate` and `reset` run on a vCPU thread and
//!   cannot touch the event loop's interest list; they store the new queue eventfd (or retire the
//!   old one) and signal this eventfd, and `process` then registers the new kick and unregisters
//!   (and only then closes) retired ones here, on the right thread, and takes any requests
//!   already queued;
//! - [`TOKEN_QUEUE`]: the guest's kick of the request queue. An event from an eventfd other than
//!   the current one (retired by a reset in the same epoll batch) is ignored.

use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;

/// The device's activation/reset eventfd.
pub const TOKEN_ACTIVATE: u32 = 0;
/// The request queue's kick.
pub const TOKEN_QUEUE: u32 = 1;

impl Block {
    /// Brings the interest list in line with the device: retired kicks out, the current one in.
    fn sync_event_loop(&mut self, ops: &mut EventOps) {
        for evt in self.retired_evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                tracing::warn!("virtio-blk: cannot unregister a retired queue eventfd: {e:?}");
            }
            // `evt` closes here, no longer watched.
        }
        if let Some(evt) = &self.queue_evt {
            if !self.queue_evt_registered {
                match ops.add(Events::with_data(evt, TOKEN_QUEUE, EventSet::IN)) {
                    Ok(()) => self.queue_evt_registered = true,
                    Err(e) => {
                        tracing::error!("virtio-blk: cannot register the queue eventfd: {e:?}")
                    }
                }
            }
        }
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!("virtio-blk: cannot register with the event loop: {e:?}");
        }
        self.sync_event_loop(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                // Non-blocking; EAGAIN just means a batch of signals was already read.
                let _ = self.activate_evt.read();
                self.sync_event_loop(ops);
                self.process_queue();
            }
            TOKEN_QUEUE => {
                let current = self
                    .queue_evt
                    .as_ref()
                    .filter(|evt| evt.as_raw_fd() == events.fd());
                if let Some(evt) = current {
                    let _ = evt.read();
                    self.process_queue();
                }
            }
            token => tracing::warn!(token, "virtio-blk: event with an unknown token"),
        }
    }
}
