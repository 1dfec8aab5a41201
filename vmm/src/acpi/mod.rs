//! ACPI tables: how a Debian kernel (no MP table parsing, no `virtio_mmio.device=`) learns about
//! the vCPUs, the interrupt controllers, the devices and how to power off.
//!
//! Written into guest memory at boot: RSDP (at [`RSDP_START`], also found by the kernel's scan of
//! 0xe0000..0x100000) → XSDT → FADT + MADT; FADT → DSDT. The platform is *hardware-reduced*: no
//! PM1 blocks or SCI; power-off and reset go through the FADT's sleep control and reset registers,
//! which the [`crate::devices::power`] device decodes. The FADT also says there is no VGA and no
//! CMOS RTC, so the kernel does not probe absent hardware.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{
    irq, pio, ACPI_TABLES_END, ACPI_TABLES_START, APIC_START, IOAPIC_START, RSDP_START,
};

const OEM_ID: [u8; 6] = *b"HULL  ";
const OEM_TABLE_ID: [u8; 8] = *b"HULLVMM ";
const OEM_REVISION: u32 = 1;

/// FADT IA-PC boot architecture flags: VGA not present (bit 2), CMOS RTC not present (bit 5).
/// The 8042 bit (1) is clear: no keyboard controller to probe.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// The SLP_TYP value of S5 (soft off) in the DSDT's `\_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Failed to build or place the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in their area.
    #[error("ACPI tables need {0} bytes, more than the {1} reserved for them")]
    TooLarge(u64, u64),
    /// Writing to guest memory failed.
    #[error("failed to write ACPI table {0} into guest memory: {1}")]
    Write(&'static str, vm_memory::GuestMemoryError),
}

/// A device that describes itself in the DSDT.
pub trait DsdtEntry {
    /// Appends the device's AML (a `Device` object under `\_SB_`).
    fn append_aml(&self, bytes: &mut Vec<u8>);
}

/// The COM1 UART as an ACPI device (PNP0501 with its I/O ports and IRQ).
pub struct Com1;

impl DsdtEntry for Com1 {
    fn append_aml(&self, bytes: &mut Vec<u8>) {
        let base = pio::SERIAL_COM1;
        aml::Device::new(
            "_SB_.COM1".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::IO::new(base, base, 1, pio::SERIAL_LEN as u8),
                        &aml::Interrupt::new(true, true, false, false, irq::SERIAL_COM1),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(bytes);
    }
}

/// Builds the DSDT: `\_S5_` for power-off, then each device's entry.
pub fn dsdt(devices: &[&dyn DsdtEntry]) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);
    for d in devices {
        d.append_aml(&mut body);
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io8 = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::Headless);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.sleep_control_reg = io8(pio::ACPI_SLEEP_CONTROL);
    b.sleep_status_reg = io8(pio::ACPI_SLEEP_STATUS);
    b.reset_reg = io8(pio::ACPI_RESET);
    b.reset_value = pio::ACPI_RESET_VALUE;
    let mut v = Vec::new();
    b.finalize().to_aml_bytes(&mut v);
    v
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let mut v = Vec::new();
    madt.to_aml_bytes(&mut v);
    v
}

/// Builds all tables for `vcpus` CPUs and these devices, writes them into guest memory, and
/// returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[&dyn DsdtEntry],
) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + 7) & !7;
    let dsdt_addr = ACPI_TABLES_START;
    let dsdt = dsdt(devices);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let end = xsdt_addr + xsdt_bytes.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge(
            end - ACPI_TABLES_START,
            ACPI_TABLES_END - ACPI_TABLES_START,
        ));
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    for (name, addr, bytes) in [
        ("DSDT", dsdt_addr, &dsdt),
        ("FADT", fadt_addr, &fadt),
        ("MADT", madt_addr, &madt),
        ("XSDT", xsdt_addr, &xsdt_bytes),
        ("RSDP", RSDP_START, &rsdp),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::Write(name, e))?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a whole table (header says its length) and checks its checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let head = read(mem, addr, 36);
        assert_eq!(&head[0..4], sig, "signature at {addr:#x}");
        let t = read(mem, addr, u32_at(&head, 4) as usize);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn tables_parse_back() {
        let m = mem();
        let rsdp_addr = create_acpi_tables(&m, 2, &[&Com1]).unwrap();
        assert_eq!(rsdp_addr, RSDP_START);
        let rsdp = read(&m, rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");

        let xsdt = table(&m, u64_at(&rsdp, 24), b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        assert_eq!(entries.len(), 2);

        let fadt = table(&m, entries[0], b"FACP");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        assert_ne!(flags & (1 << 10), 0, "reset register supported");
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);
        // Reset register: GAS at 116 (space, width, offset, access, address), value at 128.
        assert_eq!(fadt[116], 1, "reset reg in I/O space");
        assert_eq!(u64_at(&fadt, 120), u64::from(pio::ACPI_RESET));
        assert_eq!(fadt[128], pio::ACPI_RESET_VALUE);
        // Sleep control/status at 244/256.
        assert_eq!(u64_at(&fadt, 248), u64::from(pio::ACPI_SLEEP_CONTROL));
        assert_eq!(u64_at(&fadt, 260), u64::from(pio::ACPI_SLEEP_STATUS));

        let dsdt = table(&m, u64_at(&fadt, 140), b"DSDT");
        assert!(contains(&dsdt, b"_S5_"));
        assert!(contains(&dsdt, b"COM1"));
        // EISAID("PNP0501") encodes as the bytes 41 d0 05 01.
        assert!(contains(&dsdt, &0x0105_d041u32.to_le_bytes()));

        let madt = table(&m, entries[1], b"APIC");
        assert_eq!(u32_at(&madt, 36), APIC_START as u32);
        let mut off = 44;
        let mut lapics = vec![];
        let mut ioapics = 0;
        while off < madt.len() {
            match madt[off] {
                0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(&madt, off + 4))),
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(&madt, off + 4), IOAPIC_START as u32);
                }
                t => panic!("unexpected MADT entry {t}"),
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1)]);
        assert_eq!(ioapics, 1);
    }

    #[test]
    fn many_cpus_fit() {
        let m = mem();
        create_acpi_tables(&m, crate::config::MAX_VCPUS, &[&Com1]).unwrap();
    }
}
