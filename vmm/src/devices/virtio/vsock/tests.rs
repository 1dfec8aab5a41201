//! Device-level tests: the test plays the guest driver on the three queues (anonymous guest
//! memory, no KVM) and host programs on real Unix sockets, and the device runs under a real
//! event-manager loop that is pumped until idle, so the epoll registrations (edge-triggered
//! sockets included) are exercised as in the VMM. No sleeps: everything the test waits for is
//! already queued in a socket or ring by the time the loop is pumped; socket reads have
//! timeouts only as a guard against hangs.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::csm::{CONN_TX_BUF_SIZE, CREDIT_UPDATE_THRESHOLD};
use super::packet::{
    Op, VsockHeader, HDR_LEN, HOST_CID, MAX_PKT_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::test_utils::{GuestQueue, Seg, TEST_MEM_SIZE};
use super::*;

const CID: u64 = 3;
const GUEST_BUF: u32 = 256 * 1024;
const RX_BUF: u32 = 4096 + HDR_LEN as u32;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

type Packet = (VsockHeader, Vec<u8>);

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn guest_hdr(op: Op, src_port: u32, dst_port: u32) -> VsockHeader {
    VsockHeader {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

fn read_exact_timeout(s: &UnixStream, n: usize) -> Vec<u8> {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut b = vec![0u8; n];
    (&*s).read_exact(&mut b).unwrap();
    b
}

fn read_line(s: &UnixStream) -> String {
    let mut line = Vec::new();
    loop {
        let b = read_exact_timeout(s, 1)[0];
        if b == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b);
    }
}

/// Whether the peer closed `s` (EOF or reset) — checked without waiting.
fn is_closed(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 256];
    loop {
        match (&*s).read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Nothing to read right now, and not closed.
fn is_quiet(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    matches!((&*s).read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

struct Harness {
    _dir: TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    rx: GuestQueue,
    tx: GuestQueue,
    kicks: Vec<EventFd>,
    irq_status: Arc<AtomicU32>,
    next_guest_port: u32,
}

impl Harness {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        let uds = dir.as_path().join("v.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(CID, uds.clone()).unwrap()));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE)]).unwrap();
        let mut h = Self {
            _dir: dir,
            uds,
            mem: mem.clone(),
            dev,
            em,
            rx: GuestQueue::new(&mem, 0, QUEUE_SIZE),
            tx: GuestQueue::new(&mem, 1, QUEUE_SIZE),
            kicks: Vec::new(),
            irq_status: Arc::new(AtomicU32::new(0)),
            next_guest_port: 2000,
        };
        h.activate();
        h
    }

    /// Activates the device with fresh queues, as the transport does on DRIVER_OK.
    fn activate(&mut self) {
        self.rx = GuestQueue::new(&self.mem, 0, QUEUE_SIZE);
        self.tx = GuestQueue::new(&self.mem, 1, QUEUE_SIZE);
        let ev = GuestQueue::new(&self.mem, 2, QUEUE_SIZE);
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        self.kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let interrupt = Arc::new(Interrupt::new(
            self.irq_status.clone(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ));
        let args = ActivateArgs {
            mem: self.mem.clone(),
            queues: vec![self.rx.queue(), self.tx.queue(), ev.queue()],
            queue_evts: evts,
            interrupt,
            acked_features: VIRTIO_F_VERSION_1,
        };
        self.dev.lock().unwrap().activate(args).unwrap();
        self.pump();
        self.post_rx(32);
    }

    /// Runs the event loop until nothing is ready.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle (busy loop?)");
    }

    fn kick(&mut self, q: usize) {
        self.kicks[q].write(1).unwrap();
        self.pump();
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.rx.add_chain(&[Seg::Write(RX_BUF)]);
        }
        self.kick(RXQ);
    }

    /// Keeps at least 32 rx buffers posted.
    fn refill_rx(&mut self) {
        let have = self.rx.outstanding() as usize;
        if have < 32 {
            self.post_rx(32 - have);
        }
    }

    /// Sends one tx packet laid out as `segs`.
    fn send_segs(&mut self, segs: &[Seg]) {
        self.tx.add_chain(segs);
        self.kick(TXQ);
    }

    /// Sends one packet, header and payload in one descriptor; `len` is set from `payload`.
    fn send(&mut self, mut hdr: VsockHeader, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_segs(&[Seg::Read(bytes)]);
    }

    fn recv(&mut self) -> Vec<Packet> {
        let p = self.rx.take_rx_packets();
        self.refill_rx();
        p
    }

    fn recv_one(&mut self) -> Packet {
        let mut p = self.recv();
        assert_eq!(p.len(), 1, "expected one packet, got {p:?}");
        p.pop().unwrap()
    }

    /// Receives `n` stream bytes for `port` (the guest's), acknowledging credit as a guest would.
    fn recv_stream(&mut self, port: u32, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            for (h, d) in self.recv() {
                assert_eq!(h.dst_port, port, "packet for another stream: {h:?}");
                match h.op() {
                    Some(Op::Rw) => out.extend_from_slice(&d),
                    Some(Op::CreditUpdate) | Some(Op::CreditRequest) => {}
                    _ => panic!("unexpected {h:?}"),
                }
            }
            if out.len() >= n {
                assert_eq!(out.len(), n);
                return out;
            }
            self.pump();
        }
        panic!("only {} of {n} bytes arrived", out.len());
    }

    /// A host client asks for guest port `port`, and the guest accepts. Returns the client
    /// and the host-side port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.pump();
        let (req, _) = self.recv_one();
        assert_eq!(req.op(), Some(Op::Request));
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, CID, port)
        );
        assert_eq!(req.type_, TYPE_STREAM);
        self.send(guest_hdr(Op::Response, port, req.src_port), &[]);
        assert_eq!(read_line(&client), format!("OK {}", req.src_port));
        (client, req.src_port)
    }

    /// The guest connects to host port `port`, served by `listener`. Returns the host's end and
    /// the guest's port.
    fn guest_connect(&mut self, listener: &UnixListener, port: u32) -> (UnixStream, u32) {
        let gport = self.next_guest_port;
        self.next_guest_port += 1;
        self.send(guest_hdr(Op::Request, gport, port), &[]);
        listener.set_nonblocking(true).unwrap();
        let (host, _) = listener.accept().unwrap();
        let (resp, _) = self.recv_one();
        assert_eq!(resp.op(), Some(Op::Response));
        assert_eq!((resp.src_port, resp.dst_port), (port, gport));
        (host, gport)
    }

    fn host_listener(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.uds.display())).unwrap()
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }
}

