//! The whole guest image, built incrementally into one output directory (`target/guest/`):
//! `vmlinuz` (the cloud bzImage, or Hull's own kernel with [`GuestKernel::Hull`]), `vmlinux` (its ELF), `initramfs.cpio` (uncompressed newc: the fastest
//! to boot), `kernel-release`. Each step records a fingerprint of its inputs (paths, sizes, mtimes,
//! the layout version) under `.stamps/` and is skipped while that fingerprint and its outputs stand.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::error::{Error, Result};
use crate::{agent, cpio, extract_vmlinux, kbuild, kernel, Flavour, KernelPackage};

/// The modules the guest init loads (with their dependencies): the virtio-mmio transport, vsock to
/// the host, block, virtio-fs, overlayfs, and the balloon (free page reporting). No virtio-net:
/// hull-vmm has no network device, and loading it (with its failover dependencies) cost 40 ms of
/// every boot in the harness.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "vmw_vsock_virtio_transport",
    "vsock",
    "virtio_blk",
    "virtio_balloon",
    "virtiofs",
    "fuse",
    "overlay",
];

/// Hull's kernel configuration fragment, relative to the workspace root.
pub const KERNEL_CONFIG: &str = "guest-image/kernel/hull.config";

/// In the guest: the list of modules to load, one absolute path a line, dependencies first.
pub const LOAD_ORDER_PATH: &str = "/lib/modules/load-order";

/// Bump when the initramfs layout (or anything else not captured by file fingerprints) changes.
const LAYOUT_VERSION: u32 = 5;

/// What to build and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The workspace root (where `cargo build -p hull-agent` runs).
    pub workspace_root: PathBuf,
    /// Cargo's target dir (the agent lands in `<it>/x86_64-unknown-linux-gnu/guest-agent/`).
    pub target_dir: PathBuf,
    /// The cargo binary (`$CARGO` under `cargo run`).
    pub cargo: PathBuf,
    /// Where the image goes, e.g. `target/guest`.
    pub out_dir: PathBuf,
    /// The kernel download cache, shared with the harness's L1 kernel (e.g. `target/kernels`).
    pub cache_dir: PathBuf,
    /// Rebuild vmlinux and initramfs even if their inputs did not change.
    pub force: bool,
    /// Print a line per step on stdout.
    pub progress: bool,
    /// Which guest kernel.
    pub kernel: GuestKernel,
}

/// Which kernel the guest image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestKernel {
    /// Debian's cloud kernel package, its drivers loaded as modules by the agent
    /// (`HULL_GUEST_KERNEL=debian`).
    DebianCloud,
    /// Hull's own build of Debian's kernel source (see [`crate::kbuild`]): everything built in, no
    /// modules; half the guest boot and half the guest memory of Debian's cloud kernel (the default).
    #[default]
    Hull,
}

/// Where a kernel comes from, for steps 3 and 4.
enum KernelSource {
    Debian(KernelPackage),
    Built(kbuild::BuiltKernel),
}

/// A built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The output directory.
    pub dir: PathBuf,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The ELF vmlinux (boots via PVH).
    pub vmlinux: PathBuf,
    /// The uncompressed newc initramfs.
    pub initramfs: PathBuf,
    /// A text file holding [`GuestImage::release`].
    pub kernel_release_file: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The static agent that is the initramfs's `/init`.
    pub agent: PathBuf,
    /// The in-guest paths of the modules in the initramfs, in load order.
    pub modules: Vec<String>,
}

impl GuestImage {
    /// The image's paths under `out_dir`, whether built or not.
    fn paths(out_dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        (
            out_dir.join("vmlinuz"),
            out_dir.join("vmlinux"),
            out_dir.join("initramfs.cpio"),
            out_dir.join("kernel-release"),
        )
    }
}

