//! The L1 VM's QEMU command line (measured in shared/harness-notes.md).
//!
//! - `-accel tcg,thread=multi,tb-size=1024`: pure TCG (the host's `/dev/kvm` is PVM or absent), one host
//!   thread per vCPU and a large translation cache.
//! - `-cpu EPYC,+svm,+npt -smp 2 -m 4G -M q35`: an AMD CPU with SVM and nested paging, so `kvm_amd` inside L1
//!   offers hardware-style KVM with `nested=1`. Two vCPUs: with one, an L2 boot is ~1.6x slower.
//! - `-nodefaults -no-user-config -nographic -serial stdio -no-reboot`: only the devices we name, the
//!   console on QEMU's stdout, and QEMU exits when L1 powers off or its kernel panics (`panic=-1`).
//! - Two virtio-9p-pci devices: tag `hostroot` is the host's `/`, read-only; tag `hosttarget` is the
//!   workspace `target/` directory, read-write. `multidevs=remap` keeps inode numbers unique across the
//!   host's file systems.
//!
//! The L1 kernel command line carries the `hull.*` parameters read by tests/harness/l1-init.sh.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The QEMU binary the harness runs.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Everything that varies in the L1 QEMU command line.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The L1 kernel: an ELF vmlinux (PVH boot) or a bzImage.
    pub kernel: PathBuf,
    /// The L1 initramfs.
    pub initrd: PathBuf,
    /// The host directory shared read-write as tag `hosttarget` (the workspace `target/`).
    pub target_dir: PathBuf,
    /// Host path of the command script (see [`crate::script`]).
    pub script: PathBuf,
    /// The run's marker nonce (see [`crate::console`]).
    pub nonce: String,
    /// Show the full L1 kernel log and the init's progress.
    pub verbose: bool,
    /// L1 memory, in MiB.
    pub memory_mib: u32,
    /// L1 vCPUs.
    pub cpus: u32,
}

impl QemuConfig {
    /// The L1 kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let log = if self.verbose {
            "loglevel=7"
        } else {
            "quiet loglevel=3"
        };
        let mut cmdline = format!(
            "console=ttyS0 rdinit=/init panic=-1 {log} edd=off hull.script={} hull.target={} hull.nonce={}",
            self.script.display(),
            self.target_dir.display(),
            self.nonce
        );
        if self.verbose {
            cmdline.push_str(" hull.verbose=1");
        }
        cmdline
    }

    /// The arguments of `qemu-system-x86_64` (without the program name).
    pub fn argv(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        push(&["-accel", "tcg,thread=multi,tb-size=1024"]);
        push(&["-cpu", "EPYC,+svm,+npt"]);
        push(&["-smp", &self.cpus.to_string()]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&["-M", "q35"]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ]);
        args.push("-kernel".into());
        args.push(self.kernel.clone().into_os_string());
        args.push("-initrd".into());
        args.push(self.initrd.clone().into_os_string());
        args.push("-append".into());
        args.push(self.kernel_cmdline().into());
        args.push("-fsdev".into());
        args.push(fsdev("hr", Path::new("/"), true));
        args.push("-device".into());
        args.push("virtio-9p-pci,fsdev=hr,mount_tag=hostroot".into());
        args.push("-fsdev".into());
        args.push(fsdev("ht", &self.target_dir, false));
        args.push("-device".into());
        args.push("virtio-9p-pci,fsdev=ht,mount_tag=hosttarget".into());
        args
    }
}

/// A `-fsdev local` value. QEMU's option syntax escapes a `,` in a value by doubling it.
fn fsdev(id: &str, path: &Path, readonly: bool) -> OsString {
    let mut value = OsString::from(format!("local,id={id},path="));
    value.push(path.to_string_lossy().replace(',', ",,"));
    value.push(",security_model=none,multidevs=remap");
    if readonly {
        value.push(",readonly=on");
    }
    value
}

/// Why a path cannot go on the L1 kernel command line, if it cannot: the command line is split at
/// white space and has no quoting.
pub fn cmdline_path_problem(path: &Path) -> Option<String> {
    let text = path.to_str()?;
    text.contains(char::is_whitespace).then(|| {
        format!("{text} contains white space, which the L1 kernel command line cannot carry")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig {
            kernel: "/w/target/harness/l1-vmlinux".into(),
            initrd: "/w/target/harness/l1-initrd.cpio".into(),
            target_dir: "/w/target".into(),
            script: "/w/target/harness/run/1-0.sh".into(),
            nonce: "00ff".into(),
            verbose: false,
            memory_mib: 4096,
            cpus: 2,
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value that follows `flag` (each occurrence).
    fn values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn argv_matches_the_measured_recipe() {
        let args = strings(&config().argv());
        assert_eq!(values(&args, "-accel"), ["tcg,thread=multi,tb-size=1024"]);
        assert_eq!(values(&args, "-cpu"), ["EPYC,+svm,+npt"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(values(&args, "-m"), ["4096M"]);
        assert_eq!(values(&args, "-M"), ["q35"]);
        assert_eq!(values(&args, "-serial"), ["stdio"]);
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert_eq!(values(&args, "-kernel"), ["/w/target/harness/l1-vmlinux"]);
        assert_eq!(
            values(&args, "-initrd"),
            ["/w/target/harness/l1-initrd.cpio"]
        );
    }

    #[test]
    fn root_read_only_and_target_read_write() {
        let args = strings(&config().argv());
        assert_eq!(
            values(&args, "-fsdev"),
            [
                "local,id=hr,path=/,security_model=none,multidevs=remap,readonly=on",
                "local,id=ht,path=/w/target,security_model=none,multidevs=remap",
            ]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "virtio-9p-pci,fsdev=hr,mount_tag=hostroot",
                "virtio-9p-pci,fsdev=ht,mount_tag=hosttarget"
            ]
        );
    }

    #[test]
    fn comma_in_a_path_is_doubled() {
        let mut config = config();
        config.target_dir = "/a,b/target".into();
        let args = strings(&config.argv());
        assert!(values(&args, "-fsdev")[1].contains("path=/a,,b/target,"));
    }

    #[test]
    fn cmdline_carries_the_run() {
        let cmdline = config().kernel_cmdline();
        assert!(cmdline.starts_with("console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3 "));
        assert!(cmdline.contains(" hull.script=/w/target/harness/run/1-0.sh "));
        assert!(cmdline.contains(" hull.target=/w/target "));
        assert!(cmdline.ends_with(" hull.nonce=00ff"));
        let mut verbose = config();
        verbose.verbose = true;
        let cmdline = verbose.kernel_cmdline();
        assert!(cmdline.contains("loglevel=7") && !cmdline.contains("quiet"));
        assert!(cmdline.ends_with(" hull.verbose=1"));
    }

    #[test]
    fn white_space_in_paths_is_refused() {
        assert!(cmdline_path_problem(Path::new("/a b/target")).is_some());
        assert!(cmdline_path_problem(Path::new("/a/target")).is_none());
    }
}
