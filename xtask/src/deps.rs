//! What a fresh machine needs before anything builds or boots: Debian packages, installed with apt
//! when missing, and virtiofsd from crates.io, installed with `cargo install` into
//! `target/tools/` (the project's own files install everything; nothing is assumed pre-installed).

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the build, the guest image and the harness need.
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",  // the harness's L1, and the boot benchmark's peer
    "busybox-static",   // the harness's L1 initramfs
    "cpio",             // checking initramfs archives in tests
    "kmod",             // depmod: module dependency order (the harness's L1 modules)
    "linux-source-6.1", // Hull's guest kernel is built from Debian's kernel source ...
    "build-essential",  // ... with gcc and make,
    "flex",             // Kconfig's lexer,
    "bison",            // and parser,
    "bc",               // kernel build scripts,
    "libelf-dev",       // objtool (the ORC unwinder)
    "xz-utils",         // the harness's L1 kernel payload is XZ: unpacked to a PVH vmlinux
    "util-linux",       // setpriv, used by the guest tests
    "libseccomp-dev",   // the agent's seccomp support (later issues)
    "libcap-ng-dev",    // virtiofsd
    "runc",             // the agent benchmark's peer (cargo xtask bench agent), and ctr's
    "containerd",       // the shim's daemon (cargo xtask run, the shim tests, bench ctr)
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// The virtiofsd release installed from crates.io.
pub const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Where virtiofsd is installed (`target/tools/bin/virtiofsd`).
pub fn virtiofsd() -> std::path::PathBuf {
    crate::cargo::root().join("target/tools/bin/virtiofsd")
}

/// Installs whatever of [`APT_PACKAGES`] is missing, then virtiofsd.
pub fn ensure() -> Result<()> {
    ensure_apt()?;
    ensure_virtiofsd()
}

/// `cargo install virtiofsd` into `target/tools/` unless that version is there (about a minute).
fn ensure_virtiofsd() -> Result<()> {
    let bin = virtiofsd();
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(VIRTIOFSD_VERSION))
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    println!("deps: installing virtiofsd {VIRTIOFSD_VERSION} from crates.io into target/tools");
    let root = crate::cargo::root().join("target/tools");
    let mut c = crate::cargo::cargo();
    c.args([
        "install",
        "--locked",
        "--quiet",
        "virtiofsd",
        "--version",
        VIRTIOFSD_VERSION,
    ])
    .arg("--root")
    .arg(&root);
    crate::cargo::run(c).context(
        "cargo install virtiofsd failed (it needs Debian's libseccomp-dev and libcap-ng-dev)",
    )
}

fn ensure_apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("deps: installing {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages and not root: run 'sudo apt-get install {}'",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| -> Result<()> {
        let st = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !st.success() {
            bail!(
                "apt-get {} failed ({st}): check the network and retry",
                args.join(" ")
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

/// The containerd releases besides Debian 12's 1.6 that the shim suite drives Hull with:
/// (environment variable the suite reads, Debian suite the package comes from, directory under
/// `target/tools/`). Debian 13 ships 1.7; unstable ships 2.x.
pub const OTHER_CONTAINERDS: &[(&str, &str, &str)] = &[
    ("HULL_CONTAINERD_1_7", "trixie", "containerd-trixie"),
    ("HULL_CONTAINERD_2", "sid", "containerd-sid"),
];

/// Unpacks Debian's `containerd` package of each of [`OTHER_CONTAINERDS`] into `target/tools/`
/// (not installed: only its `containerd` and `ctr` are run, from there; they need nothing but
/// libc) unless it is there already. Returns (variable, directory holding the binaries) pairs.
pub fn other_containerds() -> Result<Vec<(String, std::path::PathBuf)>> {
    let tools = crate::cargo::root().join("target/tools");
    let missing: Vec<_> = OTHER_CONTAINERDS
        .iter()
        .filter(|(_, _, dir)| !tools.join(dir).join("usr/bin/containerd").is_file())
        .collect();
    if !missing.is_empty() {
        // A private apt setup: the machine's own sources (and its packages) stay as they are.
        let apt = tools.join("apt");
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(apt.join(d))?;
        }
        let sources = apt.join("sources.list");
        let text: String = missing
            .iter()
            .map(|(_, suite, _)| {
                format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {suite} main\n")
            })
            .collect();
        std::fs::write(&sources, text)?;
        let opts = [
            format!("-oDir::Etc::sourcelist={}", sources.display()),
            "-oDir::Etc::sourceparts=/nonexistent".to_string(),
            format!("-oDir::State::Lists={}", apt.join("lists").display()),
            format!("-oDir::Cache={}", apt.join("cache").display()),
            "-oAPT::Sandbox::User=root".to_string(),
            "-qq".to_string(),
        ];
        let apt_get = |args: &[&str]| -> Result<()> {
            let st = Command::new("apt-get")
                .args(&opts)
                .args(args)
                .current_dir(&apt)
                .status()
                .context("running apt-get")?;
            if !st.success() {
                bail!(
                    "apt-get {} (Debian's other containerd releases) failed ({st}): check the network and retry",
                    args.join(" ")
                );
            }
            Ok(())
        };
        apt_get(&["update"])?;
        for (_, suite, dir) in missing {
            println!("deps: unpacking Debian {suite}'s containerd into target/tools/{dir}");
            for old in std::fs::read_dir(&apt)?.flatten() {
                if old.file_name().to_string_lossy().ends_with(".deb") {
                    std::fs::remove_file(old.path())?;
                }
            }
            apt_get(&["download", &format!("containerd/{suite}")])?;
            let deb = std::fs::read_dir(&apt)?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .context("apt-get download left no .deb")?;
            let out = tools.join(dir);
            let _ = std::fs::remove_dir_all(&out);
            let st = Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(&out)
                .status()
                .context("running dpkg-deb")?;
            if !st.success() {
                bail!("dpkg-deb -x {} failed ({st})", deb.display());
            }
            std::fs::remove_file(&deb)?;
        }
    }
    Ok(OTHER_CONTAINERDS
        .iter()
        .map(|(var, _, dir)| (var.to_string(), tools.join(dir).join("usr/bin")))
        .collect())
}
