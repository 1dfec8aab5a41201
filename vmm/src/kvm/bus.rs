//! An address-range → device map for port I/O or MMIO exits. Built once, then shared read-only
//! by all vCPU threads; each device sits behind its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through the bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device inserted where another already is.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already there (or is empty)")]
pub struct BusOverlap {
    /// Base of the rejected range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

struct Entry {
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// The bus.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `dev` at `base..base+len`.
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusOverlap> {
        let overlap = BusOverlap { base, len };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(overlap.clone())?;
        if self.find(base).is_some() || self.devices.range(base..end).next().is_some() {
            return Err(overlap);
        }
        self.devices.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, e) = self.devices.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((*base, e))
    }

    /// Routes a read; returns false (and leaves `data` alone) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, e)) => {
                e.dev
                    .lock()
                    .expect("device lock poisoned")
                    .read(addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, e)) => {
                e.dev
                    .lock()
                    .expect("device lock poisoned")
                    .write(addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.read(0x3f7, &mut d));
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev(), 0x108, 0x10).is_err(), "starts inside");
        assert!(bus.insert(dev(), 0xf8, 0x10).is_err(), "ends inside");
        assert!(bus.insert(dev(), 0x0, 0x1000).is_err(), "covers");
        assert!(bus.insert(dev(), 0x200, 0).is_err(), "empty");
        assert!(bus.insert(dev(), u64::MAX, 2).is_err(), "wraps");
        bus.insert(dev(), 0x110, 0x10).unwrap();
    }
}
