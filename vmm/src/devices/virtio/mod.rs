//! virtio devices and their virtio-mmio transport.
//!
//! The contract between a device and the transport ([`VirtioDevice`]):
//! - The transport ([`mmio::MmioTransport`], on the MMIO bus, driven by vCPU threads) owns the
//!   registers: feature negotiation, queue set-up, status, interrupt status. It reads and writes the
//!   device's config space through the device.
//! - When the driver sets DRIVER_OK, the transport builds one [`virtio_queue::Queue`] per queue from
//!   the driver's addresses, checks them, and calls [`VirtioDevice::activate`] with the guest memory,
//!   the queues, one eventfd per queue (KVM ioeventfds on QueueNotify: the guest's "kick") and an
//!   [`Interrupt`] to raise. A failed activation puts the device in DEVICE_NEEDS_RESET.
//! - Activation runs on a vCPU thread, but device I/O runs on the VMM's event loop thread
//!   (event-manager): every device is also a `MutEventSubscriber`, registered at build time with an
//!   eventfd of its own ([`VirtioDevice::activate`] signals it) so that the event loop can register the
//!   queue eventfds and backend fds (`EventOps`) on the right thread. [`VirtioDevice::reset`] does the
//!   same in reverse.
//! - The device raises interrupts with [`Interrupt::trigger`]: it sets the InterruptStatus bit and
//!   signals the device's irqfd.

pub mod balloon;
pub mod block;
pub mod fs;
pub mod mmio;
#[cfg(test)]
mod test_utils;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: a modern (virtio 1.x) device. Every Hull device offers it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: each side tells the other which ring index it next wants to hear
/// about, so kicks and interrupts are suppressed while the other side is still busy. Under nested
/// virtualization every kick and interrupt is a costly exit: this matters.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_IN_ORDER`.
pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;

/// virtio device ids.
pub mod device_type {
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
    /// virtio-balloon.
    pub const BALLOON: u32 = 5;
    /// virtio-vsock.
    pub const VSOCK: u32 = 19;
    /// virtio-fs.
    pub const FS: u32 = 26;
}

/// Reads `data.len()` bytes of a device's config space `config` from `offset`, as the transport
/// asks: bytes past its end (or an offset that overflows) read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// Why an interrupt is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptType {
    /// A used ring was updated (InterruptStatus bit 0).
    Queue,
    /// The configuration changed (InterruptStatus bit 1).
    Config,
}

impl InterruptType {
    /// The InterruptStatus bit.
    pub fn status_bit(self) -> u32 {
        match self {
            Self::Queue => 1,
            Self::Config => 2,
        }
    }
}

/// A device's interrupt: the InterruptStatus register it shares with the transport, and the irqfd
/// that injects its GSI.
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: EventFd,
    sticky: AtomicU32,
}

impl Interrupt {
    /// An interrupt setting bits in `status` and signalling `irqfd`.
    pub fn new(status: Arc<AtomicU32>, irqfd: EventFd) -> Self {
        Self {
            status,
            irqfd,
            sticky: AtomicU32::new(0),
        }
    }

    /// The irqfd, for a vhost-user backend that raises the interrupt itself.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Makes `kind`'s InterruptStatus bit read as set until the next reset: for a vhost-user
    /// backend, which signals the irqfd but cannot set the register.
    pub fn set_sticky(&self, kind: InterruptType) {
        self.sticky.fetch_or(kind.status_bit(), Ordering::AcqRel);
    }

    /// The bits [`Interrupt::set_sticky`] set.
    pub fn sticky(&self) -> u32 {
        self.sticky.load(Ordering::Acquire)
    }

    /// Clears the sticky bits (a device reset).
    pub fn clear_sticky(&self) {
        self.sticky.store(0, Ordering::Release);
    }

    /// Raises the interrupt.
    pub fn trigger(&self, kind: InterruptType) -> std::io::Result<()> {
        self.status.fetch_or(kind.status_bit(), Ordering::AcqRel);
        self.irqfd.write(1)
    }

    /// The current InterruptStatus (for tests).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
}

/// A device could not start with what the driver set up.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// Wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// What the device needs.
        expected: usize,
        /// What it was given.
        got: usize,
    },
    /// The device's own set-up failed.
    #[error("device activation failed: {0}")]
    Device(String),
    /// Signalling the event loop failed.
    #[error("cannot signal the event loop: {0}")]
    Signal(std::io::Error),
}

/// What the transport hands the device when the driver sets DRIVER_OK.
pub struct ActivateArgs {
    /// Guest memory (cheap to clone: the regions are shared).
    pub mem: GuestMemoryMmap,
    /// The queues, in index order, checked valid.
    pub queues: Vec<virtio_queue::Queue>,
    /// One eventfd per queue (`EFD_NONBLOCK`), signalled when the guest kicks that queue.
    pub queue_evts: Vec<EventFd>,
    /// The interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind a transport. See the module docs for the threading contract.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Reads the device-specific config space at `offset`. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device. Called once per driver initialisation (normally after a
    /// [`VirtioDevice::reset`], but a device must cope with a second call without one).
    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError>;
    /// Stops the device after a driver reset: drops its queues, connections and interrupt; a new
    /// [`VirtioDevice::activate`] may follow.
    fn reset(&mut self);
}
