//! What kind of KVM host this is, and whether a guest may boot on it.
//!
//! Hull needs hardware-assisted KVM (VT-x/AMD-V). A host whose `/dev/kvm` is served by PVM
//! (`kvm_pvm`, a software "pagetable virtual machine") can only run guests built with
//! `CONFIG_PVM_GUEST`: an ordinary kernel falls into instruction emulation there and never finishes
//! booting. So on PVM we refuse unless the caller declares the kernel PVM-capable.

use std::path::{Path, PathBuf};

/// The kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware-assisted KVM (or no PVM module loaded).
    Hardware,
    /// KVM served by the PVM module (`/sys/module/kvm_pvm`).
    Pvm,
}

/// Why the host cannot run a guest.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `/dev/kvm` is absent.
    #[error("{0} does not exist: load kvm_intel or kvm_amd on a host with hardware virtualization (VT-x/AMD-V), or run guests in the nested-KVM harness (cargo xtask harness)")]
    NoKvm(PathBuf),
    /// `/dev/kvm` exists but may not be opened.
    #[error("permission denied opening {0}: run as root or add this user to the 'kvm' group")]
    KvmPermission(PathBuf),
    /// `/dev/kvm` failed to open for another reason.
    #[error("cannot open {0}: {1}")]
    KvmOpen(PathBuf, std::io::Error),
    /// A PVM host with a kernel not declared PVM-capable.
    #[error("this host's KVM is PVM (kvm_pvm is loaded): an ordinary guest kernel never finishes booting here. Boot a kernel built with CONFIG_PVM_GUEST and pass --pvm-guest, or run on a host with hardware KVM (or in the nested-KVM harness: cargo xtask harness)")]
    PvmNeedsPvmGuest,
}

/// Detects the host kind by looking for the PVM module under `sysfs_module` (`/sys/module`).
pub fn detect_kind(sysfs_module: &Path) -> HostKind {
    if sysfs_module.join("kvm_pvm").exists() {
        HostKind::Pvm
    } else {
        HostKind::Hardware
    }
}

/// Checks that a guest may boot here: the KVM device opens read-write, and a PVM host only runs
/// a kernel declared PVM-capable.
pub fn check(kvm_path: &Path, sysfs_module: &Path, pvm_guest: bool) -> Result<HostKind, HostError> {
    let kind = detect_kind(sysfs_module);
    if kind == HostKind::Pvm && !pvm_guest {
        return Err(HostError::PvmNeedsPvmGuest);
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_path)
    {
        Ok(_) => Ok(kind),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(HostError::NoKvm(kvm_path.to_path_buf()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(HostError::KvmPermission(kvm_path.to_path_buf()))
        }
        Err(e) => Err(HostError::KvmOpen(kvm_path.to_path_buf(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hull-host-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn pvm_is_detected_and_refused() {
        let sys = tempdir("pvm");
        std::fs::create_dir(sys.join("kvm_pvm")).unwrap();
        assert_eq!(detect_kind(&sys), HostKind::Pvm);
        let err = check(Path::new("/nonexistent/kvm"), &sys, false).unwrap_err();
        assert!(matches!(err, HostError::PvmNeedsPvmGuest));
        assert!(err.to_string().contains("CONFIG_PVM_GUEST"));
        // Declared PVM-capable: goes on to open the device (absent here).
        let err = check(Path::new("/nonexistent/kvm"), &sys, true).unwrap_err();
        assert!(matches!(err, HostError::NoKvm(_)));
    }

    #[test]
    fn missing_kvm_is_a_clear_error() {
        let sys = tempdir("hw");
        assert_eq!(detect_kind(&sys), HostKind::Hardware);
        let err = check(Path::new("/nonexistent/kvm"), &sys, false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kvm does not exist"));
    }

    #[test]
    fn unopenable_kvm_is_reported() {
        let sys = tempdir("dir");
        // A directory cannot be opened read-write: reported as an open error, not a panic.
        let err = check(&sys, &sys, false).unwrap_err();
        assert!(matches!(
            err,
            HostError::KvmOpen(..) | HostError::KvmPermission(_)
        ));
    }
}
