//! Test fixtures: the guest driver's side of a split virtqueue in anonymous guest memory.
//!
//! virtio-queue's `MockSplitQueue` lays out one queue but always writes chains at the start of
//! the descriptor table and never wraps its rings, which a stream of packets needs. This driver
//! keeps the same memory layout idea and adds what the vsock tests need: chains of any shape
//! (readable bytes, writable sizes, raw addresses), ring wrap-around, and reading back what the
//! device put in the used ring, parsed as vsock packets.

use std::collections::HashMap;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::packet::{VsockHeader, HDR_LEN};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Guest memory big enough for three queues and their buffers.
pub const TEST_MEM_SIZE: usize = 0x40_0000;

/// One descriptor of a chain to build.
#[derive(Debug, Clone)]
pub enum Seg {
    /// A device-readable descriptor holding these bytes.
    Read(Vec<u8>),
    /// A device-writable descriptor of this size.
    Write(u32),
}

/// The driver side of one split queue.
pub struct GuestQueue {
    mem: GuestMemoryMmap,
    size: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    buf_start: u64,
    buf_end: u64,
    buf_next: u64,
    chains: HashMap<u16, Vec<(u64, u32, bool)>>,
}

impl GuestQueue {
    /// Queue number `index` (0..3) of `size` entries in `mem`.
    pub fn new(mem: &GuestMemoryMmap, index: u64, size: u16) -> Self {
        let base = index * 0x1_0000;
        let buf_start = 0x10_0000 + index * 0x10_0000;
        // A fresh driver starts from zeroed rings (as after a reset).
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        Self {
            mem: mem.clone(),
            size,
            desc_table: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            buf_start,
            buf_end: buf_start + 0x10_0000,
            buf_next: buf_start,
            chains: HashMap::new(),
        }
    }

    /// The device's view of this queue, as the transport would build it.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let lo_hi = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = lo_hi(self.desc_table);
        q.set_desc_table_address(l, h);
        let (l, h) = lo_hi(self.avail);
        q.set_avail_ring_address(l, h);
        let (l, h) = lo_hi(self.used);
        q.set_used_ring_address(l, h);
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len.max(1));
        assert!(len <= self.buf_end - self.buf_start);
        if self.buf_next + len > self.buf_end {
            self.buf_next = self.buf_start;
        }
        let a = self.buf_next;
        // Keep buffers 8-aligned, like a real driver's.
        self.buf_next += (len + 7) & !7;
        a
    }

    /// Publishes a chain built from `segs`; returns its head index.
    pub fn add_chain(&mut self, segs: &[Seg]) -> u16 {
        let raw: Vec<(u64, u32, bool)> = segs
            .iter()
            .map(|s| match s {
                Seg::Read(bytes) => {
                    let len = bytes.len() as u32;
                    let a = self.alloc(len);
                    self.mem.write_slice(bytes, GuestAddress(a)).unwrap();
                    (a, len, false)
                }
                Seg::Write(len) => {
                    let a = self.alloc(*len);
                    // Poison, so that a short write shows.
                    self.mem
                        .write_slice(&vec![0xee; *len as usize], GuestAddress(a))
                        .unwrap();
                    (a, *len, true)
                }
            })
            .collect();
        self.add_raw_chain(&raw)
    }

    /// Publishes a chain of `(address, len, writable)` descriptors; returns its head index.
    pub fn add_raw_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        assert!(!descs.is_empty());
        let indices: Vec<u16> = (0..descs.len())
            .map(|_| {
                let i = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                i
            })
            .collect();
        for (k, &(addr, len, writable)) in descs.iter().enumerate() {
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if k + 1 < descs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                next = indices[k + 1];
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            let at = self.desc_table + 16 * u64::from(indices[k]);
            self.mem.write_slice(&d, GuestAddress(at)).unwrap();
        }
        let head = indices[0];
        self.chains.insert(head, descs.to_vec());
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Chains the driver published that the device has not yet returned.
    pub fn outstanding(&self) -> u16 {
        let used: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        self.avail_idx.wrapping_sub(used)
    }

    /// New used-ring entries `(head, len)` since the last call.
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The first `len` bytes the device wrote into chain `head`'s writable descriptors.
    pub fn written(&self, head: u16, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, dlen, writable) in &self.chains[&head] {
            if !writable || left == 0 {
                continue;
            }
            let n = left.min(dlen as usize);
            let mut b = vec![0u8; n];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
            left -= n;
        }
        assert_eq!(left, 0, "used length beyond the chain");
        out
    }

    /// New used rx entries, parsed as packets (header, payload).
    pub fn take_rx_packets(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        self.take_used()
            .into_iter()
            .map(|(head, len)| {
                let bytes = self.written(head, len);
                assert!(bytes.len() >= HDR_LEN, "rx packet shorter than a header");
                let mut raw = [0u8; HDR_LEN];
                raw.copy_from_slice(&bytes[..HDR_LEN]);
                let hdr = VsockHeader::from_bytes(&raw);
                let payload = bytes[HDR_LEN..].to_vec();
                assert_eq!(payload.len(), hdr.len as usize, "used len != header len");
                (hdr, payload)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_wrap_around() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE)]).unwrap();
        let mut gq = GuestQueue::new(&mem, 1, 4);
        let mut q = gq.queue();
        for round in 0..10u8 {
            gq.add_chain(&[Seg::Read(vec![round; 3]), Seg::Write(8)]);
            let c = q.pop_descriptor_chain(&mem).unwrap();
            let head = c.head_index();
            assert_eq!(c.count(), 2);
            q.add_used(&mem, head, 0).unwrap();
            assert_eq!(gq.take_used(), vec![(head, 0)]);
            assert_eq!(gq.outstanding(), 0);
        }
    }
}
