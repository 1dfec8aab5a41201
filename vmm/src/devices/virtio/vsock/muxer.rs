//! The host side of the device: Firecracker-compatible "hybrid vsock" over AF_UNIX sockets,
//! multiplexing every stream onto the one pair of virtqueues.
//!
//! # Host-initiated streams
//!
//! The device listens on a Unix socket at `uds_path`. A host client connects and writes one
//! line, `CONNECT <port>\n` (the keyword in any case: Firecracker documents upper case, Kata's
//! runtime-rs sends lower case). The device then sends the guest a REQUEST from a fresh host
//! port (from 2^30 up) to `<port>`. When the guest answers RESPONSE the client is sent
//! `OK <host port>\n` and from then on the socket carries the stream's bytes; a guest RST
//! (nothing listens on `<port>`) or no answer within two seconds closes the client.
//!
//! The line is read one byte at a time, so no stream byte the client sends after it is
//! swallowed. A client that disconnects first, sends a line of [`MAX_HANDSHAKE_LINE`] bytes
//! or more without a newline, a malformed line or a bad port, or stays silent for
//! [`HANDSHAKE_TIMEOUT`], is closed; nothing else is affected.
//!
//! # Guest-initiated streams
//!
//! A guest REQUEST to the host (CID 2), port `P`, makes the device connect to the Unix socket
//! `<uds_path>_<P>`; the guest gets RESPONSE if that works and RST if nothing listens there.
//!
//! # Routing
//!
//! A stream is keyed by (host port, guest port). A guest packet for no stream gets RST (unless
//! it is one), as does one for another CID, with an unknown op or type, or with a bad length.
//! Packets claiming another source CID are dropped. Packets for the guest wait in two queues:
//! RSTs that belong to no stream, and streams with something to send (each at most once,
//! served round-robin); they are produced only when the guest has posted an rx buffer, so a
//! guest that posts none simply stops host sockets from being read.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::csm::{ConnKey, Connection, Verdict};
use super::event_handler::{stream_events, FdTable, FIRST_STREAM_TOKEN};
use super::packet::{Op, VsockHeader, HOST_CID, TYPE_STREAM};

/// Most host sockets (streams and pending handshakes) at once.
pub const MAX_CONNECTIONS: usize = 1023;
/// A handshake line this long without a newline is garbage.
pub const MAX_HANDSHAKE_LINE: usize = 32;
/// How long a host client may take to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// While this many stream-less RSTs wait for rx buffers, the tx queue is not processed.
pub const MAX_RST_BACKLOG: usize = 256;
/// Hard bound on waiting RSTs; more are dropped.
const MAX_RST_QUEUE: usize = 4 * MAX_RST_BACKLOG + MAX_CONNECTIONS;
/// The first host port given to host-initiated streams.
const LOCAL_PORT_BASE: u32 = 1 << 30;

/// A host client that has not finished its `CONNECT` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Handshake(u32),
    Conn(ConnKey),
}

/// Parses a `CONNECT <port>` line (without its `\n`).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_ascii_whitespace();
    let keyword = words.next()?;
    let port = words.next()?;
    if words.next().is_some() || !keyword.eq_ignore_ascii_case("connect") {
        return None;
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// The RST answering `hdr`.
fn reply_rst(hdr: &VsockHeader, guest_cid: u64) -> VsockHeader {
    VsockHeader {
        src_cid: hdr.dst_cid,
        dst_cid: guest_cid,
        src_port: hdr.dst_port,
        dst_port: hdr.src_port,
        type_: hdr.type_,
        op: Op::Rst as u16,
        ..VsockHeader::default()
    }
}

/// Host sockets and the streams they carry. See the module docs.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    /// Stream tokens to streams.
    tokens: HashMap<u32, ConnKey>,
    handshakes: HashMap<u32, Handshake>,
    /// Streams with something for the guest.
    rxq: VecDeque<ConnKey>,
    /// RSTs for no (longer existing) stream.
    rst_q: VecDeque<VsockHeader>,
    deadlines: BinaryHeap<Reverse<(Instant, Due)>>,
    next_token: u32,
    next_local_port: u32,
    /// Interest-list changes for the event loop.
    pub(crate) fds: FdTable,
}

