//! virtio-vsock packets: the 44-byte header and how it travels in descriptor chains.
//!
//! Every packet on the rx and tx queues is a `struct virtio_vsock_hdr` (virtio 1.2, 5.10.6),
//! all fields little endian, immediately followed by `len` bytes of payload:
//!
//! ```text
//! offset  size  field
//!      0     8  src_cid
//!      8     8  dst_cid
//!     16     4  src_port
//!     20     4  dst_port
//!     24     4  len        payload bytes after the header
//!     28     2  type       1 = STREAM
//!     30     2  op         REQUEST 1, RESPONSE 2, RST 3, SHUTDOWN 4, RW 5,
//!                          CREDIT_UPDATE 6, CREDIT_REQUEST 7
//!     32     4  flags      SHUTDOWN only: bit 0 = RCV, bit 1 = SEND
//!     36     4  buf_alloc  sender's receive buffer size for this stream
//!     40     4  fwd_cnt    bytes the sender has consumed from that buffer
//! ```
//!
//! The spec does not tie this layout to descriptors, and drivers have changed theirs over
//! time: Linux before 6.2 put the header and the payload in separate descriptors, later
//! kernels use one descriptor for both, and since 6.17 a large tx payload spans several
//! descriptors. Devices that assumed one shape broke each time (Firecracker #4284, #5475;
//! Cloud Hypervisor #5691, #7672). So a tx chain is read here as one byte stream over all of
//! its device-readable descriptors (virtio-queue's [`Reader`]), and an rx packet is written as
//! one byte stream over all of the chain's device-writable descriptors ([`Writer`]). Nothing
//! depends on how many descriptors there are or where their boundaries fall, the header's
//! included.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload the device accepts from the guest or puts in one rx packet (64 KiB).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// The well-known CID of the host.
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device carries.
pub const TYPE_STREAM: u16 = 1;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset (refused or torn down).
    Rst = 3,
    /// One or both directions closed ([`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
    Shutdown = 4,
    /// Stream data.
    Rw = 5,
    /// Unsolicited credit information.
    CreditUpdate = 6,
    /// Asks the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The operation for a raw `op` field, if it is one.
    pub fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// A decoded `virtio_vsock_hdr`. Fields hold raw wire values: `op` and `type_` may be anything
/// the guest wrote, and are checked by the muxer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (raw).
    pub type_: u16,
    /// Operation (raw).
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Decodes a header from its wire bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header to its wire bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The decoded operation, if `op` is a known one.
    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }
}

/// Why a guest buffer could not be used as a packet.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The descriptor chain points outside guest memory or is otherwise unusable.
    #[error("unusable descriptor chain: {0}")]
    Chain(virtio_queue::Error),
    /// The chain holds fewer bytes than a header.
    #[error("descriptor chain holds {0} bytes, less than a {HDR_LEN}-byte header")]
    ShortChain(usize),
    /// The header's `len` is larger than [`MAX_PKT_PAYLOAD`] or than what the chain carries.
    /// The header itself is valid, so the sender can be told (RST).
    #[error("payload length {} is invalid ({available} bytes follow the header)", .hdr.len)]
    BadLen {
        /// The header as read.
        hdr: VsockHeader,
        /// Bytes the chain has after the header.
        available: usize,
    },
    /// Copying to or from guest memory failed.
    #[error("guest memory access failed: {0}")]
    Io(std::io::Error),
}

/// Reads one tx packet: its header, and its payload into `payload` (resized to `len`).
///
/// The chain is consumed as one byte stream over its device-readable descriptors. Bytes after
/// the `len` payload bytes are ignored, as Linux never sends any.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut Vec<u8>,
) -> Result<VsockHeader, PacketError> {
    let mut reader: Reader<'_> = chain.reader(mem).map_err(PacketError::Chain)?;
    let total = reader.available_bytes();
    if total < HDR_LEN {
        return Err(PacketError::ShortChain(total));
    }
    let mut raw = [0u8; HDR_LEN];
    reader.read_exact(&mut raw).map_err(PacketError::Io)?;
    let hdr = VsockHeader::from_bytes(&raw);
    let available = reader.available_bytes();
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len > available {
        return Err(PacketError::BadLen { hdr, available });
    }
    payload.clear();
    payload.resize(len, 0);
    reader.read_exact(payload).map_err(PacketError::Io)?;
    Ok(hdr)
}

