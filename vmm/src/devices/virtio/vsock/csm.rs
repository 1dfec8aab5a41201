//! One vsock stream between a guest AF_VSOCK socket and a host AF_UNIX socket: its state
//! machine and its credit-based flow control.
//!
//! # States
//!
//! ```text
//!   host client sent "CONNECT p"           guest sent REQUEST to port p
//!            |                                         |
//!        LocalInit --REQUEST--> guest            PeerInit --RESPONSE--> guest
//!            |                                         |
//!   guest RESPONSE: "OK <port>\n" to client            |
//!            +------------------> Established <--------+
//! ```
//!
//! A guest RST ends the stream at once, in any state. Shutdown is per direction and
//! cumulative:
//! - guest SHUTDOWN with SEND: once the bytes already buffered for the host are written, the
//!   host socket's write side is shut (the host reader sees EOF);
//! - guest SHUTDOWN with RCV: the host socket is no longer read;
//! - host EOF (a read returns 0): the guest gets SHUTDOWN with SEND, plus RCV when the host
//!   socket hung up entirely (epoll HUP: nothing will read what the guest sends).
//!
//! The stream is over, and the device sends RST and closes the host socket, when the guest has
//! shut both directions and its bytes are flushed (the guest's `close()` waits for that RST),
//! or when both sides have stopped sending. A stream waiting on a peer that never finishes
//! (a guest that never answers a REQUEST or never resets after a full SHUTDOWN, a host that
//! never drains what the guest sent before closing) has a deadline after which it is reset;
//! the muxer checks deadlines from a timer, no thread sleeps.
//!
//! # Credit (virtio 1.2, 5.10.6.3)
//!
//! Each side advertises `buf_alloc`, the size of its receive buffer, and `fwd_cnt`, how many
//! bytes it has consumed from it, in every header it sends. A sender may have at most
//! `peer buf_alloc - (bytes sent - peer fwd_cnt)` bytes in flight.
//! - Host to guest: bytes are read from the host socket only up to the guest's free credit; at
//!   zero the socket is left unread (so the host writer blocks) and one CREDIT_REQUEST is sent.
//! - Guest to host: the device advertises [`CONN_TX_BUF_SIZE`]. Bytes the host socket does not
//!   take at once are kept (a guest that exceeds its credit is reset) and written when the
//!   socket becomes writable; `fwd_cnt` counts bytes written to the host. A CREDIT_UPDATE is
//!   sent when the guest's view of `fwd_cnt` lags by [`CREDIT_UPDATE_THRESHOLD`], or when the
//!   guest asks; every other packet to the guest carries the current values too.
//!
//! Host sockets are non-blocking and registered edge-triggered for input and output; the
//! `readable` and `writable` flags remember an edge until a read or write hits `EWOULDBLOCK`,
//! so no epoll interest ever needs to change and an unread socket causes no wake-ups.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    Op, VsockHeader, HOST_CID, MAX_PKT_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer the device advertises to the guest for each stream (`buf_alloc`).
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Send a CREDIT_UPDATE once this many bytes were forwarded since the guest last heard.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// How long a host-initiated stream waits for the guest's RESPONSE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing stream waits for the peer to finish before it is reset.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A stream's addresses, seen from the host: `local_port` is the host side's port,
/// `peer_port` the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// What the muxer must do with a stream after an operation on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Send the guest RST and close the host socket.
    Reset,
    /// Close the host socket; the guest already knows (it sent RST).
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated; the REQUEST is queued (`false`) or sent (`true`).
    LocalInit { request_sent: bool },
    /// Guest-initiated; the RESPONSE is queued.
    PeerInit,
    /// Data flows.
    Established,
}

/// One stream. See the module docs.
pub struct Connection {
    key: ConnKey,
    guest_cid: u64,
    stream: UnixStream,
    token: u32,
    state: State,
    /// The host socket may have bytes (or EOF) to read.
    readable: bool,
    /// The host socket may accept bytes.
    writable: bool,
    /// The host socket hung up (both directions).
    hup: bool,
    /// The host socket returned EOF and the guest was sent SHUTDOWN.
    host_eof: bool,
    guest_shut_rcv: bool,
    guest_shut_send: bool,
    host_write_shut: bool,
    /// Guest bytes not yet taken by the host socket.
    tx_buf: VecDeque<u8>,
    /// Guest bytes written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    credit_update_pending: bool,
    credit_request_sent: bool,
    deadline: Option<Instant>,
    /// Muxer bookkeeping: the stream is in the muxer's rx queue.
    pub(crate) in_rxq: bool,
    /// Muxer bookkeeping: the deadline the muxer's timer heap knows about.
    pub(crate) tracked_deadline: Option<Instant>,
}

