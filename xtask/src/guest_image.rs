//! `cargo xtask guest-image`: builds target/guest/ (vmlinuz, vmlinux, initramfs.cpio, kernel-release)
//! with `hull_guest_image::build`, incrementally. Other commands call [`ensure`].
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use hull_guest_image::{BuildOptions, GuestImage};

/// Arguments of `cargo xtask guest-image`.
#[derive(clap::Args)]
pub struct Args {
    /// Rebuild vmlinux and the initramfs even if their inputs did not change.
    #[arg(long)]
    pub force: bool,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    let image = build(args.force)?;
    println!(
        "guest-image: done in {:.2} s (kernel {})",
        start.elapsed().as_secs_f64(),
        image.release
    );
    for path in [
        &image.vmlinuz,
        &image.vmlinux,
        &image.initramfs,
        &image.kernel_release_file,
    ] {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!(
            "  {:>10}  {}",
            hull_guest_image::human(size),
            relative(path).display()
        );
    }
    Ok(())
}

/// Brings target/guest/ up to date (quietly fast when it already is) and returns its paths.
#[allow(dead_code)] // for the other xtask commands (harness, tests, benchmarks)
pub fn ensure() -> Result<GuestImage> {
    build(false)
}

fn build(force: bool) -> Result<GuestImage> {
    let workspace_root = crate::cargo::root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() {
                workspace_root.join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| workspace_root.join("target"));
    let opts = BuildOptions {
        cargo: std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from),
        out_dir: target_dir.join("guest"),
        cache_dir: kernel_cache_dir(&target_dir),
        target_dir,
        workspace_root,
        force,
        progress: true,
    };
    hull_guest_image::build(&opts).context("cargo xtask guest-image failed")
}

/// The kernel download cache shared by the guest image and the harness's L1 kernel.
pub fn kernel_cache_dir(target_dir: &Path) -> PathBuf {
    target_dir.join("kernels")
}

fn relative(path: &Path) -> &Path {
    let root = crate::cargo::root();
    path.strip_prefix(&root).unwrap_or(path)
}

/// What every command that boots a guest needs first: the Debian packages, a release `hull-vmm`
/// and the guest image.
pub fn prepare_release() -> Result<GuestImage> {
    crate::deps::ensure()?;
    let mut c = crate::cargo::cargo();
    c.args(["build", "--release", "-p", "hull-vmm"]);
    crate::cargo::run(c)?;
    ensure()
}