#[test]
fn config_features_and_construction() {
    let h = Harness::new();
    let dev = h.dev.lock().unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(
        dev.avail_features(),
        VIRTIO_F_VERSION_1 | crate::devices::virtio::VIRTIO_RING_F_EVENT_IDX
    );
    let mut b = [0xffu8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut b = [0xffu8; 8];
    dev.read_config(4, &mut b);
    assert_eq!(b, [0; 8]);
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 8]);
    assert!(dev.is_activated());
    drop(dev);

    let dir = TempDir::new().unwrap();
    let missing = dir.as_path().join("nope").join("v.sock");
    assert!(matches!(
        Vsock::new(CID, missing),
        Err(VsockError::MissingDirectory(_))
    ));
    assert!(matches!(
        Vsock::new(2, dir.as_path().join("a.sock")),
        Err(VsockError::InvalidCid(2))
    ));
    let file = dir.as_path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Vsock::new(CID, file),
        Err(VsockError::NotASocket(_))
    ));
    // A stale socket is replaced, and removed on drop.
    let path = dir.as_path().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    let dev = Vsock::new(CID, path.clone()).unwrap();
    assert_eq!(dev.uds_path(), path.as_path());
    assert_eq!(dev.guest_cid(), CID);
    drop(dev);
    assert!(!path.exists());
}

#[test]
fn activate_checks_queue_count() {
    let h = Harness::new();
    let args = ActivateArgs {
        mem: h.mem.clone(),
        queues: vec![h.rx.queue()],
        queue_evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        interrupt: Arc::new(Interrupt::new(
            Arc::new(AtomicU32::new(0)),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )),
        acked_features: 0,
    };
    let err = h.dev.lock().unwrap().activate(args).unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 3,
            got: 1
        }
    ));
}

#[test]
fn host_initiated_stream_carries_bytes_both_ways() {
    let mut h = Harness::new();
    let (client, hport) = h.host_connect(52);
    assert_eq!(h.connections(), 1);
    assert_ne!(h.irq_status.load(std::sync::atomic::Ordering::Acquire), 0);

    // Host to guest, more than one rx buffer's worth.
    let up = pattern(1, 10_000);
    (&client).write_all(&up).unwrap();
    h.pump();
    assert_eq!(h.recv_stream(52, up.len()), up);

    // Guest to host.
    let down = pattern(2, 7_000);
    let mut rw = guest_hdr(Op::Rw, 52, hport);
    rw.fwd_cnt = up.len() as u32;
    h.send(rw, &down);
    assert_eq!(read_exact_timeout(&client, down.len()), down);
}

