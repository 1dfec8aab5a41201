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
