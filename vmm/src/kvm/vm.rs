//! Creating the KVM VM: capability checks, the in-kernel irqchip and PIT, guest memory slots.

use std::path::Path;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_API_VERSION, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Failed to set up the VM in KVM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Opening the KVM device.
    #[error("cannot open {0}: {1}")]
    Open(String, kvm_ioctls::Error),
    /// Unexpected API version.
    #[error("KVM API version {0} is not supported (need {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A capability Hull needs is missing.
    #[error("KVM lacks the {0:?} capability that Hull needs: use a newer host kernel")]
    MissingCap(Cap),
    /// An ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
}

const REQUIRED_CAPS: [Cap; 7] = [
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::ExtCpuid,
];

/// Opens KVM at `path` and checks the API version and capabilities.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::Open(
            path.display().to_string(),
            kvm_ioctls::Error::new(libc::EINVAL),
        )
    })?;
    let kvm =
        Kvm::new_with_path(cpath).map_err(|e| VmError::Open(path.display().to_string(), e))?;
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION as i32 {
        return Err(VmError::ApiVersion(v));
    }
    for cap in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    Ok(kvm)
}

/// Creates the VM with its in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, and maps `mem`.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Ioctl("CREATE_VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| VmError::Ioctl("SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| VmError::Ioctl("SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Ioctl("CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Ioctl("CREATE_PIT2", e))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's start address is in guest memory");
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`, which the
        // caller keeps alive (in the Vmm) for as long as the VM exists.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmError::Ioctl("SET_USER_MEMORY_REGION", e))?;
    }
    Ok(vm)
}