impl Muxer {
    /// A muxer serving `listener` (bound at `uds_path`, non-blocking) for the guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            rst_q: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: LOCAL_PORT_BASE,
            fds: FdTable::default(),
        }
    }

    /// The listener's fd, for the event loop.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Streams open now.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Guest bytes held for host sockets that would block, over all streams.
    pub fn tx_buffered(&self) -> usize {
        self.conns.values().map(Connection::tx_buffered).sum()
    }

    /// Host clients still in the `CONNECT` handshake.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Whether a packet for the guest is (probably) waiting.
    pub fn has_pending_rx(&self) -> bool {
        !self.rst_q.is_empty() || !self.rxq.is_empty()
    }

    /// Whether tx processing should wait for the guest to drain RSTs first.
    pub fn rst_backlog_full(&self) -> bool {
        self.rst_q.len() >= MAX_RST_BACKLOG
    }

    /// Whether a deadline entry still applies (entries are left behind when a stream closes,
    /// a handshake completes or a deadline is cleared).
    fn is_due_current(&self, d: Instant, due: Due) -> bool {
        match due {
            Due::Handshake(token) => self.handshakes.get(&token).is_some_and(|h| h.deadline == d),
            Due::Conn(key) => self
                .conns
                .get(&key)
                .is_some_and(|c| c.deadline() == Some(d)),
        }
    }

    /// The earliest deadline to wake up for.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((d, due))) = self.deadlines.peek() {
            if self.is_due_current(d, due) {
                return Some(d);
            }
            self.deadlines.pop();
        }
        None
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(FIRST_STREAM_TOKEN);
            if !self.tokens.contains_key(&t) && !self.handshakes.contains_key(&t) {
                return t;
            }
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return p;
            }
        }
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS
    }

    fn push_rst(&mut self, hdr: VsockHeader) {
        if self.rst_q.len() >= MAX_RST_QUEUE {
            tracing::warn!("vsock: rst queue full, dropping an rst");
            return;
        }
        self.rst_q.push_back(hdr);
    }

    /// Accepts pending host clients (the listener is readable).
    pub fn accept(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept on the host socket failed: {e}");
                    return;
                }
            };
            if self.at_capacity() {
                tracing::warn!("vsock: too many host connections, refusing one");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("vsock: cannot make a host socket non-blocking: {e}");
                continue;
            }
            let token = self.alloc_token();
            self.fds.add(&stream, token, stream_events());
            let deadline = now + HANDSHAKE_TIMEOUT;
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::new(),
                    deadline,
                },
            );
            self.deadlines
                .push(Reverse((deadline, Due::Handshake(token))));
            // Clients usually send the line right away.
            self.read_handshake(token);
        }
    }

    /// Handles an epoll event on host socket `token`.
    pub fn handle_event(&mut self, token: u32, set: EventSet, now: Instant) {
        if self.handshakes.contains_key(&token) {
            self.read_handshake(token);
        } else if let Some(&key) = self.tokens.get(&token) {
            if let Some(c) = self.conns.get_mut(&key) {
                let v = c.on_host_event(set, now);
                self.settle(key, v);
            }
        } else {
            tracing::debug!(token, "vsock: event for a closed host socket");
        }
    }

    fn read_handshake(&mut self, token: u32) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let outcome = loop {
            if hs.line.len() >= MAX_HANDSHAKE_LINE {
                break Err("line too long");
            }
            let mut byte = [0u8; 1];
            match (&hs.stream).read(&mut byte) {
                Ok(0) => break Err("closed before the handshake"),
                Ok(_) if byte[0] == b'\n' => {
                    break parse_connect_line(&hs.line).ok_or("malformed CONNECT line")
                }
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        match outcome {
            Ok(port) => self.open_host_initiated(token, hs.stream, port),
            Err(why) => {
                tracing::debug!(token, line = ?String::from_utf8_lossy(&hs.line), "vsock: closing host client: {why}");
                self.fds.close(hs.stream, token);
            }
        }
    }

    fn open_host_initiated(&mut self, token: u32, stream: UnixStream, port: u32) {
        let key = ConnKey {
            local_port: self.alloc_local_port(port),
            peer_port: port,
        };
        tracing::debug!(?key, "vsock: host-initiated stream");
        let conn = Connection::host_initiated(stream, token, key, self.guest_cid);
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.settle(key, Verdict::Keep);
    }

    fn open_guest_initiated(&mut self, hdr: &VsockHeader) {
        if self.at_capacity() {
            tracing::warn!("vsock: too many streams, refusing a guest connection");
            self.push_rst(reply_rst(hdr, self.guest_cid));
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        // A Unix connect() completes at once unless the listener's backlog is full.
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(?path, "vsock: guest connection refused: {e}");
                self.push_rst(reply_rst(hdr, self.guest_cid));
                return;
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("vsock: cannot make a host socket non-blocking: {e}");
            self.push_rst(reply_rst(hdr, self.guest_cid));
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        tracing::debug!(?key, "vsock: guest-initiated stream");
        let token = self.alloc_token();
        self.fds.add(&stream, token, stream_events());
        let conn = Connection::guest_initiated(stream, token, key, self.guest_cid, hdr);
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.settle(key, Verdict::Keep);
    }

    /// Acts on a stream's verdict; for a kept stream, queues it for rx and tracks its
    /// deadline.
    fn settle(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Reset => self.remove_conn(key, true),
            Verdict::Close => self.remove_conn(key, false),
            Verdict::Keep => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if c.has_pending_rx() && !c.in_rxq {
                    c.in_rxq = true;
                    self.rxq.push_back(key);
                }
                if let Some(d) = c.deadline() {
                    if c.tracked_deadline != Some(d) {
                        c.tracked_deadline = Some(d);
                        self.deadlines.push(Reverse((d, Due::Conn(key))));
                    }
                }
            }
        }
    }

    fn remove_conn(&mut self, key: ConnKey, send_rst: bool) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        tracing::debug!(?key, send_rst, "vsock: stream closed");
        self.tokens.remove(&c.token());
        if send_rst {
            self.push_rst(c.rst_header());
        }
        let token = c.token();
        self.fds.close(c.into_stream(), token);
    }

    /// Handles a packet from the guest's tx queue.
    pub fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8], now: Instant) {
        if hdr.src_cid != self.guest_cid {
            tracing::debug!(?hdr, "vsock: dropping a packet with a foreign source cid");
            return;
        }
        let op = hdr.op();
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM || op.is_none() {
            tracing::debug!(?hdr, "vsock: unroutable packet");
            self.reject(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(c) = self.conns.get_mut(&key) {
            let v = c.on_guest_packet(hdr, payload, now);
            self.settle(key, v);
            return;
        }
        match op {
            Some(Op::Request) => self.open_guest_initiated(hdr),
            Some(Op::Rst) => {}
            _ => {
                tracing::debug!(?hdr, "vsock: packet for no stream");
                self.push_rst(reply_rst(hdr, self.guest_cid));
            }
        }
    }

    /// Refuses a packet the device cannot carry (bad length, op, type or destination): its
    /// stream, if any, is reset, and the sender gets RST unless it sent one.
    pub fn reject(&mut self, hdr: &VsockHeader) {
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.dst_cid == HOST_CID && hdr.type_ == TYPE_STREAM && self.conns.contains_key(&key) {
            self.remove_conn(key, true);
        } else if hdr.op() != Some(Op::Rst) {
            self.push_rst(reply_rst(hdr, self.guest_cid));
        }
    }

    /// The next packet for the guest, with its payload in `buf` (at most `max_payload`
    /// bytes), or `None` if nothing is ready.
    pub fn recv_pkt(
        &mut self,
        max_payload: usize,
        buf: &mut Vec<u8>,
        now: Instant,
    ) -> Option<VsockHeader> {
        // Each queued stream is tried at most once per call, so one that cannot use this
        // buffer (say, too small for its data) does not spin.
        let mut budget = self.rxq.len();
        loop {
            if let Some(rst) = self.rst_q.pop_front() {
                buf.clear();
                return Some(rst);
            }
            if budget == 0 {
                return None;
            }
            budget -= 1;
            let key = self.rxq.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rxq = false;
            let (hdr, v) = c.next_rx(max_payload, buf, now);
            self.settle(key, v);
            if let Some(hdr) = hdr {
                return Some(hdr);
            }
        }
    }

    /// Resets streams and closes handshakes whose deadline passed.
    pub fn sweep(&mut self, now: Instant) {
        while let Some(&Reverse((d, due))) = self.deadlines.peek() {
            if d > now {
                break;
            }
            self.deadlines.pop();
            if !self.is_due_current(d, due) {
                continue;
            }
            match due {
                Due::Handshake(token) => {
                    if let Some(hs) = self.handshakes.remove(&token) {
                        tracing::debug!(token, "vsock: host client handshake timed out");
                        self.fds.close(hs.stream, token);
                    }
                }
                Due::Conn(key) => {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.tracked_deadline = None;
                        let v = c.on_deadline(now);
                        self.settle(key, v);
                    }
                }
            }
        }
    }

    /// Drops every stream and pending handshake (the driver reset: the guest side is gone,
    /// so no RST is sent). The listener stays.
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            let token = c.token();
            self.fds.close(c.into_stream(), token);
        }
        for (token, hs) in self.handshakes.drain() {
            self.fds.close(hs.stream, token);
        }
        self.tokens.clear();
        self.rxq.clear();
        self.rst_q.clear();
        self.deadlines.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempdir::TempDir;

    const CID: u64 = 3;

    struct Fixture {
        _dir: TempDir,
        uds: PathBuf,
        mux: Muxer,
    }

    fn fixture() -> Fixture {
        let dir = TempDir::new().unwrap();
        let uds = dir.as_path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mux = Muxer::new(CID, uds.clone(), listener);
        Fixture {
            _dir: dir,
            uds,
            mux,
        }
    }

    fn guest(op: Op, src_port: u32, dst_port: u32) -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op: op as u16,
            buf_alloc: 65536,
            ..VsockHeader::default()
        }
    }

    fn drain(mux: &mut Muxer) -> Vec<VsockHeader> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(h) = mux.recv_pkt(4096, &mut buf, Instant::now()) {
            out.push(h);
        }
        out
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"connect 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"Connect   7\r"), Some(7));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT +1"), None);
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"CONNECT 1 2"), None);
        assert_eq!(parse_connect_line(b"LISTEN 1"), None);
        assert_eq!(parse_connect_line(b""), None);
        assert_eq!(parse_connect_line(b"\xff\xfe 1"), None);
    }

    #[test]
    fn local_ports_skip_ones_in_use() {
        let mut f = fixture();
        let (a, _b) = UnixStream::pair().unwrap();
        let taken = ConnKey {
            local_port: LOCAL_PORT_BASE,
            peer_port: 52,
        };
        let c = Connection::host_initiated(a, 99, taken, CID);
        f.mux.conns.insert(taken, c);
        assert_eq!(f.mux.alloc_local_port(52), LOCAL_PORT_BASE + 1);
        assert_eq!(f.mux.alloc_local_port(53), LOCAL_PORT_BASE + 2);
        f.mux.next_local_port = u32::MAX;
        assert_eq!(f.mux.alloc_local_port(52), u32::MAX);
        assert_eq!(f.mux.alloc_local_port(52), LOCAL_PORT_BASE + 1);
    }

    #[test]
    fn tokens_wrap_past_the_fixed_ones() {
        let mut f = fixture();
        f.mux.next_token = u32::MAX;
        assert_eq!(f.mux.alloc_token(), u32::MAX);
        assert_eq!(f.mux.alloc_token(), FIRST_STREAM_TOKEN);
    }

    #[test]
    fn handshake_then_request_then_response() {
        let mut f = fixture();
        let mut client = UnixStream::connect(&f.uds).unwrap();
        client.write_all(b"connect 52\nearly").unwrap();
        f.mux.accept(Instant::now());
        assert_eq!(f.mux.connection_count(), 1);
        let pkts = drain(&mut f.mux);
        assert_eq!(pkts.len(), 1);
        let req = pkts[0];
        assert_eq!(
            (req.op(), req.dst_port, req.src_port),
            (Some(Op::Request), 52, LOCAL_PORT_BASE)
        );
        let resp = guest(Op::Response, 52, req.src_port);
        f.mux.send_pkt(&resp, &[], Instant::now());
        // The bytes sent after the line were kept for the stream.
        let mut buf = Vec::new();
        let h = f.mux.recv_pkt(4096, &mut buf, Instant::now()).unwrap();
        assert_eq!((h.op(), buf.as_slice()), (Some(Op::Rw), &b"early"[..]));
        client.set_nonblocking(true).unwrap();
        let mut line = [0u8; 64];
        let n = (&client).read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {LOCAL_PORT_BASE}\n").as_bytes());
    }

    #[test]
    fn unknown_stream_and_foreign_cid() {
        let mut f = fixture();
        let now = Instant::now();
        // Data for no stream: RST back with the addresses swapped.
        f.mux.send_pkt(&guest(Op::Rw, 1000, 77), &[], now);
        // An RST for no stream: nothing.
        f.mux.send_pkt(&guest(Op::Rst, 1000, 77), &[], now);
        // A foreign source CID: dropped.
        let mut spoof = guest(Op::Request, 1000, 77);
        spoof.src_cid = 9;
        f.mux.send_pkt(&spoof, &[], now);
        // Another destination CID: RST from that CID.
        let mut other = guest(Op::Request, 1001, 77);
        other.dst_cid = 5;
        f.mux.send_pkt(&other, &[], now);
        // Unknown type: RST with that type.
        let mut seq = guest(Op::Request, 1002, 77);
        seq.type_ = 2;
        f.mux.send_pkt(&seq, &[], now);
        let pkts = drain(&mut f.mux);
        assert_eq!(pkts.len(), 3);
        for p in &pkts {
            assert_eq!((p.op(), p.dst_cid, p.src_port), (Some(Op::Rst), CID, 77));
        }
        assert_eq!((pkts[0].src_cid, pkts[0].dst_port), (HOST_CID, 1000));
        assert_eq!((pkts[1].src_cid, pkts[1].dst_port), (5, 1001));
        assert_eq!((pkts[2].type_, pkts[2].dst_port), (2, 1002));
    }

    #[test]
    fn rst_backlog_is_bounded() {
        let mut f = fixture();
        let now = Instant::now();
        for p in 0..(MAX_RST_QUEUE as u32 + 10) {
            f.mux.send_pkt(&guest(Op::Rw, p, 77), &[], now);
        }
        assert!(f.mux.rst_backlog_full());
        assert_eq!(drain(&mut f.mux).len(), MAX_RST_QUEUE);
        assert!(!f.mux.rst_backlog_full());
    }

    #[test]
    fn silent_client_times_out() {
        let mut f = fixture();
        let now = Instant::now();
        let client = UnixStream::connect(&f.uds).unwrap();
        f.mux.accept(now);
        assert_eq!(f.mux.handshake_count(), 1);
        assert_eq!(f.mux.next_deadline(), Some(now + HANDSHAKE_TIMEOUT));
        f.mux
            .sweep(now + HANDSHAKE_TIMEOUT - Duration::from_millis(1));
        assert_eq!(f.mux.handshake_count(), 1);
        f.mux.sweep(now + HANDSHAKE_TIMEOUT);
        assert_eq!(f.mux.handshake_count(), 0);
        assert_eq!(f.mux.next_deadline(), None);
        f.mux.fds.apply(&mut NullRegistry);
        let mut b = [0u8; 1];
        assert_eq!((&client).read(&mut b).unwrap(), 0);
    }

    #[test]
    fn capacity_is_enforced() {
        let mut f = fixture();
        let now = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (a, b) = UnixStream::pair().unwrap();
            let t = f.mux.alloc_token();
            f.mux.handshakes.insert(
                t,
                Handshake {
                    stream: a,
                    line: Vec::new(),
                    deadline: now,
                },
            );
            clients.push(b);
        }
        let extra = UnixStream::connect(&f.uds).unwrap();
        f.mux.accept(now);
        assert_eq!(f.mux.handshake_count(), MAX_CONNECTIONS);
        let mut b = [0u8; 1];
        assert_eq!((&extra).read(&mut b).unwrap(), 0);
        // A guest connection is refused too, with RST.
        let _l = UnixListener::bind(format!("{}_80", f.uds.display())).unwrap();
        f.mux.send_pkt(&guest(Op::Request, 5, 80), &[], now);
        assert_eq!(drain(&mut f.mux)[0].op(), Some(Op::Rst));
    }

    struct NullRegistry;

    impl super::super::event_handler::FdRegistry for NullRegistry {
        fn add(&mut self, _: RawFd, _: u32, _: EventSet) -> Result<(), String> {
            Ok(())
        }

        fn remove(&mut self, _: RawFd) -> Result<(), String> {
            Ok(())
        }
    }
}
