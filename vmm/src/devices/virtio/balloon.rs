//! virtio-balloon (device id 5), for free page reporting only: the guest hands back the RAM it
//! no longer uses, and the host frees it.
//!
//! Why: a guest touches most of its RAM at some point (the kernel image and initramfs are loaded,
//! the initramfs is unpacked and freed, boot-time allocations come and go), and every page it
//! touched stays allocated on the host for the life of the VM. With `VIRTIO_BALLOON_F_REPORTING`
//! Linux's page reporting (`mm/page_reporting.c`, 2 s after pages are freed) lists free blocks of
//! its buddy allocator (2 MiB and up on x86) on the reporting queue; the device removes them from
//! the memfd behind guest RAM (`MADV_REMOVE`: a hole punched in the shared memory, so virtiofsd's
//! mapping of it lets go too). A page the guest uses again faults in zeroed, as a fresh one.
//!
//! The balloon itself is never inflated: `num_pages` stays 0, and buffers on the inflate and
//! deflate queues are returned untouched. Queues: inflate (0), deflate (1), reporting (2) (Linux
//! numbers the queues of offered features only: no stats or free-page-hint queue comes between).
//! Config space: `num_pages` (le32, 0), `actual` (le32, the guest's to write); the rest reads as
//! zero.
//!
//! A report is a chain of device-writable descriptors, one per free range. A range that is not
//! page-aligned, not whole inside one RAM region, or not guest RAM at all is skipped (logged at
//! debug level) and the chain still comes back: the guest waits for every report it sends.
//!
//! Threading as for every device ([`crate::devices::virtio`]): `activate`/`reset` run on a vCPU
//! thread and only store what the event loop needs; the event-loop thread registers the queue
//! eventfds and does the work.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    device_type, ActivateArgs, ActivateError, Interrupt, InterruptType, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// `VIRTIO_BALLOON_F_REPORTING`: the reporting queue exists.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;
/// Size of each queue. Linux wants at least 32 (`PAGE_REPORTING_CAPACITY`) on the reporting queue.
pub const QUEUE_SIZE: u16 = 64;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// The reporting queue's index.
pub const REPORTING_QUEUE: usize = 2;
/// Length of the config space: `num_pages`, `actual`, `free_page_hint_cmd_id`, `poison_val`.
const CONFIG_LEN: usize = 16;
/// Offset of `actual` in the config space.
const ACTUAL: usize = 4;
/// The granule of what is given back.
const PAGE: u64 = 4096;

/// The device's eventfd (activation and reset).
const TOKEN_ACTIVATE: u32 = 0;
/// Queue `i`'s kick is token `TOKEN_QUEUE + i`.
const TOKEN_QUEUE: u32 = 1;

/// Creating the device failed.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// Its eventfd.
    #[error("cannot create the balloon device's eventfd: {0}")]
    EventFd(std::io::Error),
}

