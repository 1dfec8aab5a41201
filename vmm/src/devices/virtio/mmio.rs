//! The virtio-mmio transport, version 2 ("modern"), as in the virtio 1.2 spec §4.2.2.
//!
//! Register map (offsets in the device's 4 KiB window; all 32-bit):
//!
//! | offset | register | | offset | register |
//! |---|---|---|---|---|
//! | 0x000 | MagicValue `virt` | | 0x044 | QueueReady |
//! | 0x004 | Version (2) | | 0x050 | QueueNotify (a KVM ioeventfd per queue) |
//! | 0x008 | DeviceID | | 0x060 | InterruptStatus |
//! | 0x00c | VendorID | | 0x064 | InterruptACK |
//! | 0x010 | DeviceFeatures (by DeviceFeaturesSel 0x014) | | 0x070 | Status |
//! | 0x020 | DriverFeatures (by DriverFeaturesSel 0x024) | | 0x080/0x084 | QueueDesc low/high |
//! | 0x030 | QueueSel | | 0x090/0x094 | QueueDriver (avail) low/high |
//! | 0x034 | QueueNumMax | | 0x0a0/0x0a4 | QueueDevice (used) low/high |
//! | 0x038 | QueueNum | | 0x0fc | ConfigGeneration |
//! | | | | 0x100.. | device config space |
//!
//! The driver's initialisation: reset (status 0), ACKNOWLEDGE, DRIVER, feature negotiation,
//! FEATURES_OK (refused — left clear — if the driver accepted a feature not offered or not
//! `VIRTIO_F_VERSION_1`), queue set-up, DRIVER_OK. At DRIVER_OK the transport checks each queue
//! against guest memory and activates the device. A driver that misprograms the device (invalid
//! queue, activation failure, status out of order) gets DEVICE_NEEDS_RESET and a config interrupt,
//! never a VMM panic. Writing status 0 resets the device and every register, and the driver may
//! initialise it again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateArgs, Interrupt, InterruptType, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::kvm::bus::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c55_4c48; // "HULL"

/// Offset of QueueNotify (for the KVM ioeventfds).
pub const QUEUE_NOTIFY: u64 = 0x50;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits.
pub mod status {
    /// The guest saw the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device failed and must be reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

#[derive(Debug, Default, Clone, Copy)]
struct QueueRegs {
    size: u16,
    ready: bool,
    desc: (u32, u32),
    avail: (u32, u32),
    used: (u32, u32),
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    interrupt_status: Arc<AtomicU32>,
    queue_evts: Vec<EventFd>,
    queue_max: Vec<u16>,
    queues: Vec<QueueRegs>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    /// A transport for `device`, raising interrupts through `irqfd`. Creates one eventfd per queue
    /// (see [`MmioTransport::queue_evts`]).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let queue_max = device
            .lock()
            .expect("device lock")
            .queue_max_sizes()
            .to_vec();
        let queue_evts = queue_max
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let interrupt_status = Arc::new(AtomicU32::new(0));
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(interrupt_status.clone(), irqfd)),
            interrupt_status,
            queues: vec![QueueRegs::default(); queue_max.len()],
            queue_evts,
            queue_max,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
        })
    }

    /// The per-queue eventfds, in queue order: register each as a KVM ioeventfd on
    /// `base + QUEUE_NOTIFY` with the queue index as datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The driver status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn avail_features(&self) -> u64 {
        self.device.lock().expect("device lock").avail_features()
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        // Queue registers may only change before DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn fail(&mut self, why: &str) {
        tracing::warn!(why, "virtio device needs reset");
        self.status |= status::DEVICE_NEEDS_RESET;
        let _ = self.interrupt.trigger(InterruptType::Config);
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.lock().expect("device lock").reset();
            self.activated = false;
        }
        self.queues = vec![QueueRegs::default(); self.queue_max.len()];
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status.store(0, Ordering::Release);
        self.interrupt.clear_sticky();
    }

    fn build_queues(&self) -> Result<Vec<Queue>, String> {
        self.queues
            .iter()
            .zip(&self.queue_max)
            .enumerate()
            .map(|(i, (r, &max))| {
                let mut q = Queue::new(max).map_err(|e| format!("queue {i}: {e:?}"))?;
                if !r.ready {
                    return Err(format!("queue {i} not ready"));
                }
                q.try_set_size(r.size)
                    .map_err(|e| format!("queue {i} size {}: {e:?}", r.size))?;
                let addr =
                    |(lo, hi): (u32, u32)| GuestAddress((u64::from(hi) << 32) | u64::from(lo));
                q.try_set_desc_table_address(addr(r.desc))
                    .map_err(|e| format!("queue {i} descriptor table: {e:?}"))?;
                q.try_set_avail_ring_address(addr(r.avail))
                    .map_err(|e| format!("queue {i} available ring: {e:?}"))?;
                q.try_set_used_ring_address(addr(r.used))
                    .map_err(|e| format!("queue {i} used ring: {e:?}"))?;
                q.set_event_idx(self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(format!(
                        "queue {i}: rings outside guest memory or misaligned"
                    ));
                }
                Ok(q)
            })
            .collect()
    }

    fn activate(&mut self) {
        let queues = match self.build_queues() {
            Ok(q) => q,
            Err(e) => return self.fail(&e),
        };
        let evts = match self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(e) => e,
            Err(e) => return self.fail(&format!("cannot clone queue eventfds: {e}")),
        };
        let args = ActivateArgs {
            mem: self.mem.clone(),
            queues,
            queue_evts: evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        let result = self.device.lock().expect("device lock").activate(args);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => self.fail(&e.to_string()),
        }
    }

    fn set_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            // Bits may only be added (except by a reset).
            return self.fail("driver cleared status bits without a reset");
        }
        if added & FEATURES_OK != 0 {
            let avail = self.avail_features();
            let ok =
                self.acked_features & !avail == 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = value & !FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & DRIVER_OK != 0 {
            if self.status & FEATURES_OK == 0 {
                return self.fail("DRIVER_OK before FEATURES_OK");
            }
            self.activate();
        }
    }
}

