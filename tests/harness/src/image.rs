//! The L1 image in `target/harness/`: the Debian generic kernel and an initramfs holding static busybox,
//! the kernel modules L1 needs and the `/init` of tests/harness/l1-init.sh.
//!
//! Files:
//! - `kernels/`: the unpacked kernel package (cache of `hull_guest_image::fetch_kernel`);
//! - `l1-vmlinux`: the kernel as an ELF vmlinux, booted through PVH ([`crate::pvh`]); `l1-vmlinuz`, the
//!   bzImage, when no vmlinux could be extracted;
//! - `l1-initrd.cpio`: the initramfs, an uncompressed newc archive (decompressing under TCG costs more
//!   than reading a few extra MiB);
//! - `l1-image.manifest`: the inputs the two files were built from (paths, sizes, mtimes, a digest of the
//!   init script). The image is rebuilt only when the manifest differs, so an unchanged build costs a
//!   few `stat`s. Files are written under temporary names and renamed into place, so a concurrent run
//!   never sees half an image.
//!
//! Initramfs layout: `/init`, `/bin/busybox` (the init installs the applet links), `/etc/hull-modules`
//! (module file names in load order) and `/lib/modules/*.ko`, plus `/dev/console` and `/dev/null` so
//! the init has a console before devtmpfs is mounted.

use std::fs;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::pvh;
use hull_guest_image::cpio;
use hull_guest_image::{Flavour, KernelPackage};
use sha2::{Digest, Sha256};

/// The L1 `/init` script.
pub const INIT_SCRIPT: &str = include_str!("../l1-init.sh");

/// The modules L1 loads, in the order of the harness notes; their dependencies are resolved by
/// `module_load_order` and loaded first.
pub const L1_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "kvm",
    "ccp",
    "kvm-amd",
    "vsock",
    "vhost_vsock",
    "tap",
    "tun",
    "vhost_net",
    // Loop devices: a virtio-blk drive on a real host block device (guest_block).
    "loop",
];

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Bump when the image layout changes, so that old images are rebuilt.
const FORMAT: &str = "hull-harness L1 image 1";

/// A built L1 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L1Image {
    /// The L1 kernel: an ELF vmlinux (PVH boot) or a bzImage.
    pub kernel: PathBuf,
    /// The L1 initramfs.
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    pub release: String,
}

/// What an L1 image is built from.
#[derive(Debug, Clone)]
pub struct ImageInputs {
    /// The kernel release.
    pub release: String,
    /// The kernel's bzImage.
    pub vmlinuz: PathBuf,
    /// The `.ko` files, in load order.
    pub modules: Vec<PathBuf>,
    /// The static busybox binary.
    pub busybox: PathBuf,
    /// The `/init` script.
    pub init: String,
}

/// Errors building the L1 image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Fetching the kernel package failed.
    #[error("fetching the L1 kernel (Debian generic flavour, which has 9p) into {cache} failed: {source}")]
    Kernel {
        /// The kernel cache directory.
        cache: PathBuf,
        /// What went wrong.
        source: Box<hull_guest_image::Error>,
    },
    /// Resolving the module load order failed.
    #[error("resolving the L1 kernel modules {modules:?} in {release} failed: {source}")]
    Modules {
        /// The modules asked for.
        modules: Vec<String>,
        /// The kernel release.
        release: String,
        /// What went wrong.
        source: Box<hull_guest_image::Error>,
    },
    /// No busybox binary.
    #[error("{0} not found: the L1 initramfs needs a static busybox; install it with `apt-get install busybox-static`")]
    BusyboxMissing(PathBuf),
    /// A dynamically linked busybox (Debian's `busybox` package) cannot run in the initramfs.
    #[error("{0} is dynamically linked (Debian's `busybox` package?), but the L1 initramfs has no libc: install the static one with `apt-get install busybox-static`")]
    BusyboxDynamic(PathBuf),
    /// A file could not be read or written.
    #[error("{action} {} failed: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
}

impl ImageError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| ImageError::Io {
            action,
            path,
            source,
        }
    }
}

/// Makes sure an up-to-date L1 image is in `harness_dir` (`target/harness`), fetching the kernel and
/// building the image only when needed.
pub fn ensure(harness_dir: &Path) -> Result<L1Image, ImageError> {
    let cache = harness_dir.join("kernels");
    let kernel = hull_guest_image::fetch_kernel(&cache, Flavour::Generic).map_err(|source| {
        ImageError::Kernel {
            cache: cache.clone(),
            source: Box::new(source),
        }
    })?;
    let inputs = inputs_for(&kernel)?;
    build(&inputs, harness_dir)
}

/// The inputs for an image of `kernel`, with the host's busybox and the built-in init script.
pub fn inputs_for(kernel: &KernelPackage) -> Result<ImageInputs, ImageError> {
    let modules = kernel
        .module_load_order(L1_MODULES)
        .map_err(|source| ImageError::Modules {
            modules: L1_MODULES.iter().map(|m| m.to_string()).collect(),
            release: kernel.release.clone(),
            source: Box::new(source),
        })?;
    let modules_dir = kernel.modules_dir();
    let modules = modules
        .into_iter()
        .map(|m| {
            if m.is_absolute() {
                m
            } else {
                modules_dir.join(m)
            }
        })
        .collect();
    Ok(ImageInputs {
        release: kernel.release.clone(),
        vmlinuz: kernel.vmlinuz(),
        modules,
        busybox: BUSYBOX.into(),
        init: INIT_SCRIPT.to_owned(),
    })
}

