//! Device-level tests: the test plays the guest driver on the request queue (virtio-queue's
//! `MockSplitQueue` in anonymous guest memory, no KVM) over a real image file, and the device runs
//! under a real event-manager loop pumped until idle, so activation, the queue eventfd's
//! registration and the kicks go through epoll as in the VMM.

use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::request::{req_type, status, HDR_LEN};
use super::*;
use crate::devices::virtio::test_utils::{guest_mem, Driver, Seg, OUTSIDE};

/// Sectors in the test disk.
const SECTORS: u64 = 64;

/// Deterministic disk contents: every byte depends on its offset.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8)
        .collect()
}

fn hdr(t: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HDR_LEN);
    h.extend_from_slice(&t.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

struct Options {
    read_only: bool,
    serial: &'static [u8],
    event_idx: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            read_only: false,
            serial: b"hull-test-disk",
            event_idx: false,
        }
    }
}

struct Harness<'m> {
    _dir: TempDir,
    path: PathBuf,
    mem: &'m GuestMemoryMmap,
    dev: Arc<Mutex<Block>>,
    em: EventManager<Arc<Mutex<Block>>>,
    q: Driver<'m>,
    kick: EventFd,
    irq: EventFd,
    irq_status: Arc<AtomicU32>,
}

impl<'m> Harness<'m> {
    fn new(mem: &'m GuestMemoryMmap, opts: Options) -> Self {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("disk.img");
        std::fs::write(&path, pattern(SECTORS as usize * 512)).unwrap();
        let dev = Block::new(&path, opts.read_only, opts.serial).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut h = Self {
            _dir: dir,
            path,
            mem,
            dev,
            em,
            q: Driver::new(mem, QUEUE_SIZE),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            irq: EventFd::new(EFD_NONBLOCK).unwrap(),
            irq_status: Arc::new(AtomicU32::new(0)),
        };
        h.activate(opts.event_idx);
        h
    }

    /// Activates the device with a fresh queue, as the transport does on DRIVER_OK.
    fn activate(&mut self, event_idx: bool) {
        self.q = Driver::new(self.mem, QUEUE_SIZE);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        self.kick = kick.try_clone().unwrap();
        self.irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(
            self.irq_status.clone(),
            self.irq.try_clone().unwrap(),
        ));
        let features = if event_idx {
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        } else {
            VIRTIO_F_VERSION_1
        };
        let args = ActivateArgs {
            mem: self.mem.clone(),
            queues: vec![self.q.queue(event_idx)],
            queue_evts: vec![kick],
            interrupt,
            acked_features: features,
        };
        self.dev.lock().unwrap().activate(args).unwrap();
        self.pump();
        assert!(self.dev.lock().unwrap().is_activated());
    }

    /// Runs the event loop until nothing is ready.
    fn pump(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle (busy loop?)");
    }

    fn kick(&mut self) {
        self.kick.write(1).unwrap();
        self.pump();
    }

    /// Interrupts raised since the last call (irqfd count), and clears the status bit.
    fn take_interrupts(&mut self) -> u64 {
        self.irq_status
            .store(0, std::sync::atomic::Ordering::Release);
        self.irq.read().unwrap_or(0)
    }

    /// Submits one chain and returns (used length, status byte); checks the chain came back.
    fn submit(&mut self, segs: &[Seg]) -> (u32, Option<u8>) {
        let head = self.q.add_chain(segs);
        self.kick();
        let used = self.q.take_used();
        assert_eq!(used.len(), 1, "one used entry for {segs:?}: {used:?}");
        assert_eq!(used[0].0, head);
        (used[0].1, self.q.status(head))
    }

    /// Reads `sectors` sectors from `sector`, the data split into descriptors of `split` bytes.
    fn read(&mut self, sector: u64, len: u32, split: &[u32]) -> (Vec<u8>, u32, Option<u8>) {
        assert_eq!(split.iter().sum::<u32>(), len);
        let mut segs = vec![Seg::Read(hdr(req_type::IN, sector))];
        segs.extend(split.iter().map(|&n| Seg::Write(n)));
        segs.push(Seg::Write(1));
        let head = self.q.add_chain(&segs);
        self.kick();
        let used = self.q.take_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head);
        (self.q.data_in(head), used[0].1, self.q.status(head))
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

