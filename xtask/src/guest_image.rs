//! `cargo xtask guest-image`: builds target/guest/ (vmlinuz, vmlinux, initramfs.cpio, kernel-release)
//! with `hull_guest_image::build`, incrementally. Other commands call [`ensure`].
//! The kernel is Hull's own build (guest-image/kernel/hull.config); `HULL_GUEST_KERNEL=debian`
//! (every command) builds and uses Debian's cloud kernel package instead, in target/guest-debian/.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use hull_guest_image::{BuildOptions, GuestImage, GuestKernel};

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
    let (kernel, out_dir) = match std::env::var("HULL_GUEST_KERNEL").as_deref() {
        Ok("hull") | Ok("") | Err(_) => (GuestKernel::Hull, target_dir.join("guest")),
        Ok("debian") => (GuestKernel::DebianCloud, target_dir.join("guest-debian")),
        Ok(other) => anyhow::bail!(
            "HULL_GUEST_KERNEL={other}: want 'hull' (Hull's own kernel, the default) or 'debian' \
             (Debian's cloud kernel package, into target/guest-debian)"
        ),
    };
    let opts = BuildOptions {
        cargo: std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from),
        out_dir,
        kernel,
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
    crate::cargo::build_release(&["hull-vmm"])?;
    ensure()
}

/// The guest image's initramfs with the container test fixtures appended (a second newc archive:
/// the kernel unpacks both): `/fixtures/busybox/{rootfs,config.json}`, built first by
/// `tests/fixtures/build.sh`. For the guest container suite; returns its path.
pub fn fixtures_initramfs(image: &GuestImage) -> Result<PathBuf> {
    fixtures_initramfs_with(image, "initramfs-fixtures.cpio", &[])
}

/// [`fixtures_initramfs`] plus `extra` executables, each `(path in the guest, host file)` with its
/// directory made; written as `name` beside the guest image's initramfs.
pub fn fixtures_initramfs_with(
    image: &GuestImage,
    name: &str,
    extra: &[(&str, &Path)],
) -> Result<PathBuf> {
    let root = crate::cargo::root();
    let fixtures = root.join("target/fixtures");
    let status = std::process::Command::new("bash")
        .arg(root.join("tests/fixtures/build.sh"))
        .arg(&fixtures)
        .status()
        .context("run tests/fixtures/build.sh")?;
    anyhow::ensure!(
        status.success(),
        "tests/fixtures/build.sh failed ({status})"
    );
    let out = image.initramfs.with_file_name(name);
    let mut data = std::fs::read(&image.initramfs)
        .with_context(|| format!("read {}", image.initramfs.display()))?;
    let mut w = hull_guest_image::cpio::Writer::new(Vec::new());
    w.dir("fixtures", 0o755)?;
    add_tree(&mut w, &fixtures.join("busybox"), "fixtures/busybox")?;
    for (dest, src) in extra {
        if let Some((dir, _)) = dest.rsplit_once('/') {
            w.dir(dir, 0o755)?;
        }
        let bytes = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
        w.file(dest, 0o755, &bytes)?;
    }
    data.extend_from_slice(&w.finish()?);
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &data)?;
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// Adds `src` (a directory) as `dest` and everything under it but `oci*` (the image layout is
/// not needed in the guest), in name order.
fn add_tree(w: &mut hull_guest_image::cpio::Writer<Vec<u8>>, src: &Path, dest: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(src)?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src)?;
        w.symlink(dest, &target.to_string_lossy())?;
    } else if meta.is_dir() {
        w.dir(dest, mode)?;
        let mut names: Vec<_> = std::fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("oci") {
                continue;
            }
            add_tree(w, &src.join(&name), &format!("{dest}/{name}"))?;
        }
    } else if meta.is_file() {
        w.file(dest, mode, &std::fs::read(src)?)?;
    }
    Ok(())
}
