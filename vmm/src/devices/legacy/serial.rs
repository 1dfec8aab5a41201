//! The COM1 16550A UART: vm-superio's state machine on the port I/O bus, its output to the console
//! sink, its interrupt through an irqfd.
//!
//! vm-superio flushes its writer after every byte; the [`ConsoleSink`] therefore buffers until a
//! newline (or 4 KiB) so a boot log costs one write per line, not per byte.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::kvm::bus::BusDevice;

/// Where console bytes go, line-buffered.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

impl ConsoleSink {
    const MAX_LINE: usize = 4096;

    /// Buffers lines for `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            line: Vec::with_capacity(256),
        }
    }

    /// Writes out whatever is buffered (a partial last line at shutdown).
    pub fn drain(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.out.write_all(&self.line)?;
            self.line.clear();
        }
        self.out.flush()
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= Self::MAX_LINE {
                self.drain()?;
            }
        }
        Ok(buf.len())
    }

    /// A no-op: lines go out when complete (see the module docs).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART on the bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleSink>,
}

impl SerialDevice {
    /// A UART that interrupts through `trigger` and prints to `sink`.
    pub fn new(trigger: EventFdTrigger, sink: ConsoleSink) -> Self {
        Self {
            serial: Serial::new(trigger, sink),
        }
    }

    /// Flushes a partial last line.
    pub fn drain(&mut self) {
        let _ = self.serial.writer_mut().drain();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.serial.write(off, *b) {
                tracing::debug!(error = ?e, "serial write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_come_out_per_line_and_interrupt() {
        let out = Shared::default();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdTrigger::new(evt.try_clone().unwrap()),
            ConsoleSink::new(Box::new(out.clone())),
        );
        dev.write(1, &[0x02]); // IER: THR empty interrupt enabled
        for b in b"hello\nwor" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
        assert!(evt.read().unwrap() >= 1, "THR empty raised an interrupt");
        dev.drain();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\nwor");
        // LSR reports the transmitter empty, so the driver never waits.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn long_lines_are_cut() {
        let out = Shared::default();
        let mut sink = ConsoleSink::new(Box::new(out.clone()));
        sink.write_all(&[b'x'; 5000]).unwrap();
        assert_eq!(out.0.lock().unwrap().len(), 4096);
    }
}
