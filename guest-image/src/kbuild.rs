//! Hull's own guest kernel: Debian's kernel source (`linux-source-6.1`, from apt) configured with
//! `guest-image/kernel/hull.config` over `make allnoconfig`, and built with `make`.
//!
//! Why not Debian's packaged kernel: it loads its virtio, vsock, fuse and overlay drivers as modules
//! (a third of the guest's boot in the harness) and carries a 53 MiB image of drivers a microVM never
//! sees, copied into every guest's RAM. This one has what the guest uses built in and nothing else.
//!
//! Incremental: the source is unpacked once per tarball (size and mtime), the configuration is
//! applied when the fragment changes, and `make` only runs when the fragment or the source changed
//! or an output is missing. The configuration is checked after `allnoconfig`: every option of the
//! fragment must have taken, or the build fails naming the ones that did not (an option whose
//! dependencies are off is dropped silently by Kconfig).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::{self, Tool};
use crate::error::{Error, Result};

/// The source tarball `linux-source-6.1` installs.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The top directory inside [`SOURCE_TARBALL`].
const SOURCE_DIR: &str = "linux-source-6.1";
/// Debian packages the build needs, for messages.
pub const BUILD_PACKAGES: &str = "linux-source-6.1 build-essential flex bison bc libelf-dev";

const TAR: Tool = Tool {
    program: "tar",
    package: "tar",
};
const MAKE: Tool = Tool {
    program: "make",
    package: "make",
};

/// A built guest kernel.
#[derive(Debug, Clone)]
pub struct BuiltKernel {
    /// The ELF vmlinux (boots via its PVH note).
    pub vmlinux: PathBuf,
    /// The bzImage.
    pub bzimage: PathBuf,
    /// `make kernelrelease`, e.g. `6.1.192-hull`.
    pub release: String,
    /// Whether `make` ran (false: everything was up to date).
    pub rebuilt: bool,
}

/// Unpacks (once), configures with `fragment` and builds the kernel under `cache_dir`.
pub fn build(cache_dir: &Path, fragment: &Path) -> Result<BuiltKernel> {
    let tarball = Path::new(SOURCE_TARBALL);
    let tar_id = crate::image::file_id(tarball).map_err(|_| Error::KernelSource {
        path: tarball.to_owned(),
        packages: BUILD_PACKAGES,
    })?;
    let tree = cache_dir.join(SOURCE_DIR);
    let unpacked_stamp = cache_dir.join(format!("{SOURCE_DIR}.unpacked"));
    fs::create_dir_all(cache_dir).map_err(Error::io("create", cache_dir))?;
    if fs::read_to_string(&unpacked_stamp).ok().as_deref() != Some(tar_id.as_str())
        || !tree.join("Makefile").is_file()
    {
        if tree.exists() {
            fs::remove_dir_all(&tree).map_err(Error::io("remove", &tree))?;
        }
        cmd::run(
            TAR,
            Command::new("tar")
                .arg("-xf")
                .arg(tarball)
                .arg("-C")
                .arg(cache_dir),
            "the source tarball may be damaged: apt-get install --reinstall linux-source-6.1",
        )?;
        fs::write(&unpacked_stamp, &tar_id).map_err(Error::io("write", &unpacked_stamp))?;
    }

    let wanted = fs::read_to_string(fragment).map_err(Error::io("read", fragment))?;
    let fingerprint = format!("{tar_id}\n{wanted}");
    let built_stamp = tree.join(".hull-built");
    let vmlinux = tree.join("vmlinux");
    let bzimage = tree.join("arch/x86/boot/bzImage");
    let release_file = tree.join("include/config/kernel.release");
    let up_to_date = fs::read_to_string(&built_stamp).ok().as_deref() == Some(fingerprint.as_str())
        && [&vmlinux, &bzimage, &release_file]
            .iter()
            .all(|p| p.is_file());
    if !up_to_date {
        let _ = fs::remove_file(&built_stamp);
        make(
            &tree,
            &[
                format!("KCONFIG_ALLCONFIG={}", fragment.display()),
                "allnoconfig".into(),
            ],
        )?;
        let config_path = tree.join(".config");
        let config = fs::read_to_string(&config_path).map_err(Error::io("read", &config_path))?;
        let missing = options_not_taken(&wanted, &config);
        if !missing.is_empty() {
            return Err(Error::KernelConfig {
                fragment: fragment.to_owned(),
                options: missing.join(", "),
            });
        }
        let jobs = std::thread::available_parallelism().map_or(1, usize::from);
        make(
            &tree,
            &[format!("-j{jobs}"), "vmlinux".into(), "bzImage".into()],
        )?;
        fs::write(&built_stamp, &fingerprint).map_err(Error::io("write", &built_stamp))?;
    }
    let release = fs::read_to_string(&release_file)
        .map_err(Error::io("read", &release_file))?
        .trim()
        .to_owned();
    Ok(BuiltKernel {
        vmlinux,
        bzimage,
        release,
        rebuilt: !up_to_date,
    })
}

/// `make -C tree -s ARGS`, failing with what to install.
fn make(tree: &Path, args: &[String]) -> Result<()> {
    cmd::run(
        MAKE,
        Command::new("make")
            .arg("-C")
            .arg(tree)
            .arg("-s")
            .args(args),
        &format!("the kernel build needs: apt-get install {BUILD_PACKAGES}"),
    )
    .map(drop)
}

/// The fragment's settings (`CONFIG_X=v` and `# CONFIG_X is not set`) that `config` does not hold.
pub fn options_not_taken(fragment: &str, config: &str) -> Vec<String> {
    let lines: std::collections::HashSet<&str> = config.lines().map(str::trim).collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("CONFIG_") || (l.starts_with("# CONFIG_") && l.ends_with(" is not set"))
        })
        .filter(|l| {
            // "is not set" also holds when the option is absent altogether (its menu is off).
            let absent_ok = l.starts_with('#') && {
                let name = l.trim_start_matches("# ").split(' ').next().unwrap_or("");
                !config.lines().any(|c| c.starts_with(&format!("{name}=")))
            };
            !lines.contains(l) && !absent_ok
        })
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_option_kconfig_dropped_is_named() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n# CONFIG_D is not set\nCONFIG_E=\"x\"\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=y\nCONFIG_E=\"x\"\n";
        assert_eq!(
            options_not_taken(fragment, config),
            ["CONFIG_B=y", "# CONFIG_D is not set"]
        );
    }

    #[test]
    fn the_shipped_fragment_is_well_formed() {
        let fragment = include_str!("../kernel/hull.config");
        // Every setting line is an option; the build checks them against the resulting .config.
        for l in fragment.lines().filter(|l| !l.is_empty()) {
            assert!(
                l.starts_with("CONFIG_") || l.starts_with('#'),
                "not a Kconfig line: {l}"
            );
        }
        for must in [
            "CONFIG_VIRTIO_MMIO=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_VIRTIO_FS=y",
            "CONFIG_PVH=y",
            "CONFIG_ACPI=y",
        ] {
            assert!(fragment.lines().any(|l| l == must), "{must} missing");
        }
        assert!(!fragment.lines().any(|l| l == "CONFIG_MODULES=y"));
    }
}