#[test]
fn lowercase_connect_and_bytes_right_after_the_line() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"connect 1024\nhello").unwrap();
    h.pump();
    let (req, _) = h.recv_one();
    assert_eq!((req.op(), req.dst_port), (Some(Op::Request), 1024));
    h.send(guest_hdr(Op::Response, 1024, req.src_port), &[]);
    assert_eq!(read_line(&client), format!("OK {}", req.src_port));
    assert_eq!(h.recv_stream(1024, 5), b"hello");
}

#[test]
fn guest_initiated_stream_carries_bytes_both_ways() {
    let mut h = Harness::new();
    let listener = h.host_listener(1025);
    let (host, gport) = h.guest_connect(&listener, 1025);

    let down = pattern(3, 100_000);
    for chunk in down.chunks(MAX_PKT_PAYLOAD) {
        h.send(guest_hdr(Op::Rw, gport, 1025), chunk);
    }
    assert_eq!(read_exact_timeout(&host, down.len()), down);

    let up = pattern(4, 3_000);
    (&host).write_all(&up).unwrap();
    h.pump();
    assert_eq!(h.recv_stream(gport, up.len()), up);
}

#[test]
fn guest_connect_without_host_listener_gets_rst() {
    let mut h = Harness::new();
    h.send(guest_hdr(Op::Request, 3000, 9999), &[]);
    let (rst, _) = h.recv_one();
    assert_eq!(rst.op(), Some(Op::Rst));
    assert_eq!((rst.src_cid, rst.dst_cid), (HOST_CID, CID));
    assert_eq!((rst.src_port, rst.dst_port), (9999, 3000));
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_connect_refused_by_guest_closes_the_client() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 77\n").unwrap();
    h.pump();
    let (req, _) = h.recv_one();
    h.send(guest_hdr(Op::Rst, 77, req.src_port), &[]);
    // No RST back for an RST.
    assert!(h.recv().is_empty());
    assert!(is_closed(&client));
    assert_eq!(h.connections(), 0);
}

#[test]
fn packet_for_no_stream_gets_rst() {
    let mut h = Harness::new();
    h.send(guest_hdr(Op::Rw, 3001, 52), b"data");
    let (rst, _) = h.recv_one();
    assert_eq!(
        (rst.op(), rst.src_port, rst.dst_port),
        (Some(Op::Rst), 52, 3001)
    );
    h.send(guest_hdr(Op::Rst, 3001, 52), &[]);
    assert!(h.recv().is_empty());
}