#[test]
fn config_space_and_features() {
    let mem = guest_mem();
    let h = Harness::new(&mem, Options::default());
    let dev = h.dev.lock().unwrap();
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), &[256]);
    assert_eq!(dev.capacity(), SECTORS);
    let mut cap = [0xffu8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut b = [0xffu8; 4];
    dev.read_config(8, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0, "size_max");
    dev.read_config(12, &mut b);
    assert_eq!(u32::from_le_bytes(b), 254, "seg_max");
    dev.read_config(20, &mut b);
    assert_eq!(b, [0; 4], "blk_size: not offered");
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    // A driver's 4-byte reads of the 64-bit capacity.
    let mut lo = [0u8; 4];
    dev.read_config(4, &mut lo);
    assert_eq!(lo, [0; 4]);
    assert_eq!(
        dev.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX
    );
    assert!(!dev.read_only());
    drop(dev);

    let mem2 = guest_mem();
    let ro = Harness::new(
        &mem2,
        Options {
            read_only: true,
            ..Options::default()
        },
    );
    let dev = ro.dev.lock().unwrap();
    assert!(dev.read_only());
    assert_ne!(dev.avail_features() & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn capacity_of_a_large_sparse_file() {
    let dir = TempDir::new().unwrap();
    let p = dir.as_path().join("big.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 << 30).unwrap(); // 64 GiB, sparse
    let dev = Block::new(&p, true, b"").unwrap();
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (64 << 30) / 512);
}

#[test]
fn file_size_not_a_multiple_of_512_is_refused() {
    let dir = TempDir::new().unwrap();
    let p = dir.as_path().join("odd.img");
    std::fs::write(&p, vec![0u8; 512 * 3 + 100]).unwrap();
    let err = Block::new(&p, false, b"").err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "drive {} is 1636 bytes, not a multiple of 512",
            p.display()
        )),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    let err = Block::new(&dir.as_path().join("none.img"), true, b"")
        .err()
        .expect("refused");
    assert!(err.to_string().contains("cannot open drive"), "{err}");
}

#[test]
fn read_returns_the_file_bytes() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    let want = pattern(SECTORS as usize * 512);
    // Two sectors from sector 3, scattered over odd-sized descriptors.
    let (data, len, st) = h.read(3, 1024, &[100, 700, 224]);
    assert_eq!(st, Some(status::OK));
    assert_eq!(len, 1025, "data + status");
    assert_eq!(data, want[3 * 512..5 * 512]);
    assert_eq!(h.take_interrupts(), 1);
    // The last sector, in one descriptor.
    let (data, _, st) = h.read(SECTORS - 1, 512, &[512]);
    assert_eq!(st, Some(status::OK));
    assert_eq!(data, want[(SECTORS as usize - 1) * 512..]);
    // Zero-length read at the end: nothing to do, OK.
    let (data, len, st) = h.read(SECTORS, 0, &[]);
    assert_eq!((data.len(), len, st), (0, 1, Some(status::OK)));
}

#[test]
fn write_lands_in_the_file_and_reads_back() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    let payload: Vec<u8> = (0..1536u32).map(|i| (i % 251) as u8).collect();
    // Header and the first data bytes share a descriptor; the rest is split unevenly.
    let mut first = hdr(req_type::OUT, 10);
    first.extend_from_slice(&payload[..200]);
    let (len, st) = h.submit(&[
        Seg::Read(first),
        Seg::Read(payload[200..1000].to_vec()),
        Seg::Read(payload[1000..].to_vec()),
        Seg::Write(1),
    ]);
    assert_eq!((len, st), (1, Some(status::OK)));
    let file = h.file();
    assert_eq!(file[10 * 512..13 * 512], payload[..]);
    let orig = pattern(SECTORS as usize * 512);
    assert_eq!(file[..10 * 512], orig[..10 * 512], "nothing before");
    assert_eq!(file[13 * 512..], orig[13 * 512..], "nothing after");
    let (data, _, st) = h.read(10, 1536, &[1536]);
    assert_eq!(st, Some(status::OK));
    assert_eq!(data, payload);
}

