//! Test fixtures: the guest driver's side of the request queue, on virtio-queue's
//! `MockSplitQueue` in anonymous guest memory.
//!
//! `MockSplitQueue` lays out the descriptor table and rings and reads the used ring; its own
//! chain builders always start at descriptor 0 and never wrap the avail ring, so [`Driver`]
//! writes descriptors and avail entries itself, through the mock's accessors, with wrap-around.
//! Chains may be of any shape: readable bytes, writable sizes, or raw descriptors (addresses
//! outside guest memory, wrong directions).

use std::collections::HashMap;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Guest memory for the tests: the queue at 0, buffers from [`BUF_START`].
pub const MEM_SIZE: usize = 0x40_0000;
/// Where data buffers start.
const BUF_START: u64 = 0x10_0000;
/// A guest-physical address with no memory behind it.
pub const OUTSIDE: u64 = 0x1000_0000;

/// Fresh guest memory for a [`Driver`].
pub fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// One descriptor of a chain to build.
#[derive(Debug, Clone)]
pub enum Seg {
    /// A device-readable descriptor holding these bytes.
    Read(Vec<u8>),
    /// A device-writable descriptor of this size (filled with 0xee).
    Write(u32),
    /// A descriptor as given: address, length, device-writable.
    Raw(u64, u32, bool),
}

/// The driver side of one split queue.
pub struct Driver<'m> {
    mem: &'m GuestMemoryMmap,
    vq: MockSplitQueue<'m, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    buf_next: u64,
    chains: HashMap<u16, Vec<(u64, u32, bool)>>,
}

impl<'m> Driver<'m> {
    /// A queue of `size` entries at guest address 0 (rings zeroed).
    pub fn new(mem: &'m GuestMemoryMmap, size: u16) -> Self {
        Self::new_at(mem, GuestAddress(0), size)
    }

    /// A queue of `size` entries at `at` (rings zeroed; a device with several queues places each
    /// apart, below [`BUF_START`]).
    pub fn new_at(mem: &'m GuestMemoryMmap, at: GuestAddress, size: u16) -> Self {
        Self {
            mem,
            vq: MockSplitQueue::create(mem, at, size),
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            buf_next: BUF_START,
            chains: HashMap::new(),
        }
    }

    /// The device's view of this queue, as the transport would build it.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_event_idx(event_idx);
        assert!(q.is_valid(self.mem));
        q
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len.max(1));
        assert!(len <= MEM_SIZE as u64 - BUF_START);
        if self.buf_next + len > MEM_SIZE as u64 {
            self.buf_next = BUF_START;
        }
        let a = self.buf_next;
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
                    self.mem
                        .write_slice(&vec![0xee; *len as usize], GuestAddress(a))
                        .unwrap();
                    (a, *len, true)
                }
                Seg::Raw(addr, len, writable) => (*addr, *len, *writable),
            })
            .collect();
        assert!(!raw.is_empty());
        let indices: Vec<u16> = (0..raw.len())
            .map(|_| {
                let i = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                i
            })
            .collect();
        for (k, &(addr, len, writable)) in raw.iter().enumerate() {
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if k + 1 < raw.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                next = indices[k + 1];
            }
            let d = SplitDescriptor::new(addr, len, flags, next);
            self.vq
                .desc_table()
                .store(indices[k], RawDescriptor::from(d))
                .unwrap();
        }
        let head = indices[0];
        self.chains.insert(head, raw);
        self.publish(head);
        head
    }

    /// Puts `head` in the avail ring.
    pub fn publish(&mut self, head: u16) {
        let avail = self.vq.avail();
        avail
            .ring()
            .ref_at(usize::from(self.avail_idx % self.size))
            .unwrap()
            .store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        avail.idx().store(self.avail_idx);
    }

    /// Sets the avail ring's index to anything (a corrupt driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.vq.avail().idx().store(idx);
    }

    /// Points descriptor `index`'s `next` at `next` (for loops).
    pub fn set_next(&mut self, index: u16, next: u16) {
        let mut d = SplitDescriptor::from(self.vq.desc_table().load(index).unwrap());
        d.set_next(next);
        d.set_flags(d.flags() | VIRTQ_DESC_F_NEXT);
        self.vq
            .desc_table()
            .store(index, RawDescriptor::from(d))
            .unwrap();
    }

    /// New used-ring entries `(head, len)` since the last call.
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let used = self.vq.used();
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = used
                .ring()
                .ref_at(usize::from(self.used_seen % self.size))
                .unwrap()
                .load();
            out.push((e.id() as u16, e.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The status byte of chain `head`: its last writable byte (`None` if it has none in memory).
    pub fn status(&self, head: u16) -> Option<u8> {
        let &(addr, len, _) = self.chains[&head].iter().rev().find(|d| d.2 && d.1 > 0)?;
        self.mem
            .read_obj(GuestAddress(addr + u64::from(len) - 1))
            .ok()
    }

    /// The bytes in chain `head`'s writable descriptors, all but the last byte (the data of an IN
    /// or GET_ID request).
    pub fn data_in(&self, head: u16) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, len, writable) in &self.chains[&head] {
            if writable {
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                out.extend_from_slice(&b);
            }
        }
        out.pop();
        out
    }

    /// `used_event` (the avail ring's trailer): the driver wants an interrupt once the used index
    /// passes it (EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        let at = self.vq.avail_addr().0 + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    /// `avail_event` (the used ring's trailer): the device wants a kick once the avail index
    /// passes it (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = self.vq.used_addr().0 + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_wrap_around() {
        let mem = guest_mem();
        let mut d = Driver::new(&mem, 4);
        let mut q = d.queue(false);
        for round in 0..10u8 {
            let head = d.add_chain(&[Seg::Read(vec![round; 3]), Seg::Write(8)]);
            let c = q.pop_descriptor_chain(&mem).unwrap();
            assert_eq!(c.head_index(), head);
            assert_eq!(c.count(), 2);
            q.add_used(&mem, head, 1).unwrap();
            assert_eq!(d.take_used(), vec![(head, 1)]);
            assert_eq!(d.status(head), Some(0xee));
        }
    }
}