fn read_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device
                .lock()
                .expect("device lock")
                .read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.lock().expect("device lock").device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self
                .queue_max
                .get(self.queue_sel as usize)
                .copied()
                .map_or(0, u32::from),
            0x044 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            0x060 => self.interrupt_status.load(Ordering::Acquire) | self.interrupt.sticky(),
            0x070 => self.status,
            // SHMLenLow/High, SHMBaseLow/High: no shared memory regions (all ones = "none"; a
            // zero length would make virtio-fs try to map a DAX window at 0 and fail its probe).
            0x0b0..=0x0bc => u32::MAX,
            0x0fc => 0, // config generation: the config space does not change under the driver
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & status::DRIVER_OK == 0 || self.activated {
                self.device
                    .lock()
                    .expect("device lock")
                    .write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        let Some(v) = read_u32(data) else { return };
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & status::FEATURES_OK != 0 {
                    return; // features are fixed once accepted
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.selected_queue() {
                    q.size = v.try_into().unwrap_or(0);
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.ready = v == 1;
                }
            }
            QUEUE_NOTIFY => {
                // Normally caught by the KVM ioeventfd; this path serves a notify KVM did not
                // match (and tests without KVM).
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x064 => {
                self.interrupt_status.fetch_and(!v, Ordering::AcqRel);
            }
            0x070 => self.set_status(v),
            0x080 => self.selected_queue().into_iter().for_each(|q| q.desc.0 = v),
            0x084 => self.selected_queue().into_iter().for_each(|q| q.desc.1 = v),
            0x090 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.avail.0 = v),
            0x094 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.avail.1 = v),
            0x0a0 => self.selected_queue().into_iter().for_each(|q| q.used.0 = v),
            0x0a4 => self.selected_queue().into_iter().for_each(|q| q.used.1 = v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;

    #[derive(Default)]
    struct Fake {
        activations: Vec<(usize, Vec<u16>, u64)>,
        resets: usize,
        config: [u8; 8],
        fail_activate: bool,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Device("refused".into()));
            }
            let sizes = args.queues.iter().map(|q| q.size()).collect();
            self.activations
                .push((args.queue_evts.len(), sizes, args.acked_features));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    struct Rig {
        t: MmioTransport,
        dev: Arc<Mutex<Fake>>,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Fake {
            config: *b"\x03\0\0\0\0\0\0\0",
            ..Fake::default()
        }));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(dev.clone(), mem, irq.try_clone().unwrap()).unwrap();
        Rig { t, dev, irq }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Sets up both queues at valid addresses inside the 1 MiB of guest memory.
    fn setup_queues(t: &mut MmioTransport, size: u32) {
        for q in 0..2u32 {
            let base = 0x1_0000 * (q + 1);
            w(t, 0x030, q);
            w(t, 0x038, size);
            w(t, 0x080, base);
            w(t, 0x084, 0);
            w(t, 0x090, base + 0x4000);
            w(t, 0x094, 0);
            w(t, 0x0a0, base + 0x8000);
            w(t, 0x0a4, 0);
            w(t, 0x044, 1);
        }
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        use status::*;
        w(t, 0x070, 0);
        w(t, 0x070, ACKNOWLEDGE);
        w(t, 0x070, ACKNOWLEDGE | DRIVER);
        w(t, 0x024, 0);
        w(t, 0x020, features as u32);
        w(t, 0x024, 1);
        w(t, 0x020, (features >> 32) as u32);
        w(t, 0x070, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers() {
        let mut rig = rig();
        let t = &mut rig.t;
        assert_eq!(r(t, 0x000), 0x7472_6976);
        assert_eq!(r(t, 0x004), 2);
        assert_eq!(r(t, 0x008), 19);
        w(t, 0x014, 0);
        assert_eq!(r(t, 0x010), 1);
        w(t, 0x014, 1);
        assert_eq!(r(t, 0x010), 1, "VIRTIO_F_VERSION_1 is bit 32");
        w(t, 0x030, 1);
        assert_eq!(r(t, 0x034), 256);
        w(t, 0x030, 7);
        assert_eq!(r(t, 0x034), 0, "no such queue");
        let mut cfg = [0u8; 8];
        t.read(0x100, &mut cfg);
        assert_eq!(cfg, *b"\x03\0\0\0\0\0\0\0");
        // No shared memory regions: length and base read as all ones.
        w(t, 0x0ac, 0);
        for off in [0x0b0, 0x0b4, 0x0b8, 0x0bc] {
            assert_eq!(r(t, off), u32::MAX, "SHM register {off:#x}");
        }
    }

    #[test]
    fn sticky_interrupt_bits_read_until_reset() {
        let mut rig = rig();
        assert_eq!(r(&mut rig.t, 0x060), 0);
        rig.t.interrupt.set_sticky(InterruptType::Queue);
        assert_eq!(r(&mut rig.t, 0x060), 1);
        w(&mut rig.t, 0x064, 1); // InterruptACK does not clear it
        assert_eq!(r(&mut rig.t, 0x060), 1);
        w(&mut rig.t, 0x070, 0); // reset does
        assert_eq!(r(&mut rig.t, 0x060), 0);
    }

    #[test]
    fn full_initialisation_activates_the_device() {
        let mut rig = rig();
        negotiate(&mut rig.t, VIRTIO_F_VERSION_1 | 1);
        assert_ne!(rig.t.status() & status::FEATURES_OK, 0);
        setup_queues(&mut rig.t, 128);
        w(&mut rig.t, 0x070, ALL_OK);
        assert_eq!(rig.t.status(), ALL_OK);
        let dev = rig.dev.lock().unwrap();
        assert_eq!(
            dev.activations,
            vec![(2, vec![128, 128], VIRTIO_F_VERSION_1 | 1)]
        );
    }

    #[test]
    fn unoffered_or_legacy_features_are_refused() {
        let mut rig = rig();
        negotiate(&mut rig.t, VIRTIO_F_VERSION_1 | 1 | (1 << 5));
        assert_eq!(rig.t.status() & status::FEATURES_OK, 0, "bit 5 not offered");
        negotiate(&mut rig.t, 1);
        assert_eq!(rig.t.status() & status::FEATURES_OK, 0, "no VERSION_1");
    }

    #[test]
    fn misprogrammed_queues_need_reset_not_a_panic() {
        for (what, f) in [
            (
                "outside memory",
                (|t: &mut MmioTransport| {
                    w(t, 0x030, 0);
                    w(t, 0x080, 0xfff0_0000);
                }) as fn(&mut MmioTransport),
            ),
            ("not a power of two", |t| {
                w(t, 0x030, 1);
                w(t, 0x038, 100);
            }),
            ("larger than the maximum", |t| {
                w(t, 0x030, 1);
                w(t, 0x038, 1024);
            }),
            ("not ready", |t| {
                w(t, 0x030, 0);
                w(t, 0x044, 0);
            }),
            ("misaligned used ring", |t| {
                w(t, 0x030, 0);
                w(t, 0x0a0, 0x1_8001);
            }),
        ] {
            let mut rig = rig();
            negotiate(&mut rig.t, VIRTIO_F_VERSION_1);
            setup_queues(&mut rig.t, 64);
            f(&mut rig.t);
            w(&mut rig.t, 0x070, ALL_OK);
            assert_ne!(rig.t.status() & status::DEVICE_NEEDS_RESET, 0, "{what}");
            assert_eq!(r(&mut rig.t, 0x060) & 2, 2, "{what}: config interrupt");
            assert!(rig.irq.read().unwrap() >= 1);
            assert!(rig.dev.lock().unwrap().activations.is_empty(), "{what}");
        }
    }

    #[test]
    fn out_of_order_status_and_failed_activation() {
        let mut first = rig();
        w(
            &mut first.t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_ne!(first.t.status() & status::DEVICE_NEEDS_RESET, 0);

        let mut rig = rig();
        rig.dev.lock().unwrap().fail_activate = true;
        negotiate(&mut rig.t, VIRTIO_F_VERSION_1);
        setup_queues(&mut rig.t, 64);
        w(&mut rig.t, 0x070, ALL_OK);
        assert_ne!(rig.t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_and_reinitialise() {
        let mut rig = rig();
        negotiate(&mut rig.t, VIRTIO_F_VERSION_1);
        setup_queues(&mut rig.t, 64);
        w(&mut rig.t, 0x070, ALL_OK);
        rig.t.interrupt.trigger(InterruptType::Queue).unwrap();
        w(&mut rig.t, 0x070, 0);
        assert_eq!(rig.t.status(), 0);
        assert_eq!(r(&mut rig.t, 0x060), 0);
        w(&mut rig.t, 0x030, 0);
        assert_eq!(r(&mut rig.t, 0x044), 0, "queue registers cleared");
        assert_eq!(rig.dev.lock().unwrap().resets, 1);
        negotiate(&mut rig.t, VIRTIO_F_VERSION_1);
        setup_queues(&mut rig.t, 32);
        w(&mut rig.t, 0x070, ALL_OK);
        assert_eq!(rig.t.status(), ALL_OK);
        assert_eq!(rig.dev.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn queue_registers_are_frozen_after_driver_ok() {
        let mut rig = rig();
        negotiate(&mut rig.t, VIRTIO_F_VERSION_1);
        setup_queues(&mut rig.t, 64);
        w(&mut rig.t, 0x070, ALL_OK);
        w(&mut rig.t, 0x030, 0);
        w(&mut rig.t, 0x044, 0);
        assert_eq!(r(&mut rig.t, 0x044), 1);
    }

    #[test]
    fn interrupt_ack_and_notify() {
        let mut rig = rig();
        rig.t.interrupt.trigger(InterruptType::Queue).unwrap();
        rig.t.interrupt.trigger(InterruptType::Config).unwrap();
        assert_eq!(r(&mut rig.t, 0x060), 3);
        w(&mut rig.t, 0x064, 1);
        assert_eq!(r(&mut rig.t, 0x060), 2);
        w(&mut rig.t, QUEUE_NOTIFY, 1);
        assert_eq!(rig.t.queue_evts()[1].read().unwrap(), 1);
        w(&mut rig.t, QUEUE_NOTIFY, 9); // no such queue: ignored
                                        // Short or odd-sized register accesses are ignored, never a panic.
        rig.t.write(0x070, &[1]);
        let mut b = [0xffu8; 2];
        rig.t.read(0x000, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