/// Builds the image from `inputs` into `out_dir`, unless the image there was built from the same inputs.
pub fn build(inputs: &ImageInputs, out_dir: &Path) -> Result<L1Image, ImageError> {
    check_busybox(&inputs.busybox)?;
    let manifest_path = out_dir.join("l1-image.manifest");
    let manifest = manifest(inputs)?;
    let initrd = out_dir.join("l1-initrd.cpio");
    let image = |kernel: &str| L1Image {
        kernel: out_dir.join(kernel),
        initrd: initrd.clone(),
        release: inputs.release.clone(),
    };
    // The manifest is the inputs, then the line `kernel-file NAME` naming the kernel that was built.
    if let Some(built) = fs::read_to_string(&manifest_path)
        .ok()
        .as_deref()
        .and_then(|m| m.strip_prefix(&manifest))
    {
        if let Some(kernel) = built.strip_prefix("kernel-file ").map(str::trim) {
            let image = image(kernel);
            if !kernel.contains('/') && image.kernel.is_file() && image.initrd.is_file() {
                return Ok(image);
            }
        }
    }

    fs::create_dir_all(out_dir).map_err(ImageError::io("create", out_dir))?;
    let tmp = |path: &Path| path.with_extension(format!("tmp-{}", std::process::id()));
    let bzimage = fs::read(&inputs.vmlinuz).map_err(ImageError::io("read", &inputs.vmlinuz))?;
    let (name, kernel) = match pvh::extract_vmlinux(&bzimage) {
        Ok(vmlinux) => ("l1-vmlinux", vmlinux),
        Err(e) => {
            eprintln!("hull-harness: warning: L1 boots the bzImage, ~3 s slower than PVH: {e}");
            ("l1-vmlinuz", bzimage)
        }
    };
    let image = image(name);
    let kernel_tmp = tmp(&image.kernel);
    fs::write(&kernel_tmp, kernel).map_err(ImageError::io("write", &kernel_tmp))?;
    let initrd_tmp = tmp(&image.initrd);
    write_initrd(inputs, &initrd_tmp)?;
    fs::rename(&kernel_tmp, &image.kernel)
        .map_err(ImageError::io("rename into place", &image.kernel))?;
    fs::rename(&initrd_tmp, &image.initrd)
        .map_err(ImageError::io("rename into place", &image.initrd))?;
    for stale in ["l1-vmlinux", "l1-vmlinuz"]
        .into_iter()
        .filter(|n| *n != name)
    {
        let _ = fs::remove_file(out_dir.join(stale));
    }
    let manifest_tmp = tmp(&manifest_path);
    fs::write(&manifest_tmp, format!("{manifest}kernel-file {name}\n"))
        .map_err(ImageError::io("write", &manifest_tmp))?;
    fs::rename(&manifest_tmp, &manifest_path)
        .map_err(ImageError::io("rename into place", &manifest_path))?;
    Ok(image)
}

/// The text that identifies an image built from `inputs`.
fn manifest(inputs: &ImageInputs) -> Result<String, ImageError> {
    let mut text = format!("{FORMAT}\nrelease {}\n", inputs.release);
    text.push_str(&format!(
        "init sha256:{:x}\n",
        Sha256::digest(inputs.init.as_bytes())
    ));
    let files = [("kernel", &inputs.vmlinuz), ("busybox", &inputs.busybox)]
        .into_iter()
        .chain(inputs.modules.iter().map(|m| ("module", m)));
    for (kind, path) in files {
        let meta = fs::metadata(path).map_err(ImageError::io("stat", path))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        text.push_str(&format!(
            "{kind} {} {} {}\n",
            path.display(),
            meta.len(),
            mtime.as_nanos()
        ));
    }
    Ok(text)
}

