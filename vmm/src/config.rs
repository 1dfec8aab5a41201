//! The microVM's configuration: what the CLI parses and what the shim will fill in.

use std::path::PathBuf;

/// Default kernel command line: serial console, quiet (serial output is slow), no PCI probing,
/// reboot through the keyboard controller, reboot at once on panic (the VMM then exits), and no
/// crypto self-tests at boot (`cryptomgr.notests`: they check the kernel's own cipher code, took
/// 0.3 s of the guest's 1.8 s boot in the harness, and `fips=1` still forces them).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 pci=off cryptomgr.notests";

/// Smallest guest RAM accepted, in MiB: below this a Debian kernel plus initramfs cannot boot.
pub const MIN_MEMORY_MIB: u32 = 64;

/// Largest number of vCPUs (the MADT uses 8-bit APIC ids; KVM's own limit may be lower).
pub const MAX_VCPUS: u8 = 254;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The VMM's standard output.
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded (the UART still exists, so the guest does not wait for it).
    Off,
}

impl std::str::FromStr for ConsoleConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "off" => Ok(Self::Off),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(format!(
                    "invalid console '{s}': expected stdout, off or file:PATH"
                )),
            },
        }
    }
}

/// The guest's virtio-vsock device and its hybrid-vsock Unix socket on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more: 0-2 are reserved).
    pub guest_cid: u32,
    /// The host socket: clients connect here and send `CONNECT <port>`; guest connections to host
    /// port P go to `<uds>_P`.
    pub uds: PathBuf,
}

/// The guest's virtio-fs device: its tag, and the vhost-user socket of its backend (virtiofsd,
/// started by the caller). From `tag=TAG,socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// What the guest mounts (`mount -t virtiofs TAG …`).
    pub tag: String,
    /// virtiofsd's `--socket-path`.
    pub socket: PathBuf,
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut tag, mut socket) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tag", v)) => tag = Some(v.to_owned()),
                Some(("socket", v)) => socket = Some(PathBuf::from(v)),
                _ => return Err(format!("{part:?}: want tag=TAG,socket=PATH")),
            }
        }
        match (tag, socket) {
            (Some(tag), Some(socket)) => Ok(Self { tag, socket }),
            _ => Err(format!("{s:?}: want tag=TAG,socket=PATH")),
        }
    }
}

/// Longest drive serial: the 20 bytes of the virtio-blk device ID.
pub const MAX_SERIAL_LEN: usize = 20;

const DRIVE_SYNTAX: &str = "expected path=PATH[,ro][,serial=ID]";

/// A virtio-blk drive: a raw disk image or a host block device. From
/// `path=PATH[,ro][,serial=ID]` (a path with a comma cannot be given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// The image file (a whole number of 512-byte sectors) or block device.
    pub path: PathBuf,
    /// Open it read-only and tell the guest so (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// The disk's serial as the guest reads it (`/sys/block/vdX/serial`): at most
    /// [`MAX_SERIAL_LEN`] printable ASCII characters.
    pub serial: Option<String>,
}

impl std::str::FromStr for DriveConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| format!("invalid drive '{s}': {why} ({DRIVE_SYNTAX})");
        let (mut path, mut read_only, mut serial) = (None, false, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", "")) => return Err(bad("empty path".into())),
                Some(("path", v)) if path.is_none() => path = Some(PathBuf::from(v)),
                Some(("serial", v)) if serial.is_none() => serial = Some(v.to_owned()),
                Some((k @ ("path" | "serial"), _)) => return Err(bad(format!("{k} given twice"))),
                None if part == "ro" => read_only = true,
                _ => return Err(bad(format!("unknown option '{part}'"))),
            }
        }
        let path = path.ok_or_else(|| bad("no path".into()))?;
        Ok(Self {
            path,
            read_only,
            serial,
        })
    }
}

/// Everything needed to build and boot one microVM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest kernel: a bzImage, or an ELF vmlinux (booted through PVH when it has the note).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u8,
    /// Guest RAM in MiB (at least [`MIN_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// Serial console destination.
    pub console: ConsoleConfig,
    /// The kernel is built with `CONFIG_PVM_GUEST`: allows booting on a PVM host.
    pub pvm_guest: bool,
    /// Path of the KVM device.
    pub kvm_path: PathBuf,
    /// Where loaded kernel modules are listed (`/sys/module`), for host detection.
    pub sysfs_module: PathBuf,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// The virtio-fs device, if any.
    pub fs: Option<FsConfig>,
    /// virtio-blk drives, in order (the guest's vda, vdb, …).
    pub drives: Vec<DriveConfig>,
    /// A virtio-balloon device for free page reporting: RAM the guest frees goes back to the host.
    pub free_page_reporting: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            memory_mib: 256,
            console: ConsoleConfig::Stdout,
            pvm_guest: false,
            kvm_path: PathBuf::from("/dev/kvm"),
            sysfs_module: PathBuf::from("/sys/module"),
            vsock: None,
            fs: None,
            drives: Vec::new(),
            free_page_reporting: false,
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("invalid vCPU count {0}: use 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    /// Memory below the minimum.
    #[error("too little memory: {0} MiB; the guest needs at least {MIN_MEMORY_MIB} MiB")]
    TooLittleMemory(u32),
    /// A reserved vsock context id.
    #[error("invalid vsock guest CID {0}: use 3 or more (0-2 are reserved)")]
    VsockCid(u32),
    /// The vsock socket's directory does not exist.
    #[error("vsock socket {0}: its directory does not exist")]
    VsockDir(PathBuf),
    /// Memory beyond what this VMM lays out.
    #[error("too much memory: {0} MiB; at most {max} MiB", max = crate::arch::layout::MAX_MEMORY_MIB)]
    TooMuchMemory(u32),
    /// A drive's image does not exist.
    #[error("drive {0} does not exist")]
    DriveMissing(PathBuf),
    /// A drive serial too long or not printable ASCII.
    #[error("invalid drive serial {0:?}: at most {MAX_SERIAL_LEN} printable ASCII characters")]
    DriveSerial(String),
}

