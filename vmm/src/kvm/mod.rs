//! KVM: the VM and vCPU file descriptors, the vCPU threads' run loop, and the bus that routes the
//! guest's port and memory-mapped I/O to devices.
pub mod bus;
pub mod vcpu;
pub mod vm;
