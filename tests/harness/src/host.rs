//! Host detection: can guest tests run right here, or do they need the nested L1 VM?
//!
//! - **PVM**: `/sys/module/kvm_pvm` exists. `/dev/kvm` is there but is PVM, under which an ordinary guest
//!   kernel falls into instruction emulation and never boots: tests run inside L1.
//! - **Hardware KVM**: not PVM, `/dev/kvm` opens read-write and the CPU flags in `/proc/cpuinfo` have `vmx`
//!   (Intel VT-x) or `svm` (AMD-V): tests run directly on the host.
//! - **No KVM**: anything else. L1 runs under pure TCG, which needs no KVM, so tests run inside L1.
//!
//! The paths are injectable ([`HostPaths`]) so the detection is tested against fake files.

use std::fs::OpenOptions;
use std::path::PathBuf;

/// What kind of virtualisation the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// `/dev/kvm` is real hardware-assisted KVM: guests boot directly on the host.
    HardwareKvm,
    /// `/dev/kvm` is PVM: ordinary guest kernels never boot; use the nested L1 VM.
    Pvm,
    /// No usable KVM: use the nested L1 VM (TCG).
    NoKvm,
}

impl HostKind {
    /// Whether commands must run inside the nested L1 VM rather than on the host.
    pub fn needs_l1(self) -> bool {
        self != HostKind::HardwareKvm
    }
}

/// The files [`detect_with`] looks at.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// Exists when the PVM module is loaded (`/sys/module/kvm_pvm`).
    pub kvm_pvm_module: PathBuf,
    /// The KVM device (`/dev/kvm`).
    pub dev_kvm: PathBuf,
    /// CPU information (`/proc/cpuinfo`).
    pub cpuinfo: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            kvm_pvm_module: "/sys/module/kvm_pvm".into(),
            dev_kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
        }
    }
}

/// Detects the host's kind from the real system files.
pub fn detect() -> HostKind {
    detect_with(&HostPaths::default())
}

/// Detects the host's kind from the given files.
pub fn detect_with(paths: &HostPaths) -> HostKind {
    if paths.kvm_pvm_module.exists() {
        return HostKind::Pvm;
    }
    let kvm_usable = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&paths.dev_kvm)
        .is_ok();
    let cpuinfo = std::fs::read_to_string(&paths.cpuinfo).unwrap_or_default();
    if kvm_usable && has_virt_flag(&cpuinfo) {
        HostKind::HardwareKvm
    } else {
        HostKind::NoKvm
    }
}

/// Whether a `flags` line of `/proc/cpuinfo` lists `vmx` or `svm`.
fn has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    struct Fake {
        dir: PathBuf,
    }

    impl Fake {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("hull-harness-host-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create fake dir");
            Self { dir }
        }

        fn paths(&self) -> HostPaths {
            HostPaths {
                kvm_pvm_module: self.dir.join("kvm_pvm"),
                dev_kvm: self.dir.join("kvm"),
                cpuinfo: self.dir.join("cpuinfo"),
            }
        }

        fn write(&self, name: &str, text: &str) -> &Self {
            std::fs::write(self.dir.join(name), text).expect("write fake file");
            self
        }

        fn pvm(&self) -> &Self {
            std::fs::create_dir_all(self.dir.join("kvm_pvm")).expect("fake module dir");
            self
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const INTEL: &str =
        "processor\t: 0\nflags\t\t: fpu vme de pse vmx ept\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm npt\n";
    const PLAIN: &str = "processor\t: 0\nflags\t\t: fpu vme hypervisor\nvmx flags\t: vnmi\n";

    #[test]
    fn hardware_kvm_intel_and_amd() {
        let fake = Fake::new("intel");
        fake.write("kvm", "").write("cpuinfo", INTEL);
        assert_eq!(detect_with(&fake.paths()), HostKind::HardwareKvm);
        fake.write("cpuinfo", AMD);
        assert_eq!(detect_with(&fake.paths()), HostKind::HardwareKvm);
    }

    #[test]
    fn pvm_wins_over_everything() {
        let fake = Fake::new("pvm");
        fake.write("kvm", "").write("cpuinfo", INTEL).pvm();
        assert_eq!(detect_with(&fake.paths()), HostKind::Pvm);
        assert!(HostKind::Pvm.needs_l1());
    }

    #[test]
    fn no_virt_flag_is_no_kvm() {
        let fake = Fake::new("noflag");
        fake.write("kvm", "").write("cpuinfo", PLAIN);
        assert_eq!(detect_with(&fake.paths()), HostKind::NoKvm);
    }

    #[test]
    fn missing_dev_kvm_is_no_kvm() {
        let fake = Fake::new("nodev");
        fake.write("cpuinfo", INTEL);
        assert_eq!(detect_with(&fake.paths()), HostKind::NoKvm);
        assert!(HostKind::NoKvm.needs_l1());
        assert!(!HostKind::HardwareKvm.needs_l1());
    }

    #[test]
    fn missing_everything_is_no_kvm() {
        let paths = HostPaths {
            kvm_pvm_module: Path::new("/nonexistent/kvm_pvm").into(),
            dev_kvm: Path::new("/nonexistent/kvm").into(),
            cpuinfo: Path::new("/nonexistent/cpuinfo").into(),
        };
        assert_eq!(detect_with(&paths), HostKind::NoKvm);
    }

    #[test]
    fn flag_must_be_a_whole_word() {
        assert!(!has_virt_flag("flags\t: vmxx svm_lock\n"));
        assert!(has_virt_flag("flags\t: a svm\n"));
    }
}