#[test]
fn host_reads_stop_at_guest_credit_and_resume_on_credit_update() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    h.pump();
    let (req, _) = h.recv_one();
    let hport = req.src_port;
    // The guest's receive buffer is 1000 bytes.
    let mut resp = guest_hdr(Op::Response, 52, hport);
    resp.buf_alloc = 1000;
    h.send(resp, &[]);
    read_line(&client);

    let data = pattern(5, 2500);
    (&client).write_all(&data).unwrap();
    h.pump();
    let mut got = Vec::new();
    let mut requests = 0;
    for (p, d) in h.recv() {
        match p.op() {
            Some(Op::Rw) => got.extend_from_slice(&d),
            Some(Op::CreditRequest) => requests += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got.len(), 1000, "the device overran the guest's credit");
    assert_eq!(requests, 1);
    // Nothing more without credit, however often the loop runs.
    h.kick(RXQ);
    assert!(h.recv().is_empty());

    // The guest consumed 1000 bytes.
    let mut upd = guest_hdr(Op::CreditUpdate, 52, hport);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    h.send(upd, &[]);
    for (p, d) in h.recv() {
        if p.op() == Some(Op::Rw) {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got.len(), 2000);
    upd.fwd_cnt = 2000;
    h.send(upd, &[]);
    for (p, d) in h.recv() {
        if p.op() == Some(Op::Rw) {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got, data);
}

#[test]
fn guest_gets_credit_updates() {
    let mut h = Harness::new();
    let listener = h.host_listener(1026);
    let (host, gport) = h.guest_connect(&listener, 1026);

    // Asked: answered at once.
    h.send(guest_hdr(Op::CreditRequest, gport, 1026), &[]);
    let (upd, _) = h.recv_one();
    assert_eq!(upd.op(), Some(Op::CreditUpdate));
    assert_eq!((upd.buf_alloc, upd.fwd_cnt), (CONN_TX_BUF_SIZE, 0));

    // Unasked: once the threshold of forwarded bytes is reached.
    let small = pattern(6, (CREDIT_UPDATE_THRESHOLD - 1) as usize);
    h.send(guest_hdr(Op::Rw, gport, 1026), &small);
    assert!(h.recv().is_empty());
    h.send(guest_hdr(Op::Rw, gport, 1026), b"!");
    let (upd, _) = h.recv_one();
    assert_eq!(upd.op(), Some(Op::CreditUpdate));
    assert_eq!(upd.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
    let got = read_exact_timeout(&host, small.len() + 1);
    assert_eq!(&got[..small.len()], &small[..]);
}

#[test]
fn host_back_pressure_buffers_then_flushes_on_epollout() {
    let mut h = Harness::new();
    let listener = h.host_listener(1027);
    let (host, gport) = h.guest_connect(&listener, 1027);

    // The guest fills its whole credit while the host reads nothing.
    let data = pattern(7, CONN_TX_BUF_SIZE as usize);
    let mut fwd_seen = 0;
    for chunk in data.chunks(MAX_PKT_PAYLOAD) {
        h.send(guest_hdr(Op::Rw, gport, 1027), chunk);
        for (p, _) in h.recv() {
            assert_eq!(p.op(), Some(Op::CreditUpdate));
            fwd_seen = p.fwd_cnt;
        }
    }
    // The socket (about 208 KiB by default) could not take it all: the device holds the rest.
    let buffered = h.dev.lock().unwrap().muxer.tx_buffered();
    assert!(
        buffered > 0,
        "the host socket took everything; nothing was held back"
    );
    assert!((fwd_seen as usize) <= data.len() - buffered);

    // The host drains: EPOLLOUT makes the device write the rest, byte exact.
    let mut got = Vec::new();
    host.set_nonblocking(true).unwrap();
    let mut b = vec![0u8; 65536];
    for _ in 0..10_000 {
        match (&host).read(&mut b) {
            Ok(0) => panic!("unexpected EOF"),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if got.len() == data.len() {
                    break;
                }
                h.pump();
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    // And the guest learns that everything was forwarded.
    for (p, _) in h.recv() {
        fwd_seen = p.fwd_cnt;
    }
    assert_eq!(fwd_seen, CONN_TX_BUF_SIZE);
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut h = Harness::new();
    let listener = h.host_listener(1028);
    let (host, gport) = h.guest_connect(&listener, 1028);
    let chunk = vec![1u8; MAX_PKT_PAYLOAD];
    let mut reset = false;
    // The host never reads; the guest ignores credit.
    for _ in 0..64 {
        h.send(guest_hdr(Op::Rw, gport, 1028), &chunk);
        if h.recv().iter().any(|(p, _)| p.op() == Some(Op::Rst)) {
            reset = true;
            break;
        }
    }
    assert!(reset);
    assert_eq!(h.connections(), 0);
    assert!(is_closed(&host));
}

fn split_at_sizes(bytes: &[u8], sizes: &[usize]) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut rest = bytes;
    for &s in sizes {
        let (a, b) = rest.split_at(s.min(rest.len()));
        out.push(Seg::Read(a.to_vec()));
        rest = b;
    }
    out.push(Seg::Read(rest.to_vec()));
    out
}

#[test]
fn tx_descriptor_layouts() {
    let mut h = Harness::new();
    let (client, hport) = h.host_connect(52);
    let layouts: Vec<Vec<usize>> = vec![
        vec![HDR_LEN],                   // header alone, payload alone
        vec![],                          // header and payload in one descriptor
        vec![HDR_LEN, 1, 4095, 3, 1000], // payload over several odd-sized descriptors
        vec![20],                        // header split, payload with its second part
        vec![7, 30, 7, 100, 9999],       // header over three descriptors, payload split
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let payload = pattern(i as u8, 40_000 + i);
        let mut hdr = guest_hdr(Op::Rw, 52, hport);
        hdr.len = payload.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        h.send_segs(&split_at_sizes(&bytes, layout));
        assert_eq!(
            read_exact_timeout(&client, payload.len()),
            payload,
            "layout {layout:?}"
        );
        h.recv();
    }
    // Large: a 64 KiB payload over 17 descriptors (Linux >= 6.17 style).
    let payload = pattern(9, MAX_PKT_PAYLOAD);
    let mut hdr = guest_hdr(Op::Rw, 52, hport);
    hdr.len = payload.len() as u32;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    let sizes: Vec<usize> = std::iter::once(HDR_LEN).chain([4096; 15]).collect();
    h.send_segs(&split_at_sizes(&bytes, &sizes));
    assert_eq!(read_exact_timeout(&client, payload.len()), payload);
    assert!(is_quiet(&client));
}

#[test]
fn rx_descriptor_layouts() {
    let mut h = Harness::new();
    let (client, _) = h.host_connect(52);
    // Consume the buffers the harness posted, so the layouts below are used in order.
    let filler = pattern(0, 32 * 4096);
    (&client).write_all(&filler).unwrap();
    h.pump();
    let mut got = Vec::new();
    for (_, d) in h.rx.take_rx_packets() {
        got.extend_from_slice(&d);
    }
    assert_eq!(got, filler);
    assert_eq!(h.rx.outstanding(), 0);

    let layouts: Vec<Vec<u32>> = vec![
        vec![44, 4096],                     // header buffer + data buffer
        vec![4140],                         // one buffer
        vec![10, 34, 100, 7, 3000],         // odd sizes, header split
        vec![30, 2000],                     // header split over two
        vec![1, 2, 3, 4, 5, 6, 7, 16, 500], // header over eight descriptors
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let cap: u32 = layout.iter().sum();
        let payload = pattern(i as u8 + 50, cap as usize - HDR_LEN);
        (&client).write_all(&payload).unwrap();
        h.pump();
        assert!(h.rx.take_used().is_empty());
        let segs: Vec<Seg> = layout.iter().map(|&s| Seg::Write(s)).collect();
        h.rx.add_chain(&segs);
        h.kick(RXQ);
        let mut pkts = h.rx.take_rx_packets();
        assert_eq!(pkts.len(), 1, "layout {layout:?}");
        let (hdr, data) = pkts.pop().unwrap();
        assert_eq!(hdr.op(), Some(Op::Rw));
        assert_eq!(data, payload, "layout {layout:?}");
    }
}

#[test]
fn malformed_packets_are_dropped_or_reset_without_harm() {
    let mut h = Harness::new();
    let (client, hport) = h.host_connect(52);
    let rst_to = |pkts: &[Packet], port: u32| {
        pkts.len() == 1 && pkts[0].0.op() == Some(Op::Rst) && pkts[0].0.dst_port == port
    };

    // Shorter than a header (even split): dropped.
    h.send_segs(&[Seg::Read(vec![0; 20]), Seg::Read(vec![0; 10])]);
    assert!(h.recv().is_empty());
    // An empty chain of writable descriptors on the tx queue: dropped.
    h.send_segs(&[Seg::Write(64)]);
    assert!(h.recv().is_empty());
    // A descriptor outside guest memory: dropped.
    h.tx.add_raw_chain(&[(1 << 40, 64, false)]);
    h.kick(TXQ);
    assert!(h.recv().is_empty());

    // len beyond the chain, for no stream: RST.
    let mut hdr = guest_hdr(Op::Rw, 4000, 52);
    hdr.len = 100;
    let mut b = hdr.to_bytes().to_vec();
    b.extend_from_slice(&[0; 10]);
    h.send_segs(&[Seg::Read(b)]);
    assert!(rst_to(&h.recv(), 4000));
    // len beyond the maximum packet: RST.
    let mut hdr = guest_hdr(Op::Rw, 4001, 52);
    hdr.len = (MAX_PKT_PAYLOAD + 1) as u32;
    let mut b = hdr.to_bytes().to_vec();
    b.resize(HDR_LEN + MAX_PKT_PAYLOAD + 1, 0);
    h.send_segs(&[Seg::Read(b)]);
    assert!(rst_to(&h.recv(), 4001));
    // Unknown op: RST.
    let mut hdr = guest_hdr(Op::Rw, 4002, 52);
    hdr.op = 99;
    h.send(hdr, &[]);
    assert!(rst_to(&h.recv(), 4002));
    // Wrong destination CID: RST.
    let mut hdr = guest_hdr(Op::Request, 4003, 52);
    hdr.dst_cid = 7;
    h.send(hdr, &[]);
    assert!(rst_to(&h.recv(), 4003));
    // Wrong type: RST.
    let mut hdr = guest_hdr(Op::Request, 4004, 52);
    hdr.type_ = 2;
    h.send(hdr, &[]);
    assert!(rst_to(&h.recv(), 4004));
    // Spoofed source CID: dropped.
    let mut hdr = guest_hdr(Op::Request, 4005, 52);
    hdr.src_cid = 1234;
    h.send(hdr, &[]);
    assert!(h.recv().is_empty());

    // The established stream never noticed.
    (&client).write_all(b"still here").unwrap();
    h.pump();
    assert_eq!(h.recv_stream(52, 10), b"still here");
    assert_eq!(h.connections(), 1);

    // A bad length on the stream itself resets it.
    let mut hdr = guest_hdr(Op::Rw, 52, hport);
    hdr.len = 1000;
    let mut b = hdr.to_bytes().to_vec();
    b.extend_from_slice(&[0; 999]);
    h.send_segs(&[Seg::Read(b)]);
    assert!(rst_to(&h.recv(), 52));
    assert!(is_closed(&client));
    assert_eq!(h.connections(), 0);
}

#[test]
fn handshake_abuse_closes_only_that_client() {
    let mut h = Harness::new();
    let (good, hport) = h.host_connect(52);

    // Gone before sending anything.
    drop(UnixStream::connect(&h.uds).unwrap());
    // No newline, too long.
    let mut long = UnixStream::connect(&h.uds).unwrap();
    long.write_all(&[b'A'; 40]).unwrap();
    // Garbage lines.
    let mut garbage = UnixStream::connect(&h.uds).unwrap();
    garbage.write_all(b"HELLO WORLD\n").unwrap();
    let mut bad_port = UnixStream::connect(&h.uds).unwrap();
    bad_port.write_all(b"CONNECT abc\n").unwrap();
    let mut overflow = UnixStream::connect(&h.uds).unwrap();
    overflow.write_all(b"CONNECT 99999999999\n").unwrap();
    let mut binary = UnixStream::connect(&h.uds).unwrap();
    binary.write_all(&[0, 0xff, 0x80, b'\n']).unwrap();
    // Byte by byte, with the loop running in between: fine.
    let mut slow = UnixStream::connect(&h.uds).unwrap();
    for &b in b"connect 53" {
        slow.write_all(&[b]).unwrap();
        h.pump();
    }
    // Half a line, then gone.
    let mut half = UnixStream::connect(&h.uds).unwrap();
    half.write_all(b"CONN").unwrap();
    h.pump();
    drop(half);
    h.pump();

    assert!(h.recv().is_empty(), "no request for a bad handshake");
    for s in [&long, &garbage, &bad_port, &overflow, &binary] {
        assert!(is_closed(s));
    }
    assert!(is_quiet(&slow));
    slow.write_all(b"\n").unwrap();
    h.pump();
    let (req, _) = h.recv_one();
    assert_eq!((req.op(), req.dst_port), (Some(Op::Request), 53));
    assert_eq!(h.dev.lock().unwrap().muxer.handshake_count(), 0);

    // The established stream is unaffected, both ways.
    (&good).write_all(b"ping").unwrap();
    h.pump();
    assert_eq!(h.recv_stream(52, 4), b"ping");
    h.send(guest_hdr(Op::Rw, 52, hport), b"pong");
    assert_eq!(read_exact_timeout(&good, 4), b"pong");
}

#[test]
fn guest_half_close_then_host_close() {
    let mut h = Harness::new();
    let (client, hport) = h.host_connect(52);
    h.send(guest_hdr(Op::Rw, 52, hport), b"bye");
    let mut sd = guest_hdr(Op::Shutdown, 52, hport);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    // The client gets the bytes then EOF, and can still answer.
    assert_eq!(read_exact_timeout(&client, 3), b"bye");
    let mut b = [0u8; 1];
    assert_eq!((&client).read(&mut b).unwrap(), 0);
    (&client).write_all(b"ack").unwrap();
    h.pump();
    assert_eq!(h.recv_stream(52, 3), b"ack");
    // Then it closes: the guest gets SHUTDOWN, and as both sides are done, RST.
    drop(client);
    h.pump();
    let pkts = h.recv();
    let ops: Vec<_> = pkts.iter().map(|(p, _)| p.op()).collect();
    assert_eq!(ops, vec![Some(Op::Shutdown), Some(Op::Rst)]);
    assert_eq!(pkts[0].0.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    assert_eq!(h.connections(), 0);
}

#[test]
fn guest_close_gets_rst_after_flush() {
    let mut h = Harness::new();
    let listener = h.host_listener(1029);
    let (host, gport) = h.guest_connect(&listener, 1029);
    h.send(guest_hdr(Op::Rw, gport, 1029), b"last words");
    let mut sd = guest_hdr(Op::Shutdown, gport, 1029);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    h.send(sd, &[]);
    let (rst, _) = h.recv_one();
    assert_eq!(rst.op(), Some(Op::Rst));
    assert_eq!(read_exact_timeout(&host, 10), b"last words");
    assert!(is_closed(&host));
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_close_then_guest_rst() {
    let mut h = Harness::new();
    let (client, hport) = h.host_connect(52);
    (&client).write_all(b"final").unwrap();
    drop(client);
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 2);
    assert_eq!(
        (pkts[0].0.op(), pkts[0].1.as_slice()),
        (Some(Op::Rw), &b"final"[..])
    );
    assert_eq!(pkts[1].0.op(), Some(Op::Shutdown));
    assert_eq!(pkts[1].0.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    assert_eq!(h.connections(), 1);
    h.send(guest_hdr(Op::Rst, 52, hport), &[]);
    assert!(h.recv().is_empty());
    assert_eq!(h.connections(), 0);
}

#[test]
fn stuck_streams_are_reset_at_their_deadline() {
    let mut h = Harness::new();
    // The guest never answers a REQUEST.
    let mut silent = UnixStream::connect(&h.uds).unwrap();
    silent.write_all(b"CONNECT 60\n").unwrap();
    h.pump();
    let (req, _) = h.recv_one();
    // The guest never resets after the host's full close.
    let (client, _) = h.host_connect(61);
    drop(client);
    h.pump();
    let (sd, _) = h.recv_one();
    assert_eq!(sd.op(), Some(Op::Shutdown));
    // A client that never sends its line.
    let mute = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    assert_eq!(h.connections(), 2);
    assert!(
        h.dev.lock().unwrap().timer_deadline.is_some(),
        "timer armed"
    );

    let later = Instant::now() + Duration::from_secs(60);
    h.dev.lock().unwrap().expire_deadlines_at(later);
    h.pump();
    let mut rsts: Vec<(u32, u32)> = h
        .recv()
        .iter()
        .map(|(p, _)| {
            assert_eq!(p.op(), Some(Op::Rst));
            (p.dst_port, p.src_port)
        })
        .collect();
    rsts.sort();
    assert_eq!(rsts, vec![(60, req.src_port), (61, sd.src_port)]);
    assert!(is_closed(&silent));
    assert!(is_closed(&mute));
    assert_eq!(h.connections(), 0);
    assert_eq!(h.dev.lock().unwrap().muxer.next_deadline(), None);
}

#[test]
fn reset_closes_streams_and_reactivation_works() {
    let mut h = Harness::new();
    let (client, _) = h.host_connect(52);
    let listener = h.host_listener(1030);
    let (host, _) = h.guest_connect(&listener, 1030);
    let pending = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    h.dev.lock().unwrap().reset();
    h.pump();
    assert!(!h.dev.lock().unwrap().is_activated());
    for s in [&client, &host, &pending] {
        assert!(is_closed(s));
    }
    assert_eq!(h.connections(), 0);
    // Kicks on the old queue eventfds are ignored.
    h.kicks[TXQ].write(1).unwrap();
    h.pump();

    // The driver comes back.
    h.activate();
    let (client, hport) = h.host_connect(52);
    h.send(guest_hdr(Op::Rw, 52, hport), b"again");
    assert_eq!(read_exact_timeout(&client, 5), b"again");
}

#[test]
fn many_streams_interleave() {
    let mut h = Harness::new();
    let mut streams = Vec::new();
    for i in 0..8u32 {
        let (c, hport) = h.host_connect(100 + i);
        streams.push((c, hport, 100 + i));
    }
    // Everyone writes, then the guest reads all.
    for (i, (c, _, _)) in streams.iter().enumerate() {
        (&*c).write_all(&pattern(i as u8, 5000 + i)).unwrap();
    }
    h.pump();
    let mut per_port: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    for _ in 0..100 {
        for (p, d) in h.recv() {
            assert_eq!(p.op(), Some(Op::Rw));
            per_port
                .entry(p.dst_port)
                .or_default()
                .extend_from_slice(&d);
        }
        if per_port.values().map(Vec::len).sum::<usize>() == (0..8).map(|i| 5000 + i).sum::<usize>()
        {
            break;
        }
        h.pump();
    }
    for (i, (_, _, port)) in streams.iter().enumerate() {
        assert_eq!(per_port[port], pattern(i as u8, 5000 + i), "port {port}");
    }
    // The guest answers each in reverse order.
    for (i, (_, hport, port)) in streams.iter().enumerate().rev() {
        h.send(
            guest_hdr(Op::Rw, *port, *hport),
            &pattern(100 + i as u8, 300),
        );
    }
    for (i, (c, _, _)) in streams.iter().enumerate() {
        assert_eq!(read_exact_timeout(c, 300), pattern(100 + i as u8, 300));
        assert!(is_quiet(c));
    }
}

#[test]
fn without_rx_buffers_host_sockets_wait_for_the_guest() {
    let mut h = Harness::new();
    let (client, _) = h.host_connect(52);
    // Use up every rx buffer.
    let filler = pattern(1, 32 * 4096);
    (&client).write_all(&filler).unwrap();
    h.pump();
    assert_eq!(h.rx.outstanding(), 0);
    // More data: the device must not spin (pump would panic) nor lose it.
    let more = pattern(2, 10_000);
    (&client).write_all(&more).unwrap();
    h.pump();
    h.pump();
    let mut got = Vec::new();
    for (_, d) in h.rx.take_rx_packets() {
        got.extend_from_slice(&d);
    }
    assert_eq!(got, filler);
    // The guest posts buffers and kicks: the rest flows.
    h.post_rx(8);
    assert_eq!(h.recv_stream(52, more.len()), more);
}

#[test]
fn tx_waits_while_rsts_pile_up() {
    let mut h = Harness::new();
    // Use up every rx buffer with RSTs, then send many more packets that each need one.
    for p in 0..(32 + muxer::MAX_RST_BACKLOG as u32 + 20) {
        h.tx.add_chain(&[Seg::Read(
            guest_hdr(Op::Rw, 5000 + p, 52).to_bytes().to_vec(),
        )]);
        if h.tx.outstanding() >= 200 {
            h.kick(TXQ);
        }
    }
    h.kick(TXQ);
    assert!(h.tx.outstanding() > 0, "tx should stall on the rst backlog");
    assert_eq!(h.rx.take_rx_packets().len(), 32);
    // Rx buffers come back: everything is answered.
    let mut rsts = 32;
    for _ in 0..100 {
        h.post_rx(64);
        rsts += h.rx.take_rx_packets().len();
        if h.tx.outstanding() == 0 && rsts == 32 + muxer::MAX_RST_BACKLOG + 20 {
            break;
        }
    }
    assert_eq!(h.tx.outstanding(), 0);
    assert_eq!(rsts, 32 + muxer::MAX_RST_BACKLOG + 20);
}

#[test]
fn timer_event_rearms_without_spinning() {
    let mut h = Harness::new();
    let mut silent = UnixStream::connect(&h.uds).unwrap();
    silent.write_all(b"CONNECT 60\n").unwrap();
    h.pump();
    let (req, _) = h.recv_one();
    assert_eq!(req.op(), Some(Op::Request));
    let real = h.dev.lock().unwrap().muxer.next_deadline().unwrap();
    assert_eq!(h.dev.lock().unwrap().timer_deadline, Some(real));
    // Make the timerfd fire long before the deadline.
    h.dev
        .lock()
        .unwrap()
        .timer
        .reset(Duration::from_millis(1), None)
        .unwrap();
    assert_eq!(h.em.run_with_timeout(5000).unwrap(), 1);
    // It is no longer readable (pump would spin otherwise), nothing expired early, and it is
    // armed for the real deadline again.
    h.pump();
    assert_eq!(h.connections(), 1);
    assert!(is_quiet(&silent));
    assert_eq!(h.dev.lock().unwrap().timer_deadline, Some(real));
    assert!(h.dev.lock().unwrap().timer.is_armed().unwrap());
}

#[test]
fn client_waits_for_the_driver() {
    let mut h = Harness::new();
    h.dev.lock().unwrap().reset();
    h.pump();
    // A client asks before the driver is up: it is accepted and waits, without a deadline.
    let mut early = UnixStream::connect(&h.uds).unwrap();
    early.write_all(b"CONNECT 52\n").unwrap();
    h.pump();
    assert_eq!(h.connections(), 1);
    assert_eq!(h.dev.lock().unwrap().muxer.next_deadline(), None);
    // The driver comes up: the request goes out, and the stream works.
    h.activate();
    let (req, _) = h.recv_one();
    assert_eq!((req.op(), req.dst_port), (Some(Op::Request), 52));
    h.send(guest_hdr(Op::Response, 52, req.src_port), &[]);
    assert_eq!(read_line(&early), format!("OK {}", req.src_port));
    h.send(guest_hdr(Op::Rw, 52, req.src_port), b"hi");
    assert_eq!(read_exact_timeout(&early, 2), b"hi");
}

#[test]
fn a_corrupt_avail_index_does_not_spin() {
    use vm_memory::Bytes;
    let mut h = Harness::new();
    // Pending rx data, so that process_rx looks for buffers too.
    let (_host, _port) = h.host_connect(5000);
    // More chains "available" than the queues hold (the avail rings' idx fields, see
    // GuestQueue::new's layout): virtio-queue yields none, yet the rings do not look empty.
    for avail in [0x1000u64, 0x1_1000] {
        h.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    }
    h.kicks[RXQ].write(1).unwrap();
    h.kicks[TXQ].write(1).unwrap();
    // The event loop runs on a thread of its own, so that a busy loop fails the test rather than
    // hanging it.
    let mut em = std::mem::replace(&mut h.em, EventManager::new().unwrap());
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while em.run_with_timeout(0).unwrap() > 0 {}
        let _ = done.send(());
    });
    wait.recv_timeout(Duration::from_secs(10))
        .expect("the device spins on a corrupt avail index");
}
