//! virtio-vsock (device id 19) with a Firecracker-compatible "hybrid vsock" host side.
//!
//! The guest sees a standard virtio-vsock device and uses AF_VSOCK sockets; the host side is
//! AF_UNIX, mediated in user space by this device (no vhost-vsock, no host kernel module):
//! host programs connect to the device's Unix socket and ask for a guest port
//! (`CONNECT <port>\n`, answered `OK <host port>\n`), and guest connections to the host's
//! port `P` are forwarded to the Unix socket `<uds_path>_<P>`. Firecracker's docs/vsock.md
//! describes the same protocol, which Kata's runtimes speak.
//!
//! Three queues: rx (0) carries packets to the guest, tx (1) packets from it, and the event
//! queue (2) is for transport-reset events this device never sends. The config space is the
//! guest's CID, a little-endian u64.
//!
//! Module map:
//! - [`packet`]: the packet header and its reading and writing over descriptor chains of any
//!   layout;
//! - [`csm`]: one stream's state machine and credit-based flow control;
//! - [`muxer`]: the Unix listener, the `CONNECT` handshake, guest-initiated connects, routing
//!   packets to streams and queueing packets for the guest;
//! - [`event_handler`]: the event-manager subscriber: which fds are watched and why.
//!
//! Threading ([`crate::devices::virtio`]): [`VirtioDevice::activate`] and
//! [`VirtioDevice::reset`] run on a vCPU thread and only store state and queue interest-list
//! changes; all socket and queue I/O runs in `process` on the event-loop thread.

pub mod csm;
pub mod event_handler;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod test_utils;

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use self::event_handler::{FdRegistry, TOKEN_RXQ};
use self::muxer::Muxer;
use self::packet::{read_tx_packet, PacketError, RxBuffer, HDR_LEN};
use super::{
    device_type, ActivateArgs, ActivateError, Interrupt, InterruptType, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Index of the rx queue (device to guest).
pub const RXQ: usize = 0;
/// Index of the tx queue (guest to device).
pub const TXQ: usize = 1;
/// Index of the event queue.
pub const EVQ: usize = 2;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// The vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or does not fit a 32-bit vsock address.
    #[error("invalid guest CID {0}: must be between 3 and 2^32 - 2")]
    InvalidCid(u64),
    /// The socket's directory does not exist.
    #[error("vsock socket directory {0} does not exist")]
    MissingDirectory(PathBuf),
    /// Something other than a socket is at the socket path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Binding or configuring the listener failed.
    #[error("cannot listen on the vsock socket {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Creating the device's eventfd or timerfd failed.
    #[error("cannot create the vsock device's event fds: {0}")]
    EventFd(std::io::Error),
}

/// What an activated device works with.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The virtio-vsock device. Share it as `Arc<Mutex<Vsock>>` between the transport (as a
/// [`VirtioDevice`]) and the event manager (as a `MutEventSubscriber`).
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// (device, inode) of the socket file we bound, to remove only our own on drop.
    socket_id: Option<(u64, u64)>,
    muxer: Muxer,
    activate_evt: EventFd,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    active: Option<Active>,
    queue_evts: Vec<EventFd>,
    acked_features: u64,
    /// Tx processing waits for the guest to take queued RSTs.
    tx_stalled: bool,
    /// Payload buffer for one packet.
    scratch: Vec<u8>,
}