fn write_initrd(inputs: &ImageInputs, path: &Path) -> Result<(), ImageError> {
    let io_err = ImageError::io("write the L1 initramfs", path);
    let file = fs::File::create(path).map_err(ImageError::io("create", path))?;
    let read = |p: &Path| fs::read(p).map_err(ImageError::io("read", p));
    let busybox = read(&inputs.busybox)?;
    let mut modules = Vec::new();
    let mut order = String::new();
    for module in &inputs.modules {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        order.push_str(&name);
        order.push('\n');
        modules.push((name, read(module)?));
    }
    let write = || -> io::Result<()> {
        let mut cpio = cpio::Writer::new(BufWriter::new(file));
        for dir in ["bin", "dev", "etc", "lib", "lib/modules", "proc", "sys"] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.char_dev("dev/console", 0o600, 5, 1)?;
        cpio.char_dev("dev/null", 0o666, 1, 3)?;
        cpio.file("bin/busybox", 0o755, &busybox)?;
        cpio.file("init", 0o755, inputs.init.as_bytes())?;
        cpio.file("etc/hull-modules", 0o644, order.as_bytes())?;
        for (name, data) in &modules {
            cpio.file(&format!("lib/modules/{name}"), 0o644, data)?;
        }
        let out = cpio.finish()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().map_err(io_err)
}

/// Checks that `path` is a statically linked ELF (no `PT_INTERP` program header).
fn check_busybox(path: &Path) -> Result<(), ImageError> {
    let mut head = Vec::new();
    match fs::File::open(path) {
        Ok(file) => file
            .take(64 * 1024)
            .read_to_end(&mut head)
            .map_err(ImageError::io("read", path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::BusyboxMissing(path.into()))
        }
        Err(e) => return Err(ImageError::io("open", path)(e)),
    };
    if has_interpreter(&head) {
        return Err(ImageError::BusyboxDynamic(path.into()));
    }
    Ok(())
}

/// Whether the 64-bit little-endian ELF whose start is `head` asks for a program interpreter
/// (the dynamic loader). Anything unreadable counts as "no".
fn has_interpreter(head: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        head.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if head.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| u32_at(phoff + i * usize::from(phentsize)) == Some(PT_INTERP))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with program headers of the given types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..5].copy_from_slice(b"\x7fELF\x02");
        h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            h.extend(ph);
        }
        h
    }

    #[test]
    fn interpreter_detection() {
        assert!(has_interpreter(&elf(&[6, 3, 1])));
        assert!(!has_interpreter(&elf(&[1, 1, 4])));
        assert!(!has_interpreter(b"#!/bin/sh\n"));
        assert!(
            !has_interpreter(&elf(&[3])[..66]),
            "truncated program header"
        );
    }

    #[test]
    fn init_script_is_embedded() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        assert!(INIT_SCRIPT.contains("HULL_HARNESS_EXIT=$nonce:$status"));
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("hull-harness-image-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn fake_inputs(dir: &Path) -> ImageInputs {
        let write = |name: &str, data: &[u8]| {
            let path = dir.join(name);
            fs::write(&path, data).expect("write input");
            path
        };
        ImageInputs {
            release: "6.1.0-0-amd64".into(),
            vmlinuz: write("vmlinuz", b"kernel"),
            modules: vec![write("virtio.ko", b"m1"), write("9p.ko", b"m2")],
            busybox: write("busybox", &elf(&[1])),
            init: "#!/bin/busybox sh\n".into(),
        }
    }

    #[test]
    fn missing_and_dynamic_busybox_are_clear_errors() {
        let dir = TempDir::new("busybox");
        let mut inputs = fake_inputs(&dir.0);
        inputs.busybox = dir.0.join("nope");
        let err = build(&inputs, &dir.0.join("out")).unwrap_err();
        assert!(matches!(err, ImageError::BusyboxMissing(_)));
        assert!(err.to_string().contains("apt-get install busybox-static"));
        fs::write(dir.0.join("nope"), elf(&[3])).unwrap();
        let err = build(&inputs, &dir.0.join("out")).unwrap_err();
        assert!(matches!(err, ImageError::BusyboxDynamic(_)));
    }

    #[test]
    fn manifest_tracks_every_input() {
        let dir = TempDir::new("manifest");
        let inputs = fake_inputs(&dir.0);
        let first = manifest(&inputs).unwrap();
        assert_eq!(first, manifest(&inputs).unwrap());
        assert!(first.contains("9p.ko"));
        let mut other = inputs.clone();
        other.init.push_str("echo\n");
        assert_ne!(first, manifest(&other).unwrap());
        fs::write(&inputs.modules[1], b"longer").unwrap();
        assert_ne!(first, manifest(&inputs).unwrap());
        let mut missing = inputs.clone();
        missing.modules.push(dir.0.join("gone.ko"));
        assert!(manifest(&missing)
            .unwrap_err()
            .to_string()
            .contains("gone.ko"));
    }

    #[test]
    fn build_is_incremental() {
        let dir = TempDir::new("build");
        let inputs = fake_inputs(&dir.0);
        let out = dir.0.join("out");
        let image = build(&inputs, &out).expect("first build");
        assert_eq!(
            fs::read(&image.kernel).unwrap(),
            b"kernel",
            "not a bzImage: used as it is"
        );
        assert!(image.kernel.ends_with("l1-vmlinuz"));
        let initrd = fs::read(&image.initrd).unwrap();
        assert!(initrd.starts_with(b"070701"), "newc archive");
        let contains = |needle: &[u8]| initrd.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"lib/modules/9p.ko") && contains(b"virtio.ko\n9p.ko\n"));
        let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
        let before = mtime(&image.initrd);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(build(&inputs, &out).unwrap(), image);
        assert_eq!(
            mtime(&image.initrd),
            before,
            "unchanged inputs: nothing rebuilt"
        );
        let mut changed = inputs.clone();
        changed.init.push_str("# changed\n");
        build(&changed, &out).unwrap();
        assert_ne!(mtime(&image.initrd), before, "changed init: rebuilt");
    }
}
