//! The boot vCPU's registers at the kernel entry point, and the GDT and identity page tables they
//! point at.
//!
//! Two entry conventions:
//! - Linux 64-bit boot protocol (bzImage at `code32_start + 0x200`, or an ELF vmlinux without a
//!   PVH note at `e_entry`): long mode, paging on with the low 4 GiB identity-mapped, `rsi` = zero
//!   page.
//! - PVH (ELF with `XEN_ELFNOTE_PHYS32_ENTRY`): 32-bit protected mode, paging off, `rbx` =
//!   `hvm_start_info`.
//!
//! Never real mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{kvm_segment_from_gdt, GDT_32, GDT_64};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit Linux boot protocol.
    Linux64 {
        /// Entry point (guest-physical).
        entry: u64,
        /// Address of `boot_params`, passed in `rsi`.
        zero_page: u64,
    },
    /// PVH 32-bit entry.
    Pvh {
        /// Entry point from the ELF note.
        entry: u64,
        /// Address of `hvm_start_info`, passed in `rbx`.
        start_info: u64,
    },
}

/// Failed to write boot-time CPU structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory write failed.
    #[error("failed to write the {0} into guest memory: {1}")]
    Write(&'static str, vm_memory::GuestMemoryError),
}

/// General-purpose registers at entry.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and must be set
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    regs
}

/// FPU state Linux expects: x87 control word 0x37f, SSE control/status 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the GDT (and for long mode the identity page tables) to guest memory and fills the
/// segment and control registers of `sregs` for `entry`.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    entry: BootEntry,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let gdt = match entry {
        BootEntry::Linux64 { .. } => &GDT_64,
        BootEntry::Pvh { .. } => &GDT_32,
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + (i as u64) * 8))
            .map_err(|e| RegsError::Write("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| RegsError::Write("IDT", e))?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match entry {
        BootEntry::Linux64 { .. } => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh { .. } => {
            sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps the low 4 GiB with 2 MiB pages: one PML4 entry, four PDPT entries, four page
/// directories of 512 entries each.
fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let w = |val: u64, addr: u64, what| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| RegsError::Write(what, e))
    };
    w(PDPTE_START | PRESENT_RW, PML4_START, "PML4")?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        w(pd_addr | PRESENT_RW, PDPTE_START + pd * 8, "PDPT")?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            w(phys | PRESENT_RW | HUGE, pd_addr + i * 8, "page directory")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        let entry = BootEntry::Linux64 {
            entry: 0x100_0200,
            zero_page: 0x7000,
        };
        setup_sregs(&m, entry, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 0x8);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.gdt.limit, 31);
        // GDT in memory matches the table.
        for (i, e) in GDT_64.iter().enumerate() {
            assert_eq!(read(&m, BOOT_GDT_START + i as u64 * 8), *e);
        }
        // Page tables: PML4 → PDPT → PD, 2 MiB identity pages covering 4 GiB.
        assert_eq!(read(&m, PML4_START), PDPTE_START | 3);
        for pd in 0..4u64 {
            assert_eq!(
                read(&m, PDPTE_START + pd * 8),
                (PDE_START + pd * 0x1000) | 3
            );
        }
        assert_eq!(read(&m, PDE_START), 0x83);
        assert_eq!(read(&m, PDE_START + 8), (1 << 21) | 0x83);
        // The last entry of the last PD maps 4 GiB - 2 MiB.
        assert_eq!(
            read(&m, PDE_START + 3 * 0x1000 + 511 * 8),
            ((4u64 << 30) - (2 << 20)) | 0x83
        );
    }

    #[test]
    fn pvh_is_protected_mode_without_paging() {
        let m = mem();
        let mut sregs = kvm_sregs {
            cr0: X86_CR0_PG,
            ..Default::default()
        };
        let entry = BootEntry::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        };
        setup_sregs(&m, entry, &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        // No page tables written.
        assert_eq!(read(&m, PML4_START), 0);
        let regs = boot_regs(entry);
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x100_0000, 0x6000, 2));
    }

    #[test]
    fn linux64_regs() {
        let regs = boot_regs(BootEntry::Linux64 {
            entry: 0x10_0200,
            zero_page: 0x7000,
        });
        assert_eq!(regs.rip, 0x10_0200);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }
}