fn prepare_socket_path(uds_path: &Path) -> Result<(), VsockError> {
    let dir = match uds_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(VsockError::MissingDirectory(dir.to_path_buf()));
    }
    match std::fs::symlink_metadata(uds_path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(uds_path).map_err(|source| VsockError::RemoveStale {
                path: uds_path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(VsockError::NotASocket(uds_path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VsockError::RemoveStale {
            path: uds_path.to_path_buf(),
            source,
        }),
    }
}

impl Vsock {
    /// A vsock device for the guest `guest_cid`, listening for host clients on `uds_path`
    /// (a stale socket there is replaced). Guest connections to host port `P` go to
    /// `<uds_path>_<P>`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        prepare_socket_path(&uds_path)?;
        let listen_err = |source| VsockError::Listen {
            path: uds_path.clone(),
            source,
        };
        let listener = UnixListener::bind(&uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let socket_id = std::fs::symlink_metadata(&uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        let timer = TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?;
        Ok(Self {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path.clone(), listener),
            uds_path,
            socket_id,
            activate_evt,
            timer,
            timer_deadline: None,
            active: None,
            queue_evts: Vec::new(),
            acked_features: 0,
            tx_stalled: false,
            scratch: Vec::with_capacity(packet::MAX_PKT_PAYLOAD),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host socket clients connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Streams open now.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    fn notify(active: &mut Active, queue: usize) {
        let needed = active.queues[queue]
            .needs_notification(&active.mem)
            .unwrap_or(true);
        if needed {
            if let Err(e) = active.interrupt.trigger(InterruptType::Queue) {
                tracing::warn!("vsock: cannot raise the queue interrupt: {e}");
            }
        }
    }

    /// Fills rx buffers with whatever the muxer has for the guest.
    fn process_rx(&mut self, now: Instant) {
        let Self {
            active,
            muxer,
            scratch,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let mut used = false;
        let mut rechecked = false;
        while muxer.has_pending_rx() {
            let Some(chain) = a.queues[RXQ].pop_descriptor_chain(&a.mem) else {
                // No buffers: host sockets stay unread until the guest posts some (rx kick).
                // With EVENT_IDX, ask for that kick; buffers posted meanwhile are used at once.
                // Only once in a row: a corrupt avail index (more than a queue ahead) makes the
                // queue look non-empty yet yield nothing, and must not spin this thread.
                if !rechecked && a.queues[RXQ].enable_notification(&a.mem).unwrap_or(false) {
                    rechecked = true;
                    continue;
                }
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            let len = match RxBuffer::new(&a.mem, chain) {
                Ok(buf) if buf.capacity() >= HDR_LEN => {
                    let Some(hdr) = muxer.recv_pkt(buf.max_payload(), scratch, now) else {
                        a.queues[RXQ].go_to_previous_position();
                        break;
                    };
                    tracing::debug!(?hdr, "vsock: to guest");
                    buf.write_packet(&hdr, scratch).unwrap_or_else(|e| {
                        tracing::warn!("vsock: rx buffer write failed: {e}");
                        0
                    })
                }
                Ok(buf) => {
                    tracing::debug!(cap = buf.capacity(), "vsock: rx buffer too small");
                    0
                }
                Err(e) => {
                    tracing::debug!("vsock: bad rx buffer: {e}");
                    0
                }
            };
            if let Err(e) = a.queues[RXQ].add_used(&a.mem, head, len) {
                tracing::warn!("vsock: rx add_used failed: {e}");
            }
            used = true;
        }
        // Keep the guest's "kick me after this index" current (EVENT_IDX).
        let _ = a.queues[RXQ].enable_notification(&a.mem);
        if used {
            Self::notify(a, RXQ);
        }
    }

    /// Handles every packet the guest queued, then whatever that produced for the guest.
    fn process_tx(&mut self, now: Instant) {
        let Self {
            active,
            muxer,
            scratch,
            tx_stalled,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        *tx_stalled = false;
        let mut used = false;
        let mut rechecked = false;
        'passes: loop {
            if muxer.rst_backlog_full() {
                // Each packet may need an RST back: wait for the guest to take some.
                *tx_stalled = true;
                break;
            }
            let Some(chain) = a.queues[TXQ].pop_descriptor_chain(&a.mem) else {
                // Re-arm the guest's kick (EVENT_IDX); packets queued meanwhile are taken now.
                // Once in a row (see process_rx).
                if !rechecked && a.queues[TXQ].enable_notification(&a.mem).unwrap_or(false) {
                    rechecked = true;
                    continue 'passes;
                }
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            match read_tx_packet(&a.mem, chain, scratch) {
                Ok(hdr) => {
                    tracing::debug!(?hdr, "vsock: from guest");
                    muxer.send_pkt(&hdr, scratch, now);
                }
                Err(PacketError::BadLen { hdr, available }) => {
                    tracing::debug!(?hdr, available, "vsock: bad packet length");
                    muxer.reject(&hdr);
                }
                Err(e) => tracing::debug!("vsock: dropping a tx buffer: {e}"),
            }
            if let Err(e) = a.queues[TXQ].add_used(&a.mem, head, 0) {
                tracing::warn!("vsock: tx add_used failed: {e}");
            }
            used = true;
        }
        if used {
            Self::notify(a, TXQ);
        }
        self.process_rx(now);
    }

    /// The activation eventfd fired (activate or reset happened).
    fn on_activate_event(&mut self, now: Instant) {
        // Non-blocking; EAGAIN just means a batch of signals was already read.
        let _ = self.activate_evt.read();
        self.process_rx(now);
        self.process_tx(now);
    }

    /// The guest kicked queue `index`; `fd` is the fd the event came from.
    fn on_queue_event(&mut self, index: usize, fd: RawFd, now: Instant) {
        match self.queue_evts.get(index) {
            // Only drain the eventfd we registered (the event may be stale after a reset).
            Some(evt) if evt.as_raw_fd() == fd => {
                let _ = evt.read();
            }
            _ => return,
        }
        match index {
            RXQ => {
                self.process_rx(now);
                if self.tx_stalled {
                    self.process_tx(now);
                }
            }
            TXQ => self.process_tx(now),
            _ => {}
        }
    }

    fn on_listener_event(&mut self, now: Instant) {
        self.muxer.accept(now);
        self.process_rx(now);
    }

    fn on_stream_event(&mut self, token: u32, set: EventSet, now: Instant) {
        self.muxer.handle_event(token, set, now);
        self.process_rx(now);
    }

    fn on_timer_event(&mut self, now: Instant) {
        // Disarming also clears the expiration count, so the timerfd stops being readable
        // without a (possibly blocking) read.
        if let Err(e) = self.timer.clear() {
            tracing::warn!("vsock: cannot disarm the timer: {e}");
        }
        self.timer_deadline = None;
        self.muxer.sweep(now);
        self.process_rx(now);
    }

    /// Applies queued interest-list changes and arms the timer for the next deadline.
    fn sync_event_loop(&mut self, reg: &mut dyn FdRegistry, now: Instant) {
        self.muxer.fds.apply(reg);
        let next = self.muxer.next_deadline();
        if next == self.timer_deadline {
            return;
        }
        let res = match next {
            Some(d) => {
                let delay = d
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
                self.timer.reset(delay, None)
            }
            None => self.timer.clear(),
        };
        match res {
            Ok(()) => self.timer_deadline = next,
            Err(e) => tracing::warn!("vsock: cannot arm the timer: {e}"),
        }
    }

    fn deactivate(&mut self) {
        self.active = None;
        for (i, evt) in self.queue_evts.drain(..).enumerate() {
            self.muxer.fds.close(evt, TOKEN_RXQ + i as u32);
        }
        self.muxer.reset();
        self.tx_stalled = false;
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "vsock: ignoring a config write");
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        let expected = QUEUE_SIZES.len();
        for got in [args.queues.len(), args.queue_evts.len()] {
            if got != expected {
                return Err(ActivateError::QueueCount { expected, got });
            }
        }
        if self.active.is_some() {
            self.deactivate();
        }
        for (i, evt) in args.queue_evts.iter().enumerate() {
            self.muxer.fds.add(evt, TOKEN_RXQ + i as u32, EventSet::IN);
        }
        self.queue_evts = args.queue_evts;
        self.acked_features = args.acked_features;
        self.active = Some(Active {
            mem: args.mem,
            queues: args.queues,
            interrupt: args.interrupt,
        });
        tracing::debug!(cid = self.guest_cid, "vsock: activated");
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        self.deactivate();
        if let Err(e) = self.activate_evt.write(1) {
            tracing::warn!("vsock: cannot signal the event loop after reset: {e}");
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Remove our socket file, unless someone replaced it since.
        let ours = std::fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_id {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

/// Lets tests drive the device without an event loop thread.
#[cfg(test)]
impl Vsock {
    /// Runs deadline expiry as if `now` had come.
    fn expire_deadlines_at(&mut self, now: Instant) {
        self.muxer.sweep(now);
        self.process_rx(now);
        // Have the event loop apply the fd changes.
        self.activate_evt.write(1).unwrap();
    }
}

#[cfg(test)]
mod tests;
