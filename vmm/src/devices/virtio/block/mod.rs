//! virtio-blk (device id 2): a raw disk image or host block device as the guest's `/dev/vdX`.
//!
//! One request queue (0). Each descriptor chain is one request (header, data, status byte; see
//! [`request`]), carried out synchronously against the disk ([`backend`]) and returned to the used
//! ring with its status. The config space is the start of `struct virtio_blk_config` (virtio 1.2,
//! 5.2.4): `capacity` (le64, in 512-byte sectors), `size_max` (le32, 0: not offered) and `seg_max`
//! (le32); the rest reads as zero, as the features that would give it meaning are not offered.
//!
//! Features: `VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_EVENT_IDX`, `VIRTIO_BLK_F_FLUSH` (the guest
//! keeps a write-back cache and sends FLUSH on `fsync`; FLUSH is `fdatasync`),
//! `VIRTIO_BLK_F_SEG_MAX` (without it Linux puts a single data segment in each request), and
//! `VIRTIO_BLK_F_RO` for a read-only drive (Linux then marks the disk read-only and refuses
//! writes itself; a write that arrives anyway fails with `VIRTIO_BLK_S_IOERR` and writes nothing).
//! `VIRTIO_BLK_T_GET_ID` returns the drive's serial, NUL-padded to 20 bytes (Linux shows it in
//! `/sys/block/vdX/serial`).
//!
//! Threading ([`crate::devices::virtio`]): [`VirtioDevice::activate`] and [`VirtioDevice::reset`]
//! run on a vCPU thread; they only store the queue, its eventfd and the interrupt and signal the
//! device's own eventfd. The event-loop thread then registers (or unregisters) the queue eventfd
//! ([`event_handler`]) and does all queue and disk I/O. Disk I/O is synchronous on that thread:
//! a slow disk delays the other devices' events by as much.

pub mod backend;
pub mod event_handler;
pub mod request;

use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::{DiskError, DiskFile};
use self::request::{status, Request, ID_BYTES};
use super::{
    device_type, ActivateArgs, ActivateError, Interrupt, InterruptType, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Most data segments in one request: a request also needs a header and a status descriptor,
/// and (no indirect descriptors) all of them must fit in the ring.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in the config space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_FLUSH`: the device takes `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Length of the config space this device fills in (capacity, size_max, seg_max).
const CONFIG_LEN: usize = 16;

/// The block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Creating the device's eventfd failed.
    #[error("cannot create the block device's eventfd: {0}")]
    EventFd(std::io::Error),
}

/// What an activated device works with.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The virtio-blk device. Share it as `Arc<Mutex<Block>>` between the transport (as a
/// [`VirtioDevice`]) and the event manager (as a `MutEventSubscriber`).
pub struct Block {
    disk: DiskFile,
    read_only: bool,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_LEN],
    activate_evt: EventFd,
    active: Option<Active>,
    /// The queue's kick, from the last activation.
    queue_evt: Option<EventFd>,
    /// Whether the event loop watches `queue_evt` yet.
    queue_evt_registered: bool,
    /// Kicks of earlier activations still on the event loop's interest list: kept open until the
    /// loop removes them (event-manager maps fds to subscribers; a silently closed fd would
    /// corrupt that map).
    retired_evts: Vec<EventFd>,
}

impl Block {
    /// A block device on the image or block device at `path`, read-only or read-write, whose
    /// GET_ID answer is `serial` (cut at 20 bytes, NUL-padded).
    pub fn new(path: &Path, read_only: bool, serial: &[u8]) -> Result<Self, BlockError> {
        let disk = DiskFile::open(path, read_only)?;
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Self {
            disk,
            read_only,
            id,
            config,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            active: None,
            queue_evt: None,
            queue_evt_registered: false,
            retired_evts: Vec::new(),
        })
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    /// Whether the drive is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Takes every request the guest queued, then interrupts it if it wants to know.
    fn process_queue(&mut self) {
        let Self {
            active,
            disk,
            read_only,
            id,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let capacity = disk.sectors();
        // No kicks while we are busy anyway (without EVENT_IDX; with it, the guest kicks only
        // past the avail_event index re-armed below).
        let _ = a.queue.disable_notification(&a.mem);
        let mut used = false;
        let mut rechecked = false;
        loop {
            let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) else {
                // Re-arm the guest's kick; requests queued meanwhile are taken now. Only once in
                // a row: a corrupt avail index makes the queue look non-empty yet yield nothing.
                if !rechecked && a.queue.enable_notification(&a.mem).unwrap_or(false) {
                    rechecked = true;
                    continue;
                }
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            let len = complete(chain, &a.mem, disk, *read_only, id, capacity);
            if let Err(e) = a.queue.add_used(&a.mem, head, len) {
                tracing::warn!("virtio-blk: add_used failed: {e}");
            }
            used = true;
        }
        if used && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            if let Err(e) = a.interrupt.trigger(InterruptType::Queue) {
                tracing::warn!("virtio-blk: cannot raise the queue interrupt: {e}");
            }
        }
    }

    fn deactivate(&mut self) {
        self.active = None;
        if let Some(evt) = self.queue_evt.take() {
            if self.queue_evt_registered {
                self.retired_evts.push(evt);
            }
        }
        self.queue_evt_registered = false;
    }
}

/// Parses and carries out one request, writes its status; returns the used length (0 when there
/// was nowhere to put a status).
fn complete(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &mut DiskFile,
    read_only: bool,
    id: &[u8; ID_BYTES],
    capacity: u64,
) -> u32 {
    let (status_addr, status, written) = match Request::parse(chain, mem, capacity) {
        Ok(req) => {
            let out = req.execute(mem, disk, read_only, id);
            (Some(req.status), out.status, out.written)
        }
        Err(m) => {
            tracing::debug!("virtio-blk: malformed request: {}", m.error);
            (m.status, status::IOERR, 0)
        }
    };
    let Some(addr) = status_addr else {
        return 0;
    };
    match mem.write_obj(status, addr) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            tracing::debug!("virtio-blk: cannot write the status byte: {e}");
            0
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // `writeback` is only writable with VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio-blk: ignoring a config write"
        );
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        let expected = QUEUE_SIZES.len();
        for got in [args.queues.len(), args.queue_evts.len()] {
            if got != expected {
                return Err(ActivateError::QueueCount { expected, got });
            }
        }
        self.deactivate();
        let (Some(queue), Some(evt)) = (
            args.queues.into_iter().next(),
            args.queue_evts.into_iter().next(),
        ) else {
            return Err(ActivateError::QueueCount { expected, got: 0 });
        };
        self.queue_evt = Some(evt);
        self.active = Some(Active {
            mem: args.mem,
            queue,
            interrupt: args.interrupt,
        });
        tracing::debug!(
            path = %self.disk.path().display(),
            features = format_args!("{:#x}", args.acked_features),
            "virtio-blk: activated"
        );
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        self.deactivate();
        if let Err(e) = self.activate_evt.write(1) {
            tracing::warn!("virtio-blk: cannot signal the event loop after reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
