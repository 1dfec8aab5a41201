//! The i8042 keyboard controller, only as a reset line: the guest's `reboot=k` writes 0xfe to
//! port 0x64, which asks the VMM to end with a reboot. Built on vm-superio's `I8042Device`.

use vm_superio::{I8042Device, Trigger};

use crate::kvm::bus::BusDevice;
use crate::vmm::{ExitNotifier, ExitReason};

/// Sends a reboot request when the guest pulses the reset line.
pub struct ResetTrigger(pub ExitNotifier);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.exit(ExitReason::Reboot);
        Ok(())
    }
}

/// The controller on the bus (ports 0x60..0x64).
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller whose reset command requests a reboot through `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            let _ = self.0.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reboot() {
        let (notifier, rx) = ExitNotifier::new();
        let mut dev = I8042::new(notifier);
        dev.write(4, &[0xfe]); // port 0x64: pulse reset
        assert_eq!(
            rx.try_recv().unwrap().ended().unwrap().unwrap(),
            ExitReason::Reboot
        );
    }
}