/// A device-writable rx buffer: all writable descriptors of one chain, as one byte stream.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Wraps the writable part of `chain`.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let writer = chain.writer(mem).map_err(PacketError::Chain)?;
        Ok(Self { writer })
    }

    /// Bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.writer.available_bytes()
    }

    /// The largest payload that fits after a header (0 if not even a header fits).
    pub fn max_payload(&self) -> usize {
        self.capacity().saturating_sub(HDR_LEN).min(MAX_PKT_PAYLOAD)
    }

    /// Writes `hdr` (its `len` set from `payload`) then `payload`; returns the bytes written,
    /// for the used ring.
    pub fn write_packet(mut self, hdr: &VsockHeader, payload: &[u8]) -> Result<u32, PacketError> {
        let total = HDR_LEN + payload.len();
        if total > self.capacity() {
            return Err(PacketError::ShortChain(self.capacity()));
        }
        let len =
            u32::try_from(payload.len()).map_err(|_| PacketError::ShortChain(self.capacity()))?;
        let hdr = VsockHeader { len, ..*hdr };
        self.writer
            .write_all(&hdr.to_bytes())
            .map_err(PacketError::Io)?;
        self.writer.write_all(payload).map_err(PacketError::Io)?;
        // `total` fits: it is at most HDR_LEN + the u32 `len` checked above, and the chain
        // holds it, so it is below 2^32 (virtio limits a chain to 2^32 bytes).
        u32::try_from(total).map_err(|_| PacketError::ShortChain(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::test_utils::{GuestQueue, Seg};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn sample_hdr(len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        }
    }

    /// Splits `bytes` at the given cumulative sizes; the remainder is the last segment.
    fn split(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        for &s in sizes {
            let (a, b) = rest.split_at(s.min(rest.len()));
            out.push(a.to_vec());
            rest = b;
        }
        out.push(rest.to_vec());
        out
    }

    #[test]
    fn header_is_little_endian_and_round_trips() {
        let h = sample_hdr(7);
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1234_5678u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(VsockHeader::from_bytes(&b), h);
        assert_eq!(Op::from_raw(0), None);
        assert_eq!(Op::from_raw(8), None);
        assert_eq!(Op::from_raw(7), Some(Op::CreditRequest));
    }

    #[test]
    fn tx_every_layout_reads_the_same_packet() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut bytes = sample_hdr(5000).to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let layouts: Vec<Vec<usize>> = vec![
            vec![HDR_LEN],                // header alone + payload alone
            vec![],                       // header + payload in one descriptor
            vec![HDR_LEN, 1, 999, 3, 17], // payload over many odd-sized descriptors
            vec![20],                     // header split, payload with its tail
            vec![1, 43, 2500],            // header split, payload split
            vec![13, 13, 13, 5, 4999],    // header over four descriptors
        ];
        let m = mem();
        for layout in layouts {
            let mut q = GuestQueue::new(&m, 0, 16);
            let segs: Vec<Seg> = split(&bytes, &layout).into_iter().map(Seg::Read).collect();
            q.add_chain(&segs);
            let mut queue = q.queue();
            let chain = queue.pop_descriptor_chain(&m).unwrap();
            let mut got = Vec::new();
            let hdr = read_tx_packet(&m, chain, &mut got).unwrap();
            assert_eq!(hdr, sample_hdr(5000), "layout {layout:?}");
            assert_eq!(got, payload, "layout {layout:?}");
        }
    }

    #[test]
    fn tx_malformed_chains_are_errors() {
        let m = mem();
        let mut q = GuestQueue::new(&m, 0, 16);
        let mut queue = q.queue();
        let mut buf = Vec::new();

        // Shorter than a header, even split.
        q.add_chain(&[Seg::Read(vec![0; 20]), Seg::Read(vec![0; 10])]);
        let c = queue.pop_descriptor_chain(&m).unwrap();
        assert!(matches!(
            read_tx_packet(&m, c, &mut buf),
            Err(PacketError::ShortChain(30))
        ));

        // len larger than what follows.
        let mut b = sample_hdr(100).to_bytes().to_vec();
        b.extend_from_slice(&[1; 10]);
        q.add_chain(&[Seg::Read(b)]);
        let c = queue.pop_descriptor_chain(&m).unwrap();
        match read_tx_packet(&m, c, &mut buf) {
            Err(PacketError::BadLen { hdr, available }) => {
                assert_eq!(hdr.len, 100);
                assert_eq!(available, 10);
            }
            other => panic!("unexpected {other:?}"),
        }

        // len larger than the maximum packet, even if the chain is that big.
        let len = MAX_PKT_PAYLOAD + 1;
        let mut b = sample_hdr(len as u32).to_bytes().to_vec();
        b.resize(HDR_LEN + len, 0);
        q.add_chain(&[Seg::Read(b)]);
        let c = queue.pop_descriptor_chain(&m).unwrap();
        assert!(matches!(
            read_tx_packet(&m, c, &mut buf),
            Err(PacketError::BadLen { .. })
        ));

        // A chain of only writable descriptors has no readable bytes.
        q.add_chain(&[Seg::Write(100)]);
        let c = queue.pop_descriptor_chain(&m).unwrap();
        assert!(matches!(
            read_tx_packet(&m, c, &mut buf),
            Err(PacketError::ShortChain(0))
        ));

        // A descriptor pointing outside guest memory.
        q.add_raw_chain(&[(0xffff_0000_0000, 64, false)]);
        let c = queue.pop_descriptor_chain(&m).unwrap();
        assert!(read_tx_packet(&m, c, &mut buf).is_err());
    }

    #[test]
    fn rx_every_layout_carries_the_same_packet() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
        let layouts: Vec<Vec<u32>> = vec![
            vec![44, 4096],                // header + data buffers (Linux < 6.2)
            vec![4140],                    // one buffer for both
            vec![10, 34, 100, 7, 4000],    // odd sizes, header split
            vec![30, 4096],                // header split over two
            vec![1, 1, 1, 1, 40, 2999, 1], // exactly fits
        ];
        let m = mem();
        for layout in layouts {
            let mut q = GuestQueue::new(&m, 0, 16);
            let segs: Vec<Seg> = layout.iter().map(|&s| Seg::Write(s)).collect();
            q.add_chain(&segs);
            let mut queue = q.queue();
            let chain = queue.pop_descriptor_chain(&m).unwrap();
            let head = chain.head_index();
            let buf = RxBuffer::new(&m, chain).unwrap();
            assert_eq!(buf.capacity(), layout.iter().sum::<u32>() as usize);
            let n = buf.write_packet(&sample_hdr(0), &payload).unwrap();
            assert_eq!(n as usize, HDR_LEN + payload.len());
            queue.add_used(&m, head, n).unwrap();
            let (hdr, data) = q.take_rx_packets().pop().unwrap();
            assert_eq!(hdr, sample_hdr(3000), "layout {layout:?}");
            assert_eq!(data, payload, "layout {layout:?}");
        }
    }

    #[test]
    fn rx_buffer_too_small_is_an_error() {
        let m = mem();
        let mut q = GuestQueue::new(&m, 0, 16);
        let mut queue = q.queue();
        q.add_chain(&[Seg::Write(20), Seg::Write(20)]);
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        let buf = RxBuffer::new(&m, chain).unwrap();
        assert_eq!(buf.max_payload(), 0);
        assert!(buf.write_packet(&sample_hdr(0), &[]).is_err());

        // Readable descriptors in an rx chain are skipped, not written.
        q.add_chain(&[Seg::Read(vec![9; 8]), Seg::Write(50)]);
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        let buf = RxBuffer::new(&m, chain).unwrap();
        assert_eq!(buf.capacity(), 50);
        assert_eq!(buf.max_payload(), 6);
    }
}