#[test]
fn flush_succeeds() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    let (len, st) = h.submit(&[Seg::Read(hdr(req_type::FLUSH, 0)), Seg::Write(1)]);
    assert_eq!((len, st), (1, Some(status::OK)));
    // On a read-only drive too (nothing to flush).
    let mem2 = guest_mem();
    let mut ro = Harness::new(
        &mem2,
        Options {
            read_only: true,
            ..Options::default()
        },
    );
    let (len, st) = ro.submit(&[Seg::Read(hdr(req_type::FLUSH, 0)), Seg::Write(1)]);
    assert_eq!((len, st), (1, Some(status::OK)));
}

#[test]
fn get_id_returns_the_serial_nul_padded() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    let head = h.q.add_chain(&[
        Seg::Read(hdr(req_type::GET_ID, 0)),
        Seg::Write(20),
        Seg::Write(1),
    ]);
    h.kick();
    assert_eq!(h.q.take_used(), vec![(head, 21)]);
    assert_eq!(h.q.status(head), Some(status::OK));
    let mut want = b"hull-test-disk".to_vec();
    want.resize(20, 0);
    assert_eq!(h.q.data_in(head), want);

    // A 20-byte serial has no terminator; a longer one is cut; a short buffer gets what fits.
    for (serial, buf, want) in [
        (
            &b"ABCDEFGHIJKLMNOPQRST"[..],
            20,
            &b"ABCDEFGHIJKLMNOPQRST"[..],
        ),
        (
            &b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"[..],
            20,
            &b"ABCDEFGHIJKLMNOPQRST"[..],
        ),
        (&b"hull"[..], 2, &b"hu"[..]),
        (&b""[..], 20, &[0u8; 20][..]),
    ] {
        let mem = guest_mem();
        let mut h = Harness::new(
            &mem,
            Options {
                serial,
                ..Options::default()
            },
        );
        let head =
            h.q.add_chain(&[Seg::Read(hdr(req_type::GET_ID, 0)), Seg::Write(buf + 1)]);
        h.kick();
        assert_eq!(h.q.take_used(), vec![(head, buf + 1)]);
        assert_eq!(h.q.status(head), Some(status::OK));
        assert_eq!(h.q.data_in(head), want);
    }
}

#[test]
fn read_only_refuses_writes() {
    let mem = guest_mem();
    let mut h = Harness::new(
        &mem,
        Options {
            read_only: true,
            ..Options::default()
        },
    );
    let before = h.file();
    let (len, st) = h.submit(&[
        Seg::Read(hdr(req_type::OUT, 0)),
        Seg::Read(vec![0x55; 512]),
        Seg::Write(1),
    ]);
    assert_eq!((len, st), (1, Some(status::IOERR)));
    assert_eq!(h.file(), before, "nothing written");
    // Reads still work.
    let (data, _, st) = h.read(0, 512, &[512]);
    assert_eq!(st, Some(status::OK));
    assert_eq!(data, before[..512]);
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    for t in [2, 11, 13, 0x8000_0000, u32::MAX] {
        let (len, st) = h.submit(&[Seg::Read(hdr(t, 0)), Seg::Write(1)]);
        assert_eq!((len, st), (1, Some(status::UNSUPP)), "type {t}");
    }
}

#[test]
fn the_sector_of_other_types_is_ignored() {
    // The spec wants 0 there; a driver that writes anything else must not upset the device.
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    for (t, data, want) in [
        (req_type::FLUSH, 0, status::OK),
        (req_type::GET_ID, 20, status::OK),
        (0xff, 0, status::UNSUPP),
    ] {
        let mut segs = vec![Seg::Read(hdr(t, u64::MAX))];
        if data > 0 {
            segs.push(Seg::Write(data));
        }
        segs.push(Seg::Write(1));
        let (len, st) = h.submit(&segs);
        assert_eq!((len, st), (data + 1, Some(want)), "type {t}");
    }
}

