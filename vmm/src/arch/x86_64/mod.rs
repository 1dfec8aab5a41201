//! x86_64: the guest-physical layout, and the vCPU state a Linux kernel expects at its entry point.
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod msr;
pub mod regs;