impl Connection {
    fn new(stream: UnixStream, token: u32, key: ConnKey, guest_cid: u64, state: State) -> Self {
        Self {
            key,
            guest_cid,
            stream,
            token,
            state,
            // Unknown until a read or write says otherwise.
            readable: true,
            writable: true,
            hup: false,
            host_eof: false,
            guest_shut_rcv: false,
            guest_shut_send: false,
            host_write_shut: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            credit_update_pending: false,
            credit_request_sent: false,
            deadline: None,
            in_rxq: false,
            tracked_deadline: None,
        }
    }

    /// A stream a host client asked for with `CONNECT <key.peer_port>`; the REQUEST to the
    /// guest is queued. The guest has [`CONNECT_TIMEOUT`] to answer once it is sent (a
    /// client may connect before the driver is up; it waits until then, or until it hangs
    /// up).
    pub fn host_initiated(stream: UnixStream, token: u32, key: ConnKey, guest_cid: u64) -> Self {
        Self::new(
            stream,
            token,
            key,
            guest_cid,
            State::LocalInit {
                request_sent: false,
            },
        )
    }

    /// A stream for the guest's `request`, with the host socket already connected; the
    /// RESPONSE is queued.
    pub fn guest_initiated(
        stream: UnixStream,
        token: u32,
        key: ConnKey,
        guest_cid: u64,
        request: &VsockHeader,
    ) -> Self {
        let mut c = Self::new(stream, token, key, guest_cid, State::PeerInit);
        c.update_peer_credit(request);
        c
    }

    /// The stream's addresses.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The event-loop token of the host socket.
    pub fn token(&self) -> u32 {
        self.token
    }

    /// The host socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives up the host socket (to be unregistered, then closed).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// When the stream must be reset if it is still waiting on its peer.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the handshake is done.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Bytes the guest may still receive: its free credit.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than it got, or shrinking its buffer below
        // what is in flight, gets nothing more until its numbers add up.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host socket.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        let fwd = Wrapping(hdr.fwd_cnt);
        if hdr.buf_alloc != self.peer_buf_alloc || fwd != self.peer_fwd_cnt {
            self.credit_request_sent = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = fwd;
    }

    /// Whether the host socket should be read for the guest now.
    fn wants_host_data(&self) -> bool {
        self.state == State::Established && self.readable && !self.host_eof && !self.guest_shut_rcv
    }

    fn wants_credit_request(&self) -> bool {
        self.wants_host_data() && self.peer_credit() == 0 && !self.credit_request_sent
    }

    /// Whether [`Connection::next_rx`] has something to send.
    pub fn has_pending_rx(&self) -> bool {
        match self.state {
            State::LocalInit { request_sent } => !request_sent,
            State::PeerInit => true,
            State::Established => {
                self.credit_update_pending
                    || (self.wants_host_data() && self.peer_credit() > 0)
                    || self.wants_credit_request()
            }
        }
    }