impl VmConfig {
    /// Checks the numeric limits (files are checked when they are opened).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::TooLittleMemory(self.memory_mib));
        }
        if u64::from(self.memory_mib) > crate::arch::layout::MAX_MEMORY_MIB {
            return Err(ConfigError::TooMuchMemory(self.memory_mib));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid == u32::MAX {
                return Err(ConfigError::VsockCid(v.guest_cid));
            }
            let dir = v.uds.parent().filter(|p| !p.as_os_str().is_empty());
            if dir.is_some_and(|d| !d.is_dir()) {
                return Err(ConfigError::VsockDir(v.uds.clone()));
            }
        }
        for d in &self.drives {
            if !d.path.exists() {
                return Err(ConfigError::DriveMissing(d.path.clone()));
            }
            if let Some(s) = &d.serial {
                let printable = s.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
                if s.len() > MAX_SERIAL_LEN || !printable {
                    return Err(ConfigError::DriveSerial(s.clone()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_parses() {
        assert_eq!("stdout".parse(), Ok(ConsoleConfig::Stdout));
        assert_eq!("off".parse(), Ok(ConsoleConfig::Off));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(ConsoleConfig::File(PathBuf::from("/tmp/x")))
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
    }

    #[test]
    fn limits_are_checked() {
        let ok = VmConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let c = VmConfig {
            vcpus: 0,
            ..VmConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        let c = VmConfig {
            vcpus: 255,
            ..VmConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(255)));
        let c = VmConfig {
            memory_mib: 16,
            ..VmConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::TooLittleMemory(16)));
        let c = VmConfig {
            memory_mib: u32::MAX,
            ..VmConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::TooMuchMemory(u32::MAX)));
        let vsock = |cid, uds: &str| VmConfig {
            vsock: Some(VsockConfig {
                guest_cid: cid,
                uds: uds.into(),
            }),
            ..VmConfig::default()
        };
        assert_eq!(
            vsock(2, "/tmp/v.sock").validate(),
            Err(ConfigError::VsockCid(2))
        );
        assert_eq!(vsock(3, "/tmp/v.sock").validate(), Ok(()));
        assert_eq!(
            vsock(3, "/nonexistent/dir/v.sock").validate(),
            Err(ConfigError::VsockDir("/nonexistent/dir/v.sock".into()))
        );
    }

    #[test]
    fn drives_parse() {
        let d = |path: &str, read_only, serial: Option<&str>| DriveConfig {
            path: path.into(),
            read_only,
            serial: serial.map(str::to_owned),
        };
        assert_eq!("path=/d.img".parse(), Ok(d("/d.img", false, None)));
        assert_eq!(
            "path=/d.img,ro,serial=hull-test-disk".parse(),
            Ok(d("/d.img", true, Some("hull-test-disk")))
        );
        assert_eq!(
            "serial=x,ro,path=/dev/vdb".parse(),
            Ok(d("/dev/vdb", true, Some("x")))
        );
        for (bad, why) in [
            ("", "unknown option ''"),
            ("/d.img", "unknown option '/d.img'"),
            ("path=/d.img,rw", "unknown option 'rw'"),
            ("path=/d.img,ro=1", "unknown option 'ro=1'"),
            ("path=", "empty path"),
            ("ro,serial=x", "no path"),
            ("path=/a,path=/b", "path given twice"),
            ("path=/a,serial=x,serial=y", "serial given twice"),
        ] {
            let e = bad.parse::<DriveConfig>().unwrap_err();
            assert_eq!(
                e,
                format!("invalid drive '{bad}': {why} (expected path=PATH[,ro][,serial=ID])")
            );
        }
    }

    #[test]
    fn drives_are_checked() {
        let with = |path: &str, serial: Option<&str>| VmConfig {
            drives: vec![DriveConfig {
                path: path.into(),
                read_only: false,
                serial: serial.map(str::to_owned),
            }],
            ..VmConfig::default()
        };
        let here = env!("CARGO_MANIFEST_DIR");
        assert_eq!(with(here, Some("ABCDEFGHIJKLMNOPQRST")).validate(), Ok(()));
        assert_eq!(with(here, Some("a b")).validate(), Ok(()));
        assert_eq!(
            with("/nonexistent/disk.img", None).validate(),
            Err(ConfigError::DriveMissing("/nonexistent/disk.img".into()))
        );
        for bad in ["ABCDEFGHIJKLMNOPQRSTU", "tab\there", "caf\u{e9}"] {
            assert_eq!(
                with(here, Some(bad)).validate(),
                Err(ConfigError::DriveSerial(bad.into())),
                "{bad:?}"
            );
        }
    }
}
