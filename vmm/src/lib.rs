//! `hull_vmm`: Hull's minimal KVM virtual machine monitor, as a library.
//!
//! One process runs one microVM: [`builder::build_microvm`] turns a [`VmConfig`] into a booted set of
//! vCPU threads, and [`vmm::Vmm::wait`] blocks until the guest powers off, reboots or fails. The
//! `hull-vmm` binary is a thin CLI over this; the shim will drive the same API.
//!
//! Module map (modelled on Firecracker's `src/vmm` and Cloud Hypervisor's crates):
//! - [`host`]: what kind of KVM host this is (hardware, PVM) and whether we may boot on it.
//! - [`memory`]: memfd-backed guest RAM and its regions.
//! - [`arch`]: x86_64 layout constants, registers, GDT, page tables, CPUID, MSRs, LAPIC.
//! - [`boot`]: loading the kernel (bzImage or ELF/PVH), initrd, command line, boot parameters.
//! - [`acpi`]: RSDP/XSDT/FADT/MADT/DSDT describing CPUs and devices to the guest.
//! - [`kvm`]: the VM and vCPU file descriptors, the vCPU run loop, the PIO/MMIO bus.
//! - [`devices`]: emulated devices (serial console, power/reset, i8042 reset line, virtio over
//!   virtio-mmio).
//! - [`device_manager`]: MMIO windows, GSIs, irqfds/ioeventfds and DSDT entries of virtio devices.
//! - [`builder`] and [`vmm`]: assembling and running the microVM.
#![warn(missing_docs)]

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod event_loop;
pub mod host;
pub mod kvm;
pub mod memory;
pub mod vmm;

pub use builder::{build_microvm, BuildError};
pub use config::{ConsoleConfig, VmConfig, VsockConfig};
pub use vmm::{ExitReason, Vmm};