    /// A header from this stream to the guest. Every header carries our credit, so the
    /// guest's view of `fwd_cnt` is now current.
    fn header(&mut self, op: Op, flags: u32, len: u32) -> VsockHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_pending = false;
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The RST that ends this stream.
    pub fn rst_header(&self) -> VsockHeader {
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..VsockHeader::default()
        }
    }

    /// Handles a packet the guest sent on this stream (addresses already matched).
    pub fn on_guest_packet(&mut self, hdr: &VsockHeader, payload: &[u8], now: Instant) -> Verdict {
        let Some(op) = hdr.op() else {
            return Verdict::Reset;
        };
        if op == Op::Rst {
            return Verdict::Close;
        }
        self.update_peer_credit(hdr);
        match op {
            Op::Request | Op::Rst => Verdict::Reset,
            Op::Response => match self.state {
                State::LocalInit { request_sent: true } => self.accept_response(),
                _ => Verdict::Reset,
            },
            Op::Rw => {
                if self.state != State::Established || self.guest_shut_send {
                    return Verdict::Reset;
                }
                self.push_tx(payload, now)
            }
            Op::CreditUpdate => Verdict::Keep,
            Op::CreditRequest => {
                self.credit_update_pending = true;
                Verdict::Keep
            }
            Op::Shutdown => {
                if self.state != State::Established {
                    return Verdict::Reset;
                }
                self.guest_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                self.guest_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                self.after_tx_progress(now)
            }
        }
    }

    /// The guest accepted a host-initiated stream: tell the host client.
    fn accept_response(&mut self) -> Verdict {
        let line = format!("OK {}\n", self.key.local_port);
        // The socket's send buffer is empty (nothing was sent to the client yet), so a short
        // or blocked write means the client is gone or broken.
        match (&self.stream).write(line.as_bytes()) {
            Ok(n) if n == line.len() => {
                self.state = State::Established;
                self.deadline = None;
                Verdict::Keep
            }
            Ok(_) | Err(_) => Verdict::Reset,
        }
    }

    /// Guest stream bytes for the host socket.
    fn push_tx(&mut self, payload: &[u8], now: Instant) -> Verdict {
        if payload.is_empty() {
            return Verdict::Keep;
        }
        if self.tx_buf.len() + payload.len() > CONN_TX_BUF_SIZE as usize {
            tracing::debug!(key = ?self.key, "vsock: guest sent beyond its credit");
            return Verdict::Reset;
        }
        let mut written = 0;
        if self.tx_buf.is_empty() && self.writable {
            match self.write_host(payload) {
                Ok(n) => written = n,
                Err(()) => return Verdict::Reset,
            }
        }
        self.tx_buf.extend(&payload[written..]);
        self.after_tx_progress(now)
    }

    /// Writes to the host socket until done or it would block; counts `fwd_cnt`.
    fn write_host(&mut self, mut bytes: &[u8]) -> Result<usize, ()> {
        let mut total = 0;
        while !bytes.is_empty() {
            match (&self.stream).write(bytes) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    total += n;
                    bytes = &bytes[n..];
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.writable = false;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(key = ?self.key, "vsock: host socket write failed: {e}");
                    return Err(());
                }
            }
        }
        // `total` is at most CONN_TX_BUF_SIZE here (the buffer bound), so it fits in u32.
        self.fwd_cnt += Wrapping(u32::try_from(total).unwrap_or(u32::MAX));
        Ok(total)
    }

    /// Writes buffered guest bytes to the host socket.
    fn flush_tx(&mut self) -> Result<(), ()> {
        while self.writable && !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let chunk = front.len().min(MAX_PKT_PAYLOAD);
            let bytes = front[..chunk].to_vec();
            let n = self.write_host(&bytes)?;
            self.tx_buf.drain(..n);
        }
        Ok(())
    }

    /// After bytes moved towards the host or a guest shutdown: credit, write-side shutdown,
    /// and whether the stream is over.
    fn after_tx_progress(&mut self, now: Instant) -> Verdict {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_pending = true;
        }
        if self.tx_buf.is_empty() && self.guest_shut_send && !self.host_write_shut {
            // The host reader sees EOF. ENOTCONN if it is already gone: nothing to do.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        self.check_finished(now)
    }

    fn check_finished(&mut self, now: Instant) -> Verdict {
        if self.guest_shut_rcv && self.guest_shut_send {
            if self.tx_buf.is_empty() {
                return Verdict::Reset;
            }
            self.deadline.get_or_insert(now + SHUTDOWN_TIMEOUT);
        }
        if self.host_eof && self.host_write_shut {
            return Verdict::Reset;
        }
        Verdict::Keep
    }

    /// Handles an epoll event on the host socket.
    pub fn on_host_event(&mut self, set: EventSet, now: Instant) -> Verdict {
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.readable = true;
        }
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.writable = true;
        }
        if set.contains(EventSet::HANG_UP) {
            self.hup = true;
        }
        match self.state {
            // The client left before the guest answered: cancel the request if it went out.
            State::LocalInit { request_sent } if self.hup => {
                if request_sent {
                    Verdict::Reset
                } else {
                    Verdict::Close
                }
            }
            State::Established if !self.tx_buf.is_empty() => {
                if self.flush_tx().is_err() {
                    return Verdict::Reset;
                }
                self.after_tx_progress(now)
            }
            _ => Verdict::Keep,
        }
    }

    /// The next packet for the guest, if any: its header, with any payload in `buf` (at most
    /// `max_payload` bytes). Reading the host socket happens here, so bytes leave it only when
    /// an rx buffer is there to take them.
    pub fn next_rx(
        &mut self,
        max_payload: usize,
        buf: &mut Vec<u8>,
        now: Instant,
    ) -> (Option<VsockHeader>, Verdict) {
        buf.clear();
        match self.state {
            State::LocalInit {
                request_sent: false,
            } => {
                self.state = State::LocalInit { request_sent: true };
                self.deadline = Some(now + CONNECT_TIMEOUT);
                return (Some(self.header(Op::Request, 0, 0)), Verdict::Keep);
            }
            State::LocalInit { request_sent: true } => return (None, Verdict::Keep),
            State::PeerInit => {
                self.state = State::Established;
                return (Some(self.header(Op::Response, 0, 0)), Verdict::Keep);
            }
            State::Established => {}
        }

        let credit = self.peer_credit() as usize;
        let want = max_payload.min(credit).min(MAX_PKT_PAYLOAD);
        if self.wants_host_data() && want > 0 {
            buf.resize(want, 0);
            match (&self.stream).read(buf) {
                Ok(0) => {
                    buf.clear();
                    self.host_eof = true;
                    let mut flags = SHUTDOWN_SEND;
                    if self.hup {
                        flags |= SHUTDOWN_RCV;
                        // Nothing more can happen on the host side; the guest should reset.
                        self.deadline.get_or_insert(now + SHUTDOWN_TIMEOUT);
                    }
                    let hdr = self.header(Op::Shutdown, flags, 0);
                    return (Some(hdr), self.check_finished(now));
                }
                Ok(n) => {
                    buf.truncate(n);
                    // n <= MAX_PKT_PAYLOAD.
                    let len = u32::try_from(n).unwrap_or(u32::MAX);
                    self.rx_cnt += Wrapping(len);
                    return (Some(self.header(Op::Rw, 0, len)), Verdict::Keep);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    buf.clear();
                    self.readable = false;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => buf.clear(),
                Err(e) => {
                    buf.clear();
                    tracing::debug!(key = ?self.key, "vsock: host socket read failed: {e}");
                    return (None, Verdict::Reset);
                }
            }
        }
        if self.credit_update_pending {
            return (Some(self.header(Op::CreditUpdate, 0, 0)), Verdict::Keep);
        }
        if self.wants_credit_request() {
            self.credit_request_sent = true;
            return (Some(self.header(Op::CreditRequest, 0, 0)), Verdict::Keep);
        }
        (None, Verdict::Keep)
    }

    /// The deadline passed (if it did): the stream is reset.
    pub fn on_deadline(&mut self, now: Instant) -> Verdict {
        match self.deadline {
            Some(d) if d <= now => {
                tracing::debug!(key = ?self.key, state = ?self.state, "vsock: stream timed out");
                Verdict::Reset
            }
            _ => Verdict::Keep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;
    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 52,
    };

    fn guest_hdr(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: KEY.peer_port,
            dst_port: KEY.local_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// An established guest-initiated stream and the host end of its socket.
    fn established(buf_alloc: u32) -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let req = guest_hdr(Op::Request, 0, buf_alloc, 0);
        let mut c = Connection::guest_initiated(ours, 16, KEY, CID, &req);
        let mut buf = Vec::new();
        let (h, v) = c.next_rx(4096, &mut buf, Instant::now());
        assert_eq!(h.unwrap().op(), Some(Op::Response));
        assert_eq!(v, Verdict::Keep);
        assert!(c.is_established());
        (c, theirs)
    }

    fn read_all(s: &UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8; 65536];
        loop {
            match (&*s).read(&mut b) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    #[test]
    fn peer_credit_wraps_and_saturates() {
        let (mut c, _h) = established(1000);
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt = Wrapping(u32::MAX - 10);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 10);
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt += Wrapping(600); // wrapped past zero
        assert_eq!(c.peer_credit(), 400);
        // A guest claiming more than was sent gets no credit rather than a huge one.
        c.peer_fwd_cnt = c.rx_cnt + Wrapping(5);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn host_reads_stop_at_peer_credit_and_ask_once() {
        let (mut c, host) = established(100);
        (&host).write_all(&[7u8; 300]).unwrap();
        let mut buf = Vec::new();
        let now = Instant::now();
        let (h, _) = c.next_rx(4096, &mut buf, now);
        let h = h.unwrap();
        assert_eq!((h.op(), h.len, buf.len()), (Some(Op::Rw), 100, 100));
        // No credit left: one CREDIT_REQUEST, then nothing.
        let (h, _) = c.next_rx(4096, &mut buf, now);
        assert_eq!(h.unwrap().op(), Some(Op::CreditRequest));
        assert!(!c.has_pending_rx());
        assert_eq!(c.next_rx(4096, &mut buf, now).0, None);
        // The guest consumed 100 bytes.
        let upd = guest_hdr(Op::CreditUpdate, 0, 100, 100);
        assert_eq!(c.on_guest_packet(&upd, &[], now), Verdict::Keep);
        assert!(c.has_pending_rx());
        let (h, _) = c.next_rx(30, &mut buf, now);
        assert_eq!((h.unwrap().len, buf.len()), (30, 30));
    }

    #[test]
    fn guest_bytes_are_buffered_when_host_blocks_and_credit_flows_back() {
        let (mut c, host) = established(4096);
        let now = Instant::now();
        let chunk = vec![0x5a; MAX_PKT_PAYLOAD];
        let mut sent = 0usize;
        // Fill until the socket pushes back, but stay within our advertised credit.
        while sent + chunk.len() <= CONN_TX_BUF_SIZE as usize {
            let h = guest_hdr(Op::Rw, chunk.len() as u32, 4096, 0);
            assert_eq!(c.on_guest_packet(&h, &chunk, now), Verdict::Keep);
            sent += chunk.len();
        }
        assert_eq!(
            c.fwd_cnt.0 as usize + c.tx_buffered(),
            sent,
            "every byte is either written or buffered"
        );
        // A credit update became due once 64 KiB were forwarded.
        assert!(c.has_pending_rx());
        let mut buf = Vec::new();
        let h = loop {
            let (h, _) = c.next_rx(4096, &mut buf, now);
            let h = h.unwrap();
            if h.op() == Some(Op::CreditUpdate) {
                break h;
            }
        };
        assert_eq!(h.fwd_cnt, c.fwd_cnt.0);
        assert_eq!(h.buf_alloc, CONN_TX_BUF_SIZE);

        // Exceeding the credit resets the stream.
        if c.tx_buffered() > 0 {
            let over = vec![1u8; CONN_TX_BUF_SIZE as usize - c.tx_buffered() + 1];
            let h = guest_hdr(Op::Rw, over.len() as u32, 4096, 0);
            assert_eq!(c.on_guest_packet(&h, &over, now), Verdict::Reset);
        }

        // The host drains; on EPOLLOUT the rest goes out.
        let mut got = read_all(&host);
        while got.len() < sent {
            assert_eq!(c.on_host_event(EventSet::OUT, now), Verdict::Keep);
            got.extend(read_all(&host));
        }
        assert_eq!(got.len(), sent);
        assert!(got.iter().all(|&b| b == 0x5a));
        assert_eq!(c.tx_buffered(), 0);
        assert_eq!(c.fwd_cnt.0 as usize, sent);
    }

    #[test]
    fn guest_full_shutdown_flushes_then_resets() {
        let (mut c, host) = established(4096);
        let now = Instant::now();
        let h = guest_hdr(Op::Rw, 5, 4096, 0);
        assert_eq!(c.on_guest_packet(&h, b"hello", now), Verdict::Keep);
        let mut sd = guest_hdr(Op::Shutdown, 0, 4096, 0);
        sd.flags = SHUTDOWN_SEND;
        assert_eq!(c.on_guest_packet(&sd, &[], now), Verdict::Keep);
        // The host sees the bytes then EOF, and can still write.
        assert_eq!(read_all(&host), b"hello");
        (&host).write_all(b"back").unwrap();
        let mut buf = Vec::new();
        let (h, _) = c.next_rx(4096, &mut buf, now);
        assert_eq!(
            (h.unwrap().op(), buf.as_slice()),
            (Some(Op::Rw), &b"back"[..])
        );
        // Guest data after its SEND shutdown is a protocol error.
        let h = guest_hdr(Op::Rw, 1, 4096, 0);
        assert_eq!(c.on_guest_packet(&h, b"x", now), Verdict::Reset);
        // Then the guest closes its read side too: RST.
        sd.flags = SHUTDOWN_RCV;
        assert_eq!(c.on_guest_packet(&sd, &[], now), Verdict::Reset);
    }

    #[test]
    fn host_eof_and_hangup_become_guest_shutdown() {
        // Half close: SEND only.
        let (mut c, host) = established(4096);
        let now = Instant::now();
        host.shutdown(Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        let (h, v) = c.next_rx(4096, &mut buf, now);
        let h = h.unwrap();
        assert_eq!(
            (h.op(), h.flags, v),
            (Some(Op::Shutdown), SHUTDOWN_SEND, Verdict::Keep)
        );
        assert_eq!(c.deadline(), None);
        // The guest can still send; then it shuts its side: both done, RST.
        let rw = guest_hdr(Op::Rw, 2, 4096, 0);
        assert_eq!(c.on_guest_packet(&rw, b"ok", now), Verdict::Keep);
        assert_eq!(read_all(&host), b"ok");
        let mut sd = guest_hdr(Op::Shutdown, 0, 4096, 0);
        sd.flags = SHUTDOWN_SEND;
        assert_eq!(c.on_guest_packet(&sd, &[], now), Verdict::Reset);

        // Full close: RCV|SEND, and a deadline for the guest's RST.
        let (mut c, host) = established(4096);
        drop(host);
        assert_eq!(
            c.on_host_event(EventSet::IN | EventSet::HANG_UP, now),
            Verdict::Keep
        );
        let (h, _) = c.next_rx(4096, &mut buf, now);
        assert_eq!(h.unwrap().flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
        let d = c.deadline().unwrap();
        assert_eq!(c.on_deadline(now), Verdict::Keep);
        assert_eq!(c.on_deadline(d), Verdict::Reset);
        // The guest's RST closes it quietly.
        let rst = guest_hdr(Op::Rst, 0, 0, 0);
        assert_eq!(c.on_guest_packet(&rst, &[], now), Verdict::Close);
    }

    #[test]
    fn host_initiated_handshake() {
        let (ours, client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        client.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let mut c = Connection::host_initiated(ours, 16, KEY, CID);
        assert_eq!(c.deadline(), None);
        let rw = guest_hdr(Op::Rw, 1, 4096, 0);
        let mut buf = Vec::new();
        let (h, _) = c.next_rx(4096, &mut buf, now);
        assert_eq!(c.deadline(), Some(now + CONNECT_TIMEOUT));
        let h = h.unwrap();
        assert_eq!(
            (h.op(), h.src_port, h.dst_port),
            (Some(Op::Request), KEY.local_port, 52)
        );
        assert_eq!(
            (h.src_cid, h.dst_cid, h.buf_alloc),
            (HOST_CID, CID, CONN_TX_BUF_SIZE)
        );
        assert!(!c.has_pending_rx());
        let resp = guest_hdr(Op::Response, 0, 4096, 0);
        assert_eq!(c.on_guest_packet(&resp, &[], now), Verdict::Keep);
        assert!(c.is_established());
        assert_eq!(c.deadline(), None);
        assert_eq!(read_all(&client), format!("OK {}\n", 1u32 << 30).as_bytes());
        assert_eq!(c.on_guest_packet(&rw, b"z", now), Verdict::Keep);
        assert_eq!(read_all(&client), b"z");
        // A second RESPONSE is a protocol error.
        assert_eq!(c.on_guest_packet(&resp, &[], now), Verdict::Reset);
    }

    #[test]
    fn client_gone_before_response() {
        let (ours, client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let mut c = Connection::host_initiated(ours, 16, KEY, CID);
        drop(client);
        // Before the REQUEST went out: just close.
        assert_eq!(c.on_host_event(EventSet::HANG_UP, now), Verdict::Close);
        let mut buf = Vec::new();
        let _ = c.next_rx(4096, &mut buf, now);
        // After: the guest must be told.
        assert_eq!(c.on_host_event(EventSet::HANG_UP, now), Verdict::Reset);
    }

    #[test]
    fn credit_request_is_answered_and_unknown_op_resets() {
        let (mut c, _host) = established(4096);
        let now = Instant::now();
        let mut buf = Vec::new();
        // Nothing to read yet.
        let _ = c.next_rx(4096, &mut buf, now);
        assert!(!c.has_pending_rx());
        let req = guest_hdr(Op::CreditRequest, 0, 4096, 0);
        assert_eq!(c.on_guest_packet(&req, &[], now), Verdict::Keep);
        let (h, _) = c.next_rx(4096, &mut buf, now);
        assert_eq!(h.unwrap().op(), Some(Op::CreditUpdate));
        let mut bad = guest_hdr(Op::Rw, 0, 4096, 0);
        bad.op = 42;
        assert_eq!(c.on_guest_packet(&bad, &[], now), Verdict::Reset);
    }
}
