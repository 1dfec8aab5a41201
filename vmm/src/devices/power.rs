//! ACPI hardware-reduced power management: the FADT's sleep control, sleep status and reset
//! registers, three consecutive I/O ports.
//!
//! The guest powers off by writing `SLP_TYP(S5) << 2 | SLP_EN` to the sleep control register, and
//! resets by writing the FADT's reset value to the reset register. Either ends the VM through the
//! [`ExitNotifier`].

use crate::acpi::S5_SLEEP_TYPE;
use crate::arch::layout::pio;
use crate::kvm::bus::BusDevice;
use crate::vmm::{ExitNotifier, ExitReason};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = (pio::ACPI_SLEEP_STATUS - pio::ACPI_SLEEP_CONTROL) as u64;
const RESET: u64 = (pio::ACPI_RESET - pio::ACPI_SLEEP_CONTROL) as u64;

/// The power-management registers.
pub struct PowerDevice {
    exit: ExitNotifier,
}

impl PowerDevice {
    /// Registers that request exits through `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self { exit }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never woken, nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 => {
                let typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if typ == S5_SLEEP_TYPE {
                    self.exit.exit(ExitReason::PowerOff);
                } else {
                    tracing::warn!(
                        sleep_type = typ,
                        "guest asked for an unsupported sleep state"
                    );
                }
            }
            RESET if v == pio::ACPI_RESET_VALUE => self.exit.exit(ExitReason::Reboot),
            SLEEP_STATUS | SLEEP_CONTROL | RESET => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let (n, rx) = ExitNotifier::new();
        let mut dev = PowerDevice::new(n);
        dev.write(SLEEP_CONTROL, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(
            rx.try_recv().unwrap().ended().unwrap().unwrap(),
            ExitReason::PowerOff
        );
    }

    #[test]
    fn other_writes_do_nothing() {
        let (n, rx) = ExitNotifier::new();
        let mut dev = PowerDevice::new(n);
        dev.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        dev.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]); // S3: unsupported
        dev.write(RESET, &[0x01]); // wrong reset value
        dev.write(SLEEP_STATUS, &[0xff]);
        let mut status = [0xffu8];
        dev.read(SLEEP_STATUS, &mut status);
        assert_eq!(status, [0]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn reset_register_reboots() {
        let (n, rx) = ExitNotifier::new();
        let mut dev = PowerDevice::new(n);
        dev.write(RESET, &[pio::ACPI_RESET_VALUE]);
        assert_eq!(
            rx.try_recv().unwrap().ended().unwrap().unwrap(),
            ExitReason::Reboot
        );
    }
}
