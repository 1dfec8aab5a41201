//! The COM1 16550A UART: vm-superio's state machine on the port I/O bus, its output to the console
//! sink, its interrupt through an irqfd.
//!
//! vm-superio flushes its writer after every byte; the [`ConsoleSink`] therefore buffers until a
//! newline (or 4 KiB) so a boot log costs one write per line, not per byte. With the console off,
//! the last lines are still kept ([`ConsoleTail`]): a quiet guest prints little, but what it does
//! print (a panic, a lockup warning) is what explains its death.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

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

/// The last [`ConsoleTail::LINES`] console lines, in memory: the console's destination when it is
/// off. Clones share the lines.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<String>>>);

impl ConsoleTail {
    /// How many lines are kept.
    pub const LINES: usize = 60;

    /// The kept lines, oldest first, without their line ends.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("console tail lock")
            .iter()
            .cloned()
            .collect()
    }
}

impl Write for ConsoleTail {
    /// Takes one line (or a cut piece of one) as [`ConsoleSink`] hands it over.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut lines = self.0.lock().expect("console tail lock");
        if lines.len() == Self::LINES {
            lines.pop_front();
        }
        lines.push_back(text.trim_end_matches(['\r', '\n']).to_owned());
        Ok(buf.len())
    }

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
    fn the_tail_keeps_the_last_lines() {
        let tail = ConsoleTail::default();
        let mut sink = ConsoleSink::new(Box::new(tail.clone()));
        for i in 0..ConsoleTail::LINES + 5 {
            write!(sink, "line {i}\r\n").unwrap();
        }
        sink.write_all(b"Kernel panic - not syncing: \xff").unwrap();
        sink.drain().unwrap();
        let lines = tail.lines();
        assert_eq!(lines.len(), ConsoleTail::LINES);
        assert_eq!(lines[0], "line 6");
        assert_eq!(
            lines[ConsoleTail::LINES - 2],
            format!("line {}", ConsoleTail::LINES + 4)
        );
        assert_eq!(
            lines[ConsoleTail::LINES - 1],
            "Kernel panic - not syncing: \u{fffd}"
        );
    }

    #[test]
    fn long_lines_are_cut() {
        let out = Shared::default();
        let mut sink = ConsoleSink::new(Box::new(out.clone()));
        sink.write_all(&[b'x'; 5000]).unwrap();
        assert_eq!(out.0.lock().unwrap().len(), 4096);
    }
}
