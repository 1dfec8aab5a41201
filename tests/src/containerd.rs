//! A private containerd (Debian's package) for the shim's end-to-end runs: its own root, state
//! and sockets under one directory, Hull's shim first on its `PATH`, a Hull configuration file
//! pointing at this workspace's builds, and `ctr` bound to it. Used by the main job
//! (`cargo xtask run`), the shim suite and `cargo xtask bench ctr`.
//!
//! The directory must be on a file system overlayfs accepts as an upper layer (tmpfs or ext4;
//! in L1, under `/run`), as containerd's overlayfs snapshotter keeps its layers there.
//!
//! Inside the harness's L1 the workspace's `target/` is a 9p share (no page cache for reads), so
//! every `ctr run` would read the shim, hull-vmm, the kernel and the initramfs from the host
//! again, a cost no real host has. There, [`Containerd::start`] first installs Hull into the
//! containerd directory (L1's own tmpfs), as a host has it installed on a local disk
//! (`/usr/local/bin`, `/usr/share/hull`): the same files, copied once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The busybox image the fixtures' `oci.tar` holds.
pub const BUSYBOX_IMAGE: &str = "hull.test/busybox:latest";
/// The runtime name Hull's shim answers to.
pub const HULL_RUNTIME: &str = "io.containerd.kata.v2";
/// runc's, for comparison.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// Where Hull's pieces are, for its configuration file.
#[derive(Debug, Clone)]
pub struct HullPaths {
    /// The directory holding `containerd-shim-kata-v2`.
    pub shim_dir: PathBuf,
    /// hull-vmm.
    pub vmm: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// virtiofsd.
    pub virtiofsd: PathBuf,
    /// Guest console and agent debug log into the shim log.
    pub debug: bool,
}

/// `statfs(2)`'s `f_type` of a 9p file system.
const V9FS_MAGIC: i64 = 0x0102_1997;

/// Whether `p` is on a 9p file system (the harness's shares of the host's files).
fn on_9p(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) writes into a zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == V9FS_MAGIC
}

impl HullPaths {
    /// Copies the shim, hull-vmm, the kernel, the initramfs and virtiofsd into `dir` (`bin/`,
    /// `share/`, `libexec/`), as a host installs them; returns the installed paths.
    pub fn install(&self, dir: &Path) -> Result<Self, String> {
        let copy = |from: &Path, sub: &str| -> Result<PathBuf, String> {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
            let name = from
                .file_name()
                .ok_or_else(|| format!("{} names no file", from.display()))?;
            let to = d.join(name);
            std::fs::copy(from, &to)
                .map_err(|e| format!("install {} as {}: {e}", from.display(), to.display()))?;
            Ok(to)
        };
        let shim = copy(&self.shim_dir.join("containerd-shim-kata-v2"), "bin")?;
        Ok(Self {
            shim_dir: shim.parent().unwrap_or(dir).to_path_buf(),
            vmm: copy(&self.vmm, "bin")?,
            kernel: copy(&self.kernel, "share")?,
            initrd: copy(&self.initrd, "share")?,
            virtiofsd: copy(&self.virtiofsd, "libexec")?,
            debug: self.debug,
        })
    }

    /// Whether any of these files is read through a 9p share.
    fn any_on_9p(&self) -> bool {
        [
            &self.shim_dir,
            &self.vmm,
            &self.kernel,
            &self.initrd,
            &self.virtiofsd,
        ]
        .iter()
        .any(|p| on_9p(p))
    }

    /// This workspace's builds: `target/<profile>/` for the shim and hull-vmm.
    pub fn workspace(profile: &str) -> Self {
        let root = crate::workspace_root();
        let img = crate::guest_image();
        Self {
            shim_dir: root.join("target").join(profile),
            vmm: root.join("target").join(profile).join("hull-vmm"),
            kernel: img.vmlinux,
            initrd: img.initramfs,
            virtiofsd: crate::virtiofsd::binary(),
            // `HULL_TEST_DEBUG=1`: the guests' consoles in containerd's log (slower boots).
            debug: std::env::var_os("HULL_TEST_DEBUG").is_some_and(|v| v == "1"),
        }
    }
}

/// A running private containerd; stopped (and its directory's mounts undone) on drop.
pub struct Containerd {
    child: Option<Child>,
    /// Its directory.
    pub dir: PathBuf,
    /// Its gRPC socket.
    pub address: PathBuf,
    /// Hull's configuration file the shim reads (`HULL_CONF_FILE`).
    pub hull_config: PathBuf,
    /// Hull's state directory (sandboxes).
    pub hull_state: PathBuf,
    /// Where the shim binary is (`containerd-shim-kata-v2`).
    pub shim_dir: PathBuf,
    /// Started here (stopped and removed on drop), or attached to.
    owned: bool,
    /// The directory holding `containerd` and `ctr` (`None`: Debian's, on `PATH`).
    bin: Option<PathBuf>,
}