/// Builds (or brings up to date) the guest image described by `opts`.
pub fn build(opts: &BuildOptions) -> Result<GuestImage> {
    let step = |n: u32, what: &str, state: &str| {
        if opts.progress {
            println!("guest-image: [{n}/4] {what}: {state}");
        }
    };
    let out = &opts.out_dir;
    fs::create_dir_all(out.join(".stamps")).map_err(Error::io("create", out.join(".stamps")))?;
    let (vmlinuz, vmlinux, initramfs, release_file) = GuestImage::paths(out);

    // 1. kernel
    let source = match opts.kernel {
        GuestKernel::DebianCloud => {
            if opts.progress && !opts.cache_dir.exists() {
                println!(
                    "guest-image: [1/4] kernel: downloading into {}",
                    opts.cache_dir.display()
                );
            }
            let fetched = kernel::fetch(&opts.cache_dir, Flavour::Cloud)?;
            step(
                1,
                "kernel",
                &format!(
                    "{} {}",
                    fetched.name,
                    if fetched.fresh {
                        "downloaded"
                    } else {
                        "(cached)"
                    }
                ),
            );
            KernelSource::Debian(fetched.package)
        }
        GuestKernel::Hull => {
            let fragment = opts.workspace_root.join(KERNEL_CONFIG);
            if opts.progress {
                print!(
                    "guest-image: [1/4] kernel (linux-source-6.1 + {KERNEL_CONFIG}, minutes when it changed): "
                );
                let _ = std::io::stdout().flush();
            }
            let built = kbuild::build(&opts.cache_dir, &fragment)?;
            if opts.progress {
                println!(
                    "{} {}",
                    built.release,
                    if built.rebuilt { "built" } else { "(cached)" }
                );
            }
            KernelSource::Built(built)
        }
    };
    let release = match &source {
        KernelSource::Debian(k) => k.release.clone(),
        KernelSource::Built(b) => b.release.clone(),
    };

    // 2. agent
    if opts.progress {
        // cargo is quiet: say what may take a while.
        print!(
            "guest-image: [2/4] agent (cargo build --profile guest-agent --target {}, static): ",
            agent::AGENT_TARGET
        );
        let _ = std::io::stdout().flush();
    }
    let agent = agent::build(&opts.cargo, &opts.workspace_root, &opts.target_dir)?;
    if opts.progress {
        println!("{}", if agent.rebuilt { "built" } else { "(cached)" });
    }

    // 3. kernel images
    let (bz_src, elf_src) = match &source {
        KernelSource::Debian(k) => (k.vmlinuz(), None),
        KernelSource::Built(b) => (b.bzimage.clone(), Some(b.vmlinux.clone())),
    };
    let mut fp = format!("v{LAYOUT_VERSION}\n{release}\n{}", file_id(&bz_src)?);
    if let Some(e) = &elf_src {
        let _ = write!(fp, "\n{}", file_id(e)?);
    }
    let outputs = [&vmlinuz, &vmlinux, &release_file];
    if !opts.force && fresh(out, "kernel", &fp, &outputs) {
        step(3, "vmlinuz + vmlinux", "(cached)");
    } else {
        let bz = fs::read(&bz_src).map_err(Error::io("read", &bz_src))?;
        let mut elf = match &elf_src {
            Some(e) => fs::read(e).map_err(Error::io("read", e))?,
            None => extract_vmlinux(&bz)?,
        };
        // Less to copy into guest memory at every boot.
        let trimmed = crate::elf::trim_zero_tails(&mut elf);
        write_atomic(&vmlinuz, &bz)?;
        write_atomic(&vmlinux, &elf)?;
        write_atomic(&release_file, format!("{release}\n").as_bytes())?;
        record(out, "kernel", &fp)?;
        step(
            3,
            "vmlinuz + vmlinux",
            &format!(
                "written ({} -> {}, {} of zero segment tails not loaded)",
                human(bz.len() as u64),
                human(elf.len() as u64),
                human(trimmed)
            ),
        );
    }

    // 4. initramfs
    // Hull's kernel has its drivers built in: an empty load order.
    let (module_paths, guest_paths) = match &source {
        KernelSource::Debian(kpkg) => {
            let module_paths = kpkg.module_load_order(GUEST_MODULES)?;
            let guest_paths = module_paths
                .iter()
                .map(|p| in_guest_path(kpkg, p))
                .collect::<Result<Vec<_>>>()?;
            (module_paths, guest_paths)
        }
        KernelSource::Built(_) => (Vec::new(), Vec::new()),
    };
    let mut fp = format!("v{LAYOUT_VERSION}\n{release}\n{}\n", file_id(&agent.path)?);
    for p in &module_paths {
        let _ = writeln!(fp, "{}", file_id(p)?);
    }
    if !opts.force && fresh(out, "initramfs", &fp, &[&initramfs]) {
        step(4, "initramfs", "(cached)");
    } else {
        let bytes = initramfs_bytes(&agent.path, &module_paths, &guest_paths)?;
        write_atomic(&initramfs, &bytes)?;
        record(out, "initramfs", &fp)?;
        step(
            4,
            "initramfs",
            &format!(
                "written ({} modules, {})",
                module_paths.len(),
                human(bytes.len() as u64)
            ),
        );
    }

    Ok(GuestImage {
        dir: out.clone(),
        vmlinuz,
        vmlinux,
        initramfs,
        kernel_release_file: release_file,
        release,
        agent: agent.path,
        modules: guest_paths,
    })
}