#[test]
fn malformed_requests_get_ioerr_and_come_back() {
    use Seg::{Raw, Read, Write};
    let hdr_in = |s| hdr(req_type::IN, s);
    let hdr_out = |s| hdr(req_type::OUT, s);
    // (what, chain, expected status byte or None when there is none to write)
    let cases: Vec<(&str, Vec<Seg>, Option<u8>)> = vec![
        (
            "header too short",
            vec![Read(vec![0; 8]), Write(1)],
            Some(1),
        ),
        ("no header at all", vec![Write(513)], Some(1)),
        (
            "header split short",
            vec![Read(vec![0; 8]), Read(vec![0; 7]), Write(1)],
            Some(1),
        ),
        (
            "IN at the capacity",
            vec![Read(hdr_in(SECTORS)), Write(512), Write(1)],
            Some(1),
        ),
        (
            "IN across the end",
            vec![Read(hdr_in(SECTORS - 1)), Write(1024), Write(1)],
            Some(1),
        ),
        (
            "IN sector overflows",
            vec![Read(hdr_in(u64::MAX)), Write(512), Write(1)],
            Some(1),
        ),
        (
            "IN sector * 512 overflows",
            vec![Read(hdr_in(u64::MAX / 512 + 1)), Write(512), Write(1)],
            Some(1),
        ),
        (
            "OUT beyond the end",
            vec![Read(hdr_out(SECTORS)), Read(vec![0; 512]), Write(1)],
            Some(1),
        ),
        (
            "IN of 511 bytes",
            vec![Read(hdr_in(0)), Write(511), Write(1)],
            Some(1),
        ),
        (
            "IN of 513 bytes",
            vec![Read(hdr_in(0)), Write(513), Write(1)],
            Some(1),
        ),
        (
            "OUT of 100 bytes",
            vec![Read(hdr_out(0)), Read(vec![0; 100]), Write(1)],
            Some(1),
        ),
        (
            "IN data device-readable",
            vec![Read(hdr_in(0)), Read(vec![0; 512]), Write(1)],
            Some(1),
        ),
        (
            "OUT data device-writable",
            vec![Read(hdr_out(0)), Write(512), Write(1)],
            Some(1),
        ),
        (
            // The last writable byte (the data's) is where the status goes.
            "status descriptor device-readable",
            vec![Read(hdr_in(0)), Write(512), Read(vec![0])],
            Some(1),
        ),
        (
            "no status: OUT all readable",
            vec![Read(hdr_out(0)), Read(vec![0; 512])],
            None,
        ),
        ("no status: header only", vec![Read(hdr_in(0))], None),
        (
            "no status: zero-length status",
            vec![Read(hdr(req_type::FLUSH, 0)), Write(0)],
            None,
        ),
        (
            "status outside guest memory",
            vec![Read(hdr(req_type::FLUSH, 0)), Raw(OUTSIDE, 1, true)],
            None,
        ),
        (
            "header outside guest memory",
            vec![Raw(OUTSIDE, 16, false), Write(1)],
            Some(1),
        ),
        (
            "IN data outside guest memory",
            vec![Read(hdr_in(0)), Raw(OUTSIDE, 512, true), Write(1)],
            Some(1),
        ),
        (
            "OUT data outside guest memory",
            vec![Read(hdr_out(0)), Raw(OUTSIDE, 512, false), Write(1)],
            Some(1),
        ),
        (
            "descriptor address wraps",
            vec![Read(hdr_in(0)), Raw(u64::MAX - 100, 512, true), Write(1)],
            Some(1),
        ),
    ];
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    let before = h.file();
    for (what, segs, want) in cases {
        let (len, st) = h.submit(&segs);
        match want {
            Some(s) => {
                assert_eq!(st, Some(s), "{what}: status");
                assert_eq!(len, 1, "{what}: used length");
            }
            None => assert_eq!(len, 0, "{what}: used length"),
        }
        // The queue goes on: a good request right after is served.
        let (_, _, st) = h.read(1, 512, &[512]);
        assert_eq!(st, Some(status::OK), "after {what}");
    }
    assert_eq!(h.file(), before, "no malformed request wrote anything");
}

#[test]
fn a_descriptor_loop_ends_without_a_hang() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    // Two readable descriptors pointing at each other: the chain ends after the queue size.
    let head =
        h.q.add_chain(&[Seg::Read(hdr(req_type::IN, 0)), Seg::Read(vec![0; 16])]);
    h.q.set_next(head + 1, head);
    h.kick();
    assert_eq!(h.q.take_used(), vec![(head, 0)], "no status to write");
}