/// What the device has given back to the host since it was created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    /// Ranges removed from guest RAM.
    pub ranges: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Ranges skipped as malformed or failed.
    pub skipped: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The balloon device. Share it as `Arc<Mutex<Balloon>>` between the transport (as a
/// [`VirtioDevice`]) and the event manager (as a `MutEventSubscriber`).
pub struct Balloon {
    config: [u8; CONFIG_LEN],
    activate_evt: EventFd,
    active: Option<Active>,
    /// The queues' kicks, from the last activation.
    queue_evts: Vec<EventFd>,
    /// Whether the event loop watches `queue_evts` yet.
    queue_evts_registered: bool,
    /// Kicks of earlier activations still on the event loop's interest list (see the block
    /// device: an fd closed while watched would corrupt event-manager's map).
    retired_evts: Vec<EventFd>,
    reported: Reported,
}

impl Balloon {
    /// A balloon that only takes free page reports.
    pub fn new() -> Result<Self, BalloonError> {
        Ok(Self {
            config: [0; CONFIG_LEN],
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd)?,
            active: None,
            queue_evts: Vec::new(),
            queue_evts_registered: false,
            retired_evts: Vec::new(),
            reported: Reported::default(),
        })
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// What has been given back so far.
    pub fn reported(&self) -> Reported {
        self.reported
    }

    /// Returns every chain on queue `index` to the guest; on the reporting queue, frees the
    /// ranges first. Interrupts the guest if it wants to know.
    fn process_queue(&mut self, index: usize) {
        let Self {
            active, reported, ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let Some(queue) = a.queues.get_mut(index) else {
            return;
        };
        let mut used = false;
        let mut rechecked = false;
        let _ = queue.disable_notification(&a.mem);
        loop {
            let Some(chain) = queue.pop_descriptor_chain(&a.mem) else {
                if !rechecked && queue.enable_notification(&a.mem).unwrap_or(false) {
                    rechecked = true;
                    continue;
                }
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            if index == REPORTING_QUEUE {
                for desc in chain {
                    match discard(&a.mem, desc.addr(), u64::from(desc.len())) {
                        Ok(()) => {
                            reported.ranges += 1;
                            reported.bytes += u64::from(desc.len());
                        }
                        Err(why) => {
                            reported.skipped += 1;
                            tracing::debug!(
                                addr = format_args!("{:#x}", desc.addr().0),
                                len = desc.len(),
                                "virtio-balloon: report skipped: {why}"
                            );
                        }
                    }
                }
            }
            if let Err(e) = queue.add_used(&a.mem, head, 0) {
                tracing::warn!("virtio-balloon: add_used failed: {e}");
            }
            used = true;
        }
        if used && queue.needs_notification(&a.mem).unwrap_or(true) {
            if let Err(e) = a.interrupt.trigger(InterruptType::Queue) {
                tracing::warn!("virtio-balloon: cannot raise the queue interrupt: {e}");
            }
        }
    }

    fn deactivate(&mut self) {
        if self.active.take().is_some() {
            tracing::debug!(reported = ?self.reported, "virtio-balloon: deactivated");
        }
        let evts = std::mem::take(&mut self.queue_evts);
        if self.queue_evts_registered {
            self.retired_evts.extend(evts);
        }
        self.queue_evts_registered = false;
    }

    /// Brings the interest list in line with the device: retired kicks out, the current ones in.
    fn sync_event_loop(&mut self, ops: &mut EventOps) {
        for evt in self.retired_evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                tracing::warn!("virtio-balloon: cannot unregister a retired queue eventfd: {e:?}");
            }
        }
        if !self.queue_evts_registered && !self.queue_evts.is_empty() {
            for (i, evt) in self.queue_evts.iter().enumerate() {
                if let Err(e) =
                    ops.add(Events::with_data(evt, TOKEN_QUEUE + i as u32, EventSet::IN))
                {
                    tracing::error!("virtio-balloon: cannot register queue {i}'s eventfd: {e:?}");
                }
            }
            self.queue_evts_registered = true;
        }
    }
}

/// Gives the guest-physical range `[addr, addr + len)` back to the host.
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), String> {
    if len == 0 || addr.0 % PAGE != 0 || len % PAGE != 0 {
        return Err("not page-aligned".into());
    }
    let region = mem
        .find_region(addr)
        .ok_or_else(|| "not guest RAM".to_string())?;
    let offset = addr.0 - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err("crosses the end of a RAM region".into());
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|e| e.to_string())?;
    let len = usize::try_from(len).map_err(|e| e.to_string())?;
    // SAFETY: `host..host + len` lies inside one mapping of guest RAM that lives as long as `mem`
    // (checked above against the region). The guest gave these pages up: it has them off its free
    // lists until the report comes back, and reads them as zero afterwards, which is what both
    // calls leave. No Rust reference into guest RAM exists (it is accessed as volatile memory).
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_REMOVE) };
    if rc == 0 {
        return Ok(());
    }
    let remove = std::io::Error::last_os_error();
    // Private anonymous memory (unit tests' guest memory) has no hole to punch: drop the pages.
    // SAFETY: as above.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "madvise: MADV_REMOVE: {remove}; MADV_DONTNEED: {}",
            std::io::Error::last_os_error()
        ))
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= ACTUAL && start.saturating_add(data.len()) <= ACTUAL + 4 {
            self.config[start..start + data.len()].copy_from_slice(data);
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-balloon: ignoring a config write"
            );
        }
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        let expected = QUEUE_SIZES.len();
        for got in [args.queues.len(), args.queue_evts.len()] {
            if got != expected {
                return Err(ActivateError::QueueCount { expected, got });
            }
        }
        if args.acked_features & VIRTIO_BALLOON_F_REPORTING == 0 {
            return Err(ActivateError::Device(
                "the driver did not accept free page reporting (VIRTIO_BALLOON_F_REPORTING)".into(),
            ));
        }
        self.deactivate();
        self.queue_evts = args.queue_evts;
        self.active = Some(Active {
            mem: args.mem,
            queues: args.queues,
            interrupt: args.interrupt,
        });
        tracing::debug!("virtio-balloon: activated");
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        self.deactivate();
        if let Err(e) = self.activate_evt.write(1) {
            tracing::warn!("virtio-balloon: cannot signal the event loop after reset: {e}");
        }
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!("virtio-balloon: cannot register with the event loop: {e:?}");
        }
        self.sync_event_loop(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_event_loop(ops);
                for i in 0..QUEUE_SIZES.len() {
                    self.process_queue(i);
                }
            }
            token => {
                let i = (token - TOKEN_QUEUE) as usize;
                let current = self
                    .queue_evts
                    .get(i)
                    .filter(|evt| evt.as_raw_fd() == events.fd());
                if let Some(evt) = current {
                    let _ = evt.read();
                    self.process_queue(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::AtomicU32;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::Bytes;

    use super::*;
    use crate::devices::virtio::test_utils::{Driver, Seg};

    /// 8 MiB of memfd-backed guest RAM, as the VMM makes it: queues in the first MiB, the range
    /// the tests give back at 4 MiB.
    const MEM: u64 = 8 << 20;
    const RANGE: u64 = 4 << 20;
    const QUEUE_AT: [u64; 3] = [0, 0x4000, 0x8000];

    struct Harness {
        mem: GuestMemoryMmap,
        memfd: std::fs::File,
        dev: Arc<Mutex<Balloon>>,
        em: EventManager<Arc<Mutex<Balloon>>>,
        kicks: Vec<EventFd>,
        irq: EventFd,
    }

    impl Harness {
        fn new() -> Self {
            let (mem, memfd) = crate::memory::create_guest_memory(MEM).unwrap();
            let dev = Arc::new(Mutex::new(Balloon::new().unwrap()));
            let mut em = EventManager::<Arc<Mutex<Balloon>>>::new().unwrap();
            em.add_subscriber(dev.clone());
            Self {
                mem,
                memfd,
                dev,
                em,
                kicks: Vec::new(),
                irq: EventFd::new(EFD_NONBLOCK).unwrap(),
            }
        }

        fn activate(&mut self, queues: Vec<Queue>, features: u64) -> Result<(), ActivateError> {
            let kicks: Vec<EventFd> = (0..queues.len())
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            self.kicks = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
            let interrupt = Arc::new(Interrupt::new(
                Arc::new(AtomicU32::new(0)),
                self.irq.try_clone().unwrap(),
            ));
            let r = self.dev.lock().unwrap().activate(ActivateArgs {
                mem: self.mem.clone(),
                queues,
                queue_evts: kicks,
                interrupt,
                acked_features: features,
            });
            self.pump();
            r
        }

        fn pump(&mut self) {
            for _ in 0..1000 {
                if self.em.run_with_timeout(0).unwrap() == 0 {
                    return;
                }
            }
            panic!("the event loop never went idle");
        }

        fn kick(&mut self, q: usize) {
            self.kicks[q].write(1).unwrap();
            self.pump();
        }

        /// Bytes of the memfd that are allocated on the host.
        fn allocated(&self) -> u64 {
            self.memfd.metadata().unwrap().blocks() * 512
        }
    }

    /// The driver's side of the three queues, on `mem`.
    fn drivers(mem: &GuestMemoryMmap) -> Vec<Driver<'_>> {
        QUEUE_AT
            .iter()
            .map(|&at| Driver::new_at(mem, GuestAddress(at), QUEUE_SIZE))
            .collect()
    }

    /// The driver's side of the three queues on `mem`, the device activated with them.
    fn activated<'m>(h: &mut Harness, mem: &'m GuestMemoryMmap) -> Vec<Driver<'m>> {
        let qs = drivers(mem);
        h.activate(qs.iter().map(|d| d.queue(false)).collect(), FEATURES)
            .unwrap();
        qs
    }

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING;

    #[test]
    fn features_and_config() {
        let mut b = Balloon::new().unwrap();
        assert_eq!(b.device_type(), 5);
        assert_eq!(b.queue_max_sizes(), &[64, 64, 64]);
        assert_eq!(b.avail_features(), FEATURES);
        let mut cfg = [0xffu8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 8], "num_pages and actual start at 0");
        // The driver may write `actual`, nothing else.
        b.write_config(4, &7u32.to_le_bytes());
        b.write_config(0, &9u32.to_le_bytes());
        b.read_config(0, &mut cfg);
        assert_eq!(cfg, [0, 0, 0, 0, 7, 0, 0, 0]);
        let mut past = [0xffu8; 4];
        b.read_config(1000, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn a_report_gives_the_pages_back_and_the_guest_reads_zeros() {
        let mut h = Harness::new();
        let mem = h.mem.clone();
        let mut qs = activated(&mut h, &mem);
        // The guest used 2 MiB at RANGE and then freed it.
        h.mem
            .write_slice(&vec![0xa5u8; 2 << 20], GuestAddress(RANGE))
            .unwrap();
        let before = h.allocated();
        assert!(
            before >= 2 << 20,
            "the guest's writes allocate memory: {before}"
        );

        let head = qs[REPORTING_QUEUE].add_chain(&[Seg::Raw(RANGE, 2 << 20, true)]);
        h.kick(REPORTING_QUEUE);

        assert_eq!(qs[REPORTING_QUEUE].take_used(), vec![(head, 0)]);
        assert_eq!(
            h.irq.read().unwrap(),
            1,
            "the guest waits for its report: interrupt"
        );
        let after = h.allocated();
        assert!(
            before - after >= 2 << 20,
            "2 MiB given back to the host: {before} -> {after} bytes allocated"
        );
        let mut back = vec![0xffu8; 2 << 20];
        h.mem.read_slice(&mut back, GuestAddress(RANGE)).unwrap();
        assert!(
            back.iter().all(|&b| b == 0),
            "a reported page reads as zero"
        );
        let r = h.dev.lock().unwrap().reported();
        assert_eq!((r.ranges, r.bytes, r.skipped), (1, 2 << 20, 0));
    }

    #[test]
    fn malformed_ranges_are_skipped_and_the_chain_comes_back() {
        let mut h = Harness::new();
        let mem = h.mem.clone();
        let mut qs = activated(&mut h, &mem);
        h.mem
            .write_slice(&[0x5au8; 4096], GuestAddress(RANGE))
            .unwrap();
        let q = &mut qs[REPORTING_QUEUE];
        let head = q.add_chain(&[
            Seg::Raw(RANGE + 1, 4096, true),     // not aligned
            Seg::Raw(RANGE, 100, true),          // not a whole page
            Seg::Raw(MEM - 4096, 8192, true),    // past the end of RAM
            Seg::Raw(0x1_0000_0000, 4096, true), // not RAM
            Seg::Raw(RANGE, 0, true),            // empty
        ]);
        h.kick(REPORTING_QUEUE);
        assert_eq!(qs[REPORTING_QUEUE].take_used(), vec![(head, 0)]);
        let r = h.dev.lock().unwrap().reported();
        assert_eq!((r.ranges, r.skipped), (0, 5));
        let mut back = [0u8; 4096];
        h.mem.read_slice(&mut back, GuestAddress(RANGE)).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a), "nothing was freed");
    }

    #[test]
    fn inflate_and_deflate_buffers_come_back_untouched() {
        let mut h = Harness::new();
        let mem = h.mem.clone();
        let mut qs = activated(&mut h, &mem);
        h.mem
            .write_slice(&[0x77u8; 4096], GuestAddress(RANGE))
            .unwrap();
        for q in [0, 1] {
            // A page frame number list (le32 PFNs), as the driver sends.
            let pfn = ((RANGE / 4096) as u32).to_le_bytes().to_vec();
            let head = qs[q].add_chain(&[Seg::Read(pfn)]);
            h.kick(q);
            assert_eq!(qs[q].take_used(), vec![(head, 0)]);
        }
        let mut back = [0u8; 4096];
        h.mem.read_slice(&mut back, GuestAddress(RANGE)).unwrap();
        assert!(back.iter().all(|&b| b == 0x77));
        assert_eq!(h.dev.lock().unwrap().reported(), Reported::default());
    }

    #[test]
    fn activation_needs_three_queues_and_reporting() {
        let mut h = Harness::new();
        let mem = h.mem.clone();
        let qs = drivers(&mem);
        let two = qs.iter().take(2).map(|d| d.queue(false)).collect();
        assert!(matches!(
            h.activate(two, FEATURES),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 2
            })
        ));
        let three: Vec<Queue> = qs.iter().map(|d| d.queue(false)).collect();
        let e = h.activate(three, VIRTIO_F_VERSION_1).unwrap_err();
        assert!(e.to_string().contains("free page reporting"), "{e}");
        assert!(!h.dev.lock().unwrap().is_activated());
    }

    #[test]
    fn reset_then_reactivate_serves_the_new_queues() {
        let mut h = Harness::new();
        {
            let mem = h.mem.clone();
            activated(&mut h, &mem);
        }
        h.dev.lock().unwrap().reset();
        h.pump();
        assert!(!h.dev.lock().unwrap().is_activated());
        let mem = h.mem.clone();
        let mut qs = activated(&mut h, &mem);
        let head = qs[REPORTING_QUEUE].add_chain(&[Seg::Raw(RANGE, 4096, true)]);
        h.kick(REPORTING_QUEUE);
        assert_eq!(qs[REPORTING_QUEUE].take_used(), vec![(head, 0)]);
        assert_eq!(h.dev.lock().unwrap().reported().ranges, 1);
    }
}
