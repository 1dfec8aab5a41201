//! Places virtio-mmio devices: a 4 KiB MMIO window each in the 32-bit gap, a GSI each, their KVM
//! irqfd and ioeventfds, and the DSDT entry that tells the guest about them (Debian's kernels have
//! no `virtio_mmio.device=` parsing: ACPI `LNRO0005` devices are how they find virtio-mmio).

use std::sync::{Arc, Mutex};

use acpi_tables::aml;
use acpi_tables::Aml;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::DsdtEntry;
use crate::arch::layout::{IOAPIC_START, MMIO_GAP_START};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use crate::devices::virtio::VirtioDevice;
use crate::kvm::bus::{Bus, BusOverlap};

/// First GSI for virtio devices (0-4 are legacy: timer, keyboard, cascade, COM2, COM1).
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Last usable GSI of the IOAPIC (24 pins).
pub const LAST_GSI: u32 = 23;

/// Failed to place a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// No GSI or MMIO space left.
    #[error("no room for another virtio device (at most {} are supported)", LAST_GSI - FIRST_VIRTIO_GSI + 1)]
    Full,
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for a virtio device: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("KVM {0} for the virtio device at {1:#x} failed: {2}")]
    Kvm(&'static str, u64, kvm_ioctls::Error),
    /// The MMIO window overlaps another device.
    #[error(transparent)]
    Bus(#[from] BusOverlap),
}

/// Where a virtio-mmio device was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Index (names the ACPI device `V000`, `V001`, …).
    pub index: u32,
    /// Base of its MMIO window.
    pub base: u64,
    /// Its GSI.
    pub gsi: u32,
}

impl DsdtEntry for MmioSlot {
    fn append_aml(&self, bytes: &mut Vec<u8>) {
        let path = format!("_SB_.V{:03X}", self.index);
        aml::Device::new(
            path.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &self.index),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, self.base as u32, MMIO_WINDOW as u32),
                        &aml::Interrupt::new(true, true, false, false, self.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(bytes);
    }
}

/// Hands out MMIO windows and GSIs and wires devices to KVM and the MMIO bus.
pub struct MmioDeviceManager {
    next: u32,
    slots: Vec<MmioSlot>,
}

impl Default for MmioDeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl MmioDeviceManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self {
            next: 0,
            slots: Vec::new(),
        }
    }

    /// The devices placed so far, for the DSDT.
    pub fn slots(&self) -> &[MmioSlot] {
        &self.slots
    }

    fn allocate(&mut self) -> Result<MmioSlot, DeviceManagerError> {
        let gsi = FIRST_VIRTIO_GSI + self.next;
        let base = MMIO_GAP_START + u64::from(self.next) * MMIO_WINDOW;
        if gsi > LAST_GSI || base + MMIO_WINDOW > IOAPIC_START {
            return Err(DeviceManagerError::Full);
        }
        let slot = MmioSlot {
            index: self.next,
            base,
            gsi,
        };
        self.next += 1;
        Ok(slot)
    }

    /// Puts `device` behind a new virtio-mmio transport: irqfd on its GSI, an ioeventfd per queue
    /// on QueueNotify, and the window on `bus`.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        bus: &mut Bus,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<MmioSlot, DeviceManagerError> {
        let slot = self.allocate()?;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&irqfd, slot.gsi)
            .map_err(|e| DeviceManagerError::Kvm("irqfd", slot.base, e))?;
        let transport =
            MmioTransport::new(device, mem.clone(), irqfd).map_err(DeviceManagerError::EventFd)?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY),
                i as u32,
            )
            .map_err(|e| DeviceManagerError::Kvm("ioeventfd", slot.base, e))?;
        }
        bus.insert(Arc::new(Mutex::new(transport)), slot.base, MMIO_WINDOW)?;
        self.slots.push(slot);
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_bounded() {
        let mut m = MmioDeviceManager::new();
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        assert_eq!((a.base, a.gsi), (MMIO_GAP_START, FIRST_VIRTIO_GSI));
        assert_eq!(
            (b.base, b.gsi),
            (MMIO_GAP_START + MMIO_WINDOW, FIRST_VIRTIO_GSI + 1)
        );
        let mut n = 2;
        while m.allocate().is_ok() {
            n += 1;
        }
        assert_eq!(n, LAST_GSI - FIRST_VIRTIO_GSI + 1);
    }

    #[test]
    fn dsdt_entry_names_the_window_and_irq() {
        let slot = MmioSlot {
            index: 10,
            base: 0xd000_a000,
            gsi: 15,
        };
        let mut aml = Vec::new();
        slot.append_aml(&mut aml);
        let has = |n: &[u8]| aml.windows(n.len()).any(|w| w == n);
        assert!(has(b"V00A"));
        assert!(has(b"LNRO0005\0"));
        assert!(has(&0xd000_a000u32.to_le_bytes()), "Memory32Fixed base");
        assert!(has(&0x1000u32.to_le_bytes()), "window length");
        assert!(has(&15u32.to_le_bytes()), "extended interrupt number");
    }
}