/// The initramfs: `/init` (the agent), `/dev` with console and null, the usual mount points, the
/// modules under `/lib/modules/<release>/` and [`LOAD_ORDER_PATH`].
fn initramfs_bytes(agent: &Path, modules: &[PathBuf], guest_paths: &[String]) -> Result<Vec<u8>> {
    let agent_bytes = fs::read(agent).map_err(Error::io("read", agent))?;
    let mut w = cpio::Writer::new(Vec::with_capacity(agent_bytes.len() + (4 << 20)));
    let result: std::io::Result<()> = (|| {
        for (dir, mode) in [
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("tmp", 0o1777),
            ("run", 0o755),
            ("root", 0o700),
        ] {
            w.dir(dir, mode)?;
        }
        // So init has a console (and a /dev/null) before it mounts devtmpfs.
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.char_dev("dev/null", 0o666, 1, 3)?;
        w.file("init", 0o755, &agent_bytes)?;

        // Every directory above a module and above the load order (written even when empty, for a
        // kernel with everything built in), parents first (a BTreeSet sorts a parent before its
        // children). The kernel's unpacker creates no missing parents: a file without its
        // directory is silently dropped.
        let mut dirs = BTreeSet::new();
        for p in guest_paths
            .iter()
            .map(String::as_str)
            .chain([LOAD_ORDER_PATH])
        {
            let mut dir = Path::new(p.trim_start_matches('/'));
            while let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                dirs.insert(parent.to_string_lossy().into_owned());
                dir = parent;
            }
        }
        for d in &dirs {
            w.dir(d, 0o755)?;
        }
        Ok(())
    })();
    result.map_err(Error::io("write", "initramfs.cpio"))?;

    let mut load_order = String::new();
    for (src, dst) in modules.iter().zip(guest_paths) {
        let data = fs::read(src).map_err(Error::io("read", src))?;
        w.file(dst, 0o644, &data)
            .map_err(Error::io("add to the initramfs", src))?;
        load_order.push_str(dst);
        load_order.push('\n');
    }
    w.file(LOAD_ORDER_PATH, 0o644, load_order.as_bytes())
        .map_err(Error::io("add to the initramfs", LOAD_ORDER_PATH))?;
    w.finish().map_err(Error::io("finish", "initramfs.cpio"))
}

/// `/lib/modules/<release>/<path relative to the package's modules dir>`; plain `.ko` only.
fn in_guest_path(kpkg: &KernelPackage, module: &Path) -> Result<String> {
    if module.extension().and_then(|e| e.to_str()) != Some("ko") {
        return Err(Error::CompressedModule {
            path: module.to_owned(),
        });
    }
    let rel = module.strip_prefix(kpkg.modules_dir()).map_err(|_| {
        Error::io("place in the initramfs", module)(std::io::Error::other(format!(
            "not under {}",
            kpkg.modules_dir().display()
        )))
    })?;
    Ok(format!(
        "/lib/modules/{}/{}",
        kpkg.release,
        rel.to_string_lossy()
    ))
}

/// `path size mtime`: changes whenever the file is rewritten.
pub(crate) fn file_id(path: &Path) -> Result<String> {
    let md = fs::metadata(path).map_err(Error::io("stat", path))?;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {} {}", path.display(), md.len(), mtime))
}

/// Whether the step `name` is up to date: same input fingerprint as recorded, and all outputs there.
fn fresh(out: &Path, name: &str, fingerprint: &str, outputs: &[&PathBuf]) -> bool {
    let recorded = fs::read_to_string(out.join(".stamps").join(name)).unwrap_or_default();
    recorded == fingerprint && outputs.iter().all(|o| o.is_file())
}

/// Records the input fingerprint of step `name` (after its outputs are in place).
fn record(out: &Path, name: &str, fingerprint: &str) -> Result<()> {
    let path = out.join(".stamps").join(name);
    fs::write(&path, fingerprint).map_err(Error::io("write", &path))
}

/// Writes `data` to `path` through a temporary file and a rename: readers never see half a file.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = BufWriter::new(fs::File::create(&tmp)?);
        f.write_all(data)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    result.map_err(Error::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("rename into place", path))
}

/// `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_keep_the_tree() {
        let k = KernelPackage {
            release: "6.1.0-56-cloud-amd64".into(),
            root: "/c/root".into(),
        };
        let p = k.modules_dir().join("kernel/drivers/virtio/virtio_mmio.ko");
        assert_eq!(
            in_guest_path(&k, &p).unwrap(),
            "/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/virtio/virtio_mmio.ko"
        );
        let xz = k.modules_dir().join("kernel/fs/fuse/fuse.ko.xz");
        assert!(matches!(
            in_guest_path(&k, &xz),
            Err(Error::CompressedModule { .. })
        ));
    }

    /// The entry names of a newc archive, in order.
    fn cpio_names(mut a: &[u8]) -> Vec<String> {
        let field = |h: &[u8], i: usize| {
            usize::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        let pad = |n: usize| n.next_multiple_of(4);
        let mut names = Vec::new();
        loop {
            assert_eq!(&a[..6], b"070701");
            let (size, name_len) = (field(a, 6), field(a, 11));
            let name = std::str::from_utf8(&a[110..110 + name_len - 1]).unwrap();
            if name == "TRAILER!!!" {
                return names;
            }
            names.push(name.to_string());
            a = &a[pad(pad(110 + name_len) + size)..];
        }
    }

    #[test]
    fn the_load_order_has_its_directories_even_without_modules() {
        let agent = std::env::temp_dir().join(format!("hull-agent-{}", std::process::id()));
        fs::write(&agent, b"\x7fELF").unwrap();
        let bytes = initramfs_bytes(&agent, &[], &[]);
        let _ = fs::remove_file(&agent);
        let names = cpio_names(&bytes.unwrap());
        let at = |n: &str| names.iter().position(|x| x == n);
        let (lib, modules, order) = (
            at("lib").expect("lib"),
            at("lib/modules").expect("lib/modules"),
            at("lib/modules/load-order").expect("load-order"),
        );
        assert!(lib < modules && modules < order, "{names:?}");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