/// `name` in directory `bin`, or on `PATH` without one.
fn release_bin(bin: Option<&Path>, name: &str) -> PathBuf {
    bin.map_or_else(|| PathBuf::from(name), |b| b.join(name))
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

impl Containerd {
    /// Starts containerd in `dir` (created; a tmpfs is mounted on it when `own_tmpfs`) and waits
    /// until it answers.
    pub fn start(dir: &Path, hull: &HullPaths, own_tmpfs: bool) -> Result<Self, String> {
        Self::start_release(dir, hull, own_tmpfs, None)
    }

    /// [`Containerd::start`] with the `containerd` and `ctr` of directory `bin` (another
    /// release than the installed one) when given.
    pub fn start_release(
        dir: &Path,
        hull: &HullPaths,
        own_tmpfs: bool,
        bin: Option<&Path>,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        if own_tmpfs {
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "mode=0711", "hullctd"])
                .arg(dir)
                .status()
                .map_err(|e| format!("mount: {e}"))?;
            if !st.success() {
                return Err(format!("mounting a tmpfs on {} failed", dir.display()));
            }
        }
        let hull = &if hull.any_on_9p() {
            hull.install(&dir.join("install"))?
        } else {
            hull.clone()
        };
        let address = dir.join("containerd.sock");
        let hull_state = dir.join("hull");
        let hull_config = dir.join("hull.toml");
        let hull_toml = format!(
            "[hypervisor]\npath = {}\nkernel = {}\ninitrd = {}\ndebug_console = {}\n\
             [shared_fs]\nvirtiofsd = {}\n[runtime]\nstate_dir = {}\nagent_timeout = 300\n",
            toml_str(&hull.vmm),
            toml_str(&hull.kernel),
            toml_str(&hull.initrd),
            hull.debug,
            toml_str(&hull.virtiofsd),
            toml_str(&hull_state),
        );
        std::fs::write(&hull_config, hull_toml).map_err(|e| format!("write hull.toml: {e}"))?;
        let config = dir.join("config.toml");
        let ctd_toml = format!(
            "version = 2\nroot = {}\nstate = {}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\naddress = {}\n[debug]\nlevel = \"info\"\n",
            toml_str(&dir.join("root")),
            toml_str(&dir.join("state")),
            toml_str(&address),
        );
        std::fs::write(&config, ctd_toml).map_err(|e| format!("write config.toml: {e}"))?;
        // The shim answers to io.containerd.hull.v2 as well: the same binary under that name.
        let alias = hull.shim_dir.join("containerd-shim-hull-v2");
        if !alias.exists() {
            let _ = std::os::unix::fs::symlink("containerd-shim-kata-v2", &alias);
        }
        let path = format!(
            "{}:{}",
            hull.shim_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let log = std::fs::File::create(dir.join("containerd.log"))
            .map_err(|e| format!("create containerd.log: {e}"))?;
        let daemon = release_bin(bin, "containerd");
        let child = Command::new(&daemon)
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("HULL_CONF_FILE", &hull_config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!(
                    "start {} (Debian package containerd): {e}",
                    daemon.display()
                )
            })?;
        let me = Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            address,
            hull_config,
            hull_state,
            shim_dir: hull.shim_dir.clone(),
            owned: true,
            bin: bin.map(Path::to_path_buf),
        };
        // Ready when `ctr version` gets an answer from the daemon.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut pause = Duration::from_millis(5);
        loop {
            let out = me
                .ctr(&["version"])
                .output()
                .map_err(|e| format!("ctr: {e}"))?;
            if out.status.success() {
                return Ok(me);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "containerd did not answer within 120 s: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    me.log()
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// An existing containerd at `address` (its shims find Hull's configuration themselves);
    /// left alone on drop.
    pub fn attach(address: &Path) -> Self {
        Self {
            child: None,
            dir: address.parent().unwrap_or(Path::new("/")).to_path_buf(),
            address: address.to_path_buf(),
            hull_config: PathBuf::from("/etc/hull/config.toml"),
            hull_state: PathBuf::from("/run/hull"),
            shim_dir: PathBuf::new(),
            owned: false,
            bin: None,
        }
    }

    /// `ctr --address <socket> -n default ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new(release_bin(self.bin.as_deref(), "ctr"));
        c.arg("--address")
            .arg(&self.address)
            .args(["-n", "default"])
            .args(args);
        c
    }

    /// Runs `ctr ARGS` to its end.
    pub fn ctr_output(&self, args: &[&str]) -> Output {
        self.ctr(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// Imports the fixtures' busybox `oci.tar`; returns the image name.
    pub fn import_busybox(&self) -> Result<&'static str, String> {
        let tar = crate::containers::fixtures().join("oci.tar");
        let out = self.ctr_output(&["images", "import", &tar.display().to_string()]);
        if !out.status.success() {
            return Err(format!(
                "ctr images import {}: {}",
                tar.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(BUSYBOX_IMAGE)
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        // Whatever containerd left mounted (snapshots, task rootfs), then the directory.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