#[test]
fn a_corrupt_avail_index_does_not_spin() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    // More chains "available" than the queue holds: virtio-queue yields none, yet the ring does
    // not look empty.
    h.q.set_avail_idx(1000);
    h.kick.write(1).unwrap();
    // The event loop runs on a thread of its own, so that a busy loop fails the test rather than
    // hanging it.
    let mut em = std::mem::replace(&mut h.em, EventManager::new().unwrap());
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while em.run_with_timeout(0).unwrap() > 0 {}
        let _ = done.send(());
    });
    wait.recv_timeout(std::time::Duration::from_secs(10))
        .expect("the device spins on a corrupt avail index");
    assert!(h.q.take_used().is_empty());
}

#[test]
fn many_requests_one_kick_one_interrupt() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    let want = pattern(SECTORS as usize * 512);
    let heads: Vec<u16> = (0..SECTORS)
        .map(|s| {
            h.q.add_chain(&[
                Seg::Read(hdr(req_type::IN, s)),
                Seg::Write(512),
                Seg::Write(1),
            ])
        })
        .collect();
    h.kick();
    let used = h.q.take_used();
    assert_eq!(used.len(), heads.len());
    for ((head, len), s) in used.into_iter().zip(0..) {
        assert_eq!((head, len), (heads[s], 513));
        assert_eq!(h.q.status(head), Some(status::OK));
        assert_eq!(h.q.data_in(head), want[s * 512..(s + 1) * 512]);
    }
    assert_eq!(h.take_interrupts(), 1);
}

#[test]
fn event_idx_interrupts_only_when_asked() {
    let mem = guest_mem();
    let mut h = Harness::new(
        &mem,
        Options {
            event_idx: true,
            ..Options::default()
        },
    );
    // The driver wants an interrupt once the used index passes 2 (i.e. after the third).
    h.q.set_used_event(2);
    for n in 1..=3u16 {
        let (len, st) = h.submit(&[Seg::Read(hdr(req_type::FLUSH, 0)), Seg::Write(1)]);
        assert_eq!((len, st), (1, Some(status::OK)));
        let irqs = h.take_interrupts();
        assert_eq!(irqs, u64::from(n == 3), "after request {n}");
        // The device asks to be kicked for the next request.
        assert_eq!(h.q.avail_event(), n);
    }
}

#[test]
fn reset_then_reactivate() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    let (_, _, st) = h.read(0, 512, &[512]);
    assert_eq!(st, Some(status::OK));
    let old_kick = h.kick.try_clone().unwrap();
    h.dev.lock().unwrap().reset();
    h.pump();
    assert!(!h.dev.lock().unwrap().is_activated());
    // A kick of the old queue does nothing (its eventfd left the loop).
    h.q.add_chain(&[Seg::Read(hdr(req_type::FLUSH, 0)), Seg::Write(1)]);
    old_kick.write(1).unwrap();
    h.pump();
    assert!(h.q.take_used().is_empty());
    // The driver initialises the device again.
    h.activate(true);
    let (_, _, st) = h.read(2, 512, &[512]);
    assert_eq!(st, Some(status::OK));
    // Activation without a reset in between (the contract allows it).
    h.activate(false);
    let (_, _, st) = h.read(3, 512, &[512]);
    assert_eq!(st, Some(status::OK));
}

#[test]
fn activate_checks_the_queue_count() {
    let mem = guest_mem();
    let h = Harness::new(&mem, Options::default());
    let args = ActivateArgs {
        mem: mem.clone(),
        queues: vec![h.q.queue(false), h.q.queue(false)],
        queue_evts: vec![
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ],
        interrupt: Arc::new(Interrupt::new(
            Arc::new(AtomicU32::new(0)),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )),
        acked_features: VIRTIO_F_VERSION_1,
    };
    let err = h.dev.lock().unwrap().activate(args).unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 2
        }
    ));
}

#[test]
fn a_file_that_shrank_gives_ioerr() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, Options::default());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&h.path)
        .unwrap()
        .set_len(512 * (SECTORS - 2))
        .unwrap();
    let (_, len, st) = h.read(SECTORS - 1, 512, &[512]);
    assert_eq!((len, st), (1, Some(status::IOERR)));
    let (_, _, st) = h.read(0, 512, &[512]);
    assert_eq!(st, Some(status::OK));
}
