//! Every magic guest-physical address of the x86_64 microVM, in one place.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start_info 0x0000_6100  PVH memory map
//! 0x0000_7000  zero page (Linux boot_params)
//! 0x0000_8ff0  boot stack     0x0000_9000  PML4, then PDPT (0xa000) and 4 PDs (0xb000..0xf000)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 1 MiB: reserved (ACPI tables at 0xe0000)
//! 0x0010_0000  kernel (bzImage protected-mode code; ELF at its own p_paddr)
//! ...          initrd, at the top of RAM below the 32-bit MMIO gap
//! 0xd000_0000  32-bit MMIO gap (virtio-mmio windows, IOAPIC, LAPIC) up to 4 GiB
//! 4 GiB ..     the rest of RAM
//! ```

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location (left empty: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Most PVH memory map entries we write.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 8;
/// Linux `boot_params` (the "zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages identity-mapping the low 4 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line the x86 kernel accepts (`COMMAND_LINE_SIZE`), terminator included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI RSDP (also found by the kernel's scan of 0xe0000..0x100000).
pub const RSDP_START: u64 = 0xe_0000;
/// Where the other ACPI tables go.
pub const ACPI_TABLES_START: u64 = 0xe_0100;
/// End of the ACPI area.
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// Start of high memory: the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address past 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_START;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) for real-mode emulation on Intel; out of the way, inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Most RAM this layout supports, in MiB (a sanity bound: 1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Legacy GSIs used by devices.
pub mod irq {
    /// COM1.
    pub const SERIAL_COM1: u32 = 4;
}

/// Port I/O addresses of the emulated devices.
pub mod pio {
    /// COM1 base.
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// COM1 register count.
    pub const SERIAL_LEN: u16 = 8;
    /// i8042 data port (0x60) to command port (0x64).
    pub const I8042_START: u16 = 0x60;
    /// i8042 window length.
    pub const I8042_LEN: u16 = 5;
    /// ACPI hardware-reduced sleep control register (FADT `SLEEP_CONTROL_REG`).
    pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
    /// ACPI sleep status register (FADT `SLEEP_STATUS_REG`).
    pub const ACPI_SLEEP_STATUS: u16 = 0x601;
    /// ACPI reset register (FADT `RESET_REG`).
    pub const ACPI_RESET: u16 = 0x602;
    /// Length of the ACPI power-management window starting at [`ACPI_SLEEP_CONTROL`].
    pub const ACPI_PM_LEN: u16 = 3;
    /// Value the guest writes to [`ACPI_RESET`] to reset.
    pub const ACPI_RESET_VALUE: u8 = 0x0f;
}
