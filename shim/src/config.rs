//! The shim's configuration: one TOML file, its defaults, where it is found, and the per-pod
//! overrides (Kata's annotations) it allows.
//!
//! Found at, first that is set: containerd's runtime option `ConfigPath`, `$HULL_CONF_FILE`,
//! `$KATA_CONF_FILE`, then [`DEFAULT_PATH`]. A missing default file means all defaults; a missing
//! file that was asked for by name is an error. Unknown keys are errors (a typo must not silently
//! mean a default).
//!
//! ```toml
//! [hypervisor]
//! path = "/usr/local/bin/hull-vmm"       # the VMM binary
//! kernel = "/usr/share/hull/vmlinux"     # guest kernel (ELF vmlinux or bzImage)
//! initrd = "/usr/share/hull/initramfs.cpio"
//! default_vcpus = 1
//! default_memory = 256                   # MiB
//! max_vcpus = 8                          # bound for annotations and pod limits
//! max_memory = 16384                     # MiB
//! kernel_params = ""                     # appended to the guest command line
//! debug_console = false                  # guest console + agent debug log into the shim log
//! free_page_reporting = true             # RAM the guest frees goes back to the host
//! enable_annotations = ["default_memory", "default_vcpus"]
//!
//! [shared_fs]
//! mode = "virtio-fs"                     # or "none": no share, no containers from snapshots
//! virtiofsd = "/usr/local/libexec/hull/virtiofsd"
//! cache = "auto"                         # virtiofsd --cache: never, metadata, auto, always
//!
//! [runtime]
//! state_dir = "/run/hull"                # per-sandbox sockets, shared directories, pid files
//! agent_timeout = 60                     # seconds to wait for the guest agent at boot
//! agent_check_interval = 5               # seconds between liveness checks of a running guest (0: none)
//! agent_check_timeout = 30               # a check unanswered this long: the guest is hung, its VM
//!                                        # is killed and its tasks end with 255
//!
//! [factory]
//! warm_vms = 0                           # sandboxes of the default size kept booted ahead of
//!                                        # need (Kata's VMCache): each saves a pod its VM boot and
//!                                        # costs the host one idle sandbox (~37 MiB PSS)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration is when nothing says otherwise.
pub const DEFAULT_PATH: &str = "/etc/hull/config.toml";
/// Environment variable naming the configuration file (Kata's `KATA_CONF_FILE` works too).
pub const ENV_PATH: &str = "HULL_CONF_FILE";
/// Prefix of Kata's hypervisor annotations.
pub const ANNOTATION_PREFIX: &str = "io.katacontainers.config.hypervisor.";

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the Hull configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid Hull configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words (line, key, what was expected).
        message: String,
    },
    /// A value is out of range or names something that is not there.
    #[error("invalid Hull configuration {path}: {key} = {value}: {why}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key, `table.key`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong and what is accepted.
        why: String,
    },
    /// An annotation is not allowed or not valid.
    #[error("annotation {key}={value}: {why}")]
    Annotation {
        /// The annotation.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong.
        why: String,
    },
}

/// `[hypervisor]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hypervisor {
    /// The hull-vmm binary.
    pub path: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs (the agent is its `/init`).
    pub initrd: PathBuf,
    /// vCPUs of a sandbox before pod sizing.
    pub default_vcpus: u32,
    /// RAM of a sandbox before pod sizing, MiB.
    pub default_memory: u32,
    /// Most vCPUs a sandbox may get.
    pub max_vcpus: u32,
    /// Most RAM a sandbox may get, MiB.
    pub max_memory: u32,
    /// Extra guest kernel parameters.
    pub kernel_params: String,
    /// The guest console and the agent's debug log go to the shim's log.
    pub debug_console: bool,
    /// A free-page-reporting balloon: RAM the guest frees is given back to the host (2 s after,
    /// in blocks of 2 MiB and up).
    pub free_page_reporting: bool,
    /// Annotation names (after [`ANNOTATION_PREFIX`]) a pod may set.
    pub enable_annotations: Vec<String>,
}

impl Default for Hypervisor {
    fn default() -> Self {
        Self {
            path: "/usr/local/bin/hull-vmm".into(),
            kernel: "/usr/share/hull/vmlinux".into(),
            initrd: "/usr/share/hull/initramfs.cpio".into(),
            default_vcpus: 1,
            default_memory: 256,
            max_vcpus: 8,
            max_memory: 16384,
            kernel_params: String::new(),
            debug_console: false,
            free_page_reporting: true,
            enable_annotations: vec!["default_memory".into(), "default_vcpus".into()],
        }
    }
}

/// How container filesystems reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SharedFsMode {
    /// virtiofsd per sandbox, one share for every rootfs and volume.
    #[serde(rename = "virtio-fs")]
    VirtioFs,
    /// No share: only rootfs already in the guest image work.
    #[serde(rename = "none")]
    None,
}

/// `[shared_fs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedFs {
    /// virtio-fs or none.
    pub mode: SharedFsMode,
    /// The virtiofsd binary.
    pub virtiofsd: PathBuf,
    /// virtiofsd's `--cache`.
    pub cache: String,
}

impl Default for SharedFs {
    fn default() -> Self {
        Self {
            mode: SharedFsMode::VirtioFs,
            virtiofsd: "/usr/local/libexec/hull/virtiofsd".into(),
            cache: "auto".into(),
        }
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Per-sandbox state.
    pub state_dir: PathBuf,
    /// Seconds to wait for the agent at boot.
    pub agent_timeout: u64,
    /// Seconds between two liveness checks (`Check`) of a running guest's agent; 0: no checks.
    pub agent_check_interval: u64,
    /// Seconds a liveness check may go unanswered before the guest counts as hung: its VM is then
    /// killed and every task in it ends with 255 (as when the VM dies).
    pub agent_check_timeout: u64,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            state_dir: "/run/hull".into(),
            agent_timeout: 60,
            // Kata's sandbox monitor checks its agent every 5 s too.
            agent_check_interval: 5,
            agent_check_timeout: 30,
        }
    }
}

/// `[factory]`: sandboxes booted before a pod asks for one ([`crate::warm`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Factory {
    /// How many booted, unclaimed sandboxes of the default size to keep (0: none).
    pub warm_vms: u32,
}

/// Most warm sandboxes a configuration may ask for.
pub const MAX_WARM_VMS: u32 = 8;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[hypervisor]`.
    pub hypervisor: Hypervisor,
    /// `[shared_fs]`.
    pub shared_fs: SharedFs,
    /// `[runtime]`.
    pub runtime: Runtime,
    /// `[factory]`.
    pub factory: Factory,
    /// Where it was read from (empty: defaults only).
    #[serde(skip)]
    pub source: PathBuf,
}

/// The file to read: `option_path` (containerd's `ConfigPath`), then the environment, then the
/// default. The flag says whether it was asked for by name.
pub fn locate(option_path: Option<&str>) -> (PathBuf, bool) {
    if let Some(p) = option_path.filter(|p| !p.is_empty()) {
        return (PathBuf::from(p), true);
    }
    for var in [ENV_PATH, "KATA_CONF_FILE"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return (PathBuf::from(p), true);
        }
    }
    (PathBuf::from(DEFAULT_PATH), false)
}

impl Config {
    /// Reads and checks `path`; if it is missing and was not `required`, the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                let c = Self::default();
                c.validate(path)?;
                return Ok(c);
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Self::parse(&text, path)
    }

    /// Parses and checks `text` (read from `path`).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut c: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        c.source = path.to_path_buf();
        c.validate(path)?;
        Ok(c)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key, value: String, why: String| ConfigError::Value {
            path: path.to_path_buf(),
            key,
            value,
            why,
        };
        let h = &self.hypervisor;
        if h.max_vcpus == 0 || h.max_vcpus > 255 {
            return Err(bad(
                "hypervisor.max_vcpus",
                h.max_vcpus.to_string(),
                "must be 1 to 255".into(),
            ));
        }
        if h.default_vcpus == 0 || h.default_vcpus > h.max_vcpus {
            return Err(bad(
                "hypervisor.default_vcpus",
                h.default_vcpus.to_string(),
                format!("must be 1 to max_vcpus ({})", h.max_vcpus),
            ));
        }
        if h.max_memory < 64 {
            return Err(bad(
                "hypervisor.max_memory",
                h.max_memory.to_string(),
                "must be at least 64 (MiB)".into(),
            ));
        }
        if h.default_memory < 64 || h.default_memory > h.max_memory {
            return Err(bad(
                "hypervisor.default_memory",
                h.default_memory.to_string(),
                format!("must be 64 to max_memory ({}) MiB", h.max_memory),
            ));
        }
        for a in &h.enable_annotations {
            if !KNOWN_ANNOTATIONS.contains(&a.as_str()) {
                return Err(bad(
                    "hypervisor.enable_annotations",
                    format!("{a:?}"),
                    format!("known annotations: {}", KNOWN_ANNOTATIONS.join(", ")),
                ));
            }
        }
        if !["never", "metadata", "auto", "always"].contains(&self.shared_fs.cache.as_str()) {
            return Err(bad(
                "shared_fs.cache",
                format!("{:?}", self.shared_fs.cache),
                "must be never, metadata, auto or always".into(),
            ));
        }
        if self.runtime.agent_timeout == 0 {
            return Err(bad(
                "runtime.agent_timeout",
                "0".into(),
                "must be at least 1 (seconds)".into(),
            ));
        }
        if self.factory.warm_vms > MAX_WARM_VMS {
            return Err(bad(
                "factory.warm_vms",
                self.factory.warm_vms.to_string(),
                format!("must be 0 to {MAX_WARM_VMS}"),
            ));
        }
        if self.runtime.agent_check_interval > 0 && self.runtime.agent_check_timeout == 0 {
            return Err(bad(
                "runtime.agent_check_timeout",
                "0".into(),
                "must be at least 1 (seconds) while agent_check_interval is not 0".into(),
            ));
        }
        Ok(())
    }

    /// Checks that the files the sandbox needs exist, naming the first that does not.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let mut files = vec![
            ("hypervisor.path", &self.hypervisor.path),
            ("hypervisor.kernel", &self.hypervisor.kernel),
            ("hypervisor.initrd", &self.hypervisor.initrd),
        ];
        if self.shared_fs.mode == SharedFsMode::VirtioFs {
            files.push(("shared_fs.virtiofsd", &self.shared_fs.virtiofsd));
        }
        for (key, p) in files {
            if !p.is_file() {
                return Err(ConfigError::Value {
                    path: self.source.clone(),
                    key,
                    value: p.display().to_string(),
                    why: "no such file".into(),
                });
            }
        }
        Ok(())
    }
}

impl Config {
    /// What makes two sandboxes of this configuration interchangeable before a pod uses one:
    /// everything about the VM, its share and where it lives, and its size (hex, 16 digits). A
    /// warm sandbox is only handed to a pod whose configuration and size give the same key.
    pub fn vm_key(&self, size: Sizing) -> String {
        use sha2::{Digest, Sha256};
        let text = format!(
            "{:?}|{:?}|{}|{}x{}",
            self.hypervisor,
            self.shared_fs,
            self.runtime.state_dir.display(),
            size.vcpus,
            size.memory_mib
        );
        Sha256::digest(text.as_bytes())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The size of a sandbox no annotation asks anything of.
    pub fn default_sizing(&self) -> Sizing {
        Sizing {
            vcpus: self.hypervisor.default_vcpus,
            memory_mib: self.hypervisor.default_memory,
        }
    }
}

/// Annotations a configuration may enable.
pub const KNOWN_ANNOTATIONS: &[&str] = &["default_memory", "default_vcpus"];

/// A sandbox's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// vCPUs.
    pub vcpus: u32,
    /// RAM, MiB.
    pub memory_mib: u32,
}

impl Config {
    /// The sandbox's size: the defaults, then Kata's annotations (only those enabled), then
    /// room for the pod's declared limits (CRI's `sandbox-cpu-*`/`sandbox-memory` annotations)
    /// on top; bounded by the maxima.
    pub fn sizing(&self, annotations: &BTreeMap<String, String>) -> Result<Sizing, ConfigError> {
        let h = &self.hypervisor;
        let mut s = Sizing {
            vcpus: h.default_vcpus,
            memory_mib: h.default_memory,
        };
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let err = |why: String| ConfigError::Annotation {
                key: key.clone(),
                value: value.clone(),
                why,
            };
            if !h.enable_annotations.iter().any(|a| a == name) {
                return Err(err(format!(
                    "not enabled in hypervisor.enable_annotations of {}",
                    self.source_name()
                )));
            }
            let n: u32 = value
                .trim()
                .parse()
                .map_err(|_| err("not a whole number".into()))?;
            match name {
                "default_vcpus" if (1..=h.max_vcpus).contains(&n) => s.vcpus = n,
                "default_vcpus" => return Err(err(format!("must be 1 to {}", h.max_vcpus))),
                "default_memory" if (64..=h.max_memory).contains(&n) => s.memory_mib = n,
                "default_memory" => {
                    return Err(err(format!("must be 64 to {} (MiB)", h.max_memory)))
                }
                _ => return Err(err("unknown annotation".into())),
            }
        }
        // CRI's pod limits: the sandbox gets room for them on top of the base size.
        let num = |k: &str| -> Result<Option<u64>, ConfigError> {
            annotations
                .get(k)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| ConfigError::Annotation {
                            key: k.into(),
                            value: v.clone(),
                            why: "not a whole number".into(),
                        })
                })
                .transpose()
        };
        let quota = num("io.kubernetes.cri.sandbox-cpu-quota")?.unwrap_or(0);
        let period = num("io.kubernetes.cri.sandbox-cpu-period")?.unwrap_or(0);
        if quota > 0 && period > 0 {
            let extra = quota.div_ceil(period);
            s.vcpus = (u64::from(s.vcpus) + extra).min(u64::from(h.max_vcpus)) as u32;
        }
        if let Some(bytes) = num("io.kubernetes.cri.sandbox-memory")?.filter(|&b| b > 0) {
            let mib = bytes.div_ceil(1 << 20);
            s.memory_mib = (u64::from(s.memory_mib) + mib).min(u64::from(h.max_memory)) as u32;
        }
        Ok(s)
    }

    fn source_name(&self) -> String {
        if self.source.as_os_str().is_empty() {
            "the built-in defaults".into()
        } else {
            self.source.display().to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/hull/config.toml"))
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.hypervisor.default_vcpus, 1);
        assert_eq!(c.hypervisor.default_memory, 256);
        assert_eq!(c.shared_fs.mode, SharedFsMode::VirtioFs);
        assert_eq!(c.runtime.state_dir, Path::new("/run/hull"));
    }

    #[test]
    fn values_are_read() {
        let c = parse(
            "[hypervisor]\npath = \"/x/hull-vmm\"\ndefault_vcpus = 2\ndefault_memory = 512\n\
             [shared_fs]\nmode = \"none\"\n[runtime]\nstate_dir = \"/tmp/h\"\n",
        )
        .unwrap();
        assert_eq!(c.hypervisor.path, Path::new("/x/hull-vmm"));
        assert_eq!(
            (c.hypervisor.default_vcpus, c.hypervisor.default_memory),
            (2, 512)
        );
        assert_eq!(c.shared_fs.mode, SharedFsMode::None);
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            (
                "[hypervisor]\ndefault_vcpus = 0",
                "hypervisor.default_vcpus",
            ),
            (
                "[hypervisor]\ndefault_vcpus = 9",
                "hypervisor.default_vcpus",
            ),
            (
                "[hypervisor]\ndefault_memory = 10",
                "hypervisor.default_memory",
            ),
            (
                "[hypervisor]\nenable_annotations = [\"kernel\"]",
                "hypervisor.enable_annotations",
            ),
            ("[shared_fs]\ncache = \"sometimes\"", "shared_fs.cache"),
            ("[runtime]\nagent_timeout = 0", "runtime.agent_timeout"),
            (
                "[runtime]\nagent_check_timeout = 0",
                "runtime.agent_check_timeout",
            ),
            ("[factory]\nwarm_vms = 9", "factory.warm_vms"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("/etc/hull/config.toml"),
                "{text}: {e}"
            );
        }
        let e = parse("[hypervisor]\ndefault_vcpu = 2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_vcpu"), "{e}");
        let e = parse("[shared_fs]\nmode = \"9p\"").unwrap_err().to_string();
        assert!(e.contains("9p") || e.contains("variant"), "{e}");
        let e = parse("[hypervisor]\ndefault_memory = \"lots\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_memory"), "{e}");
    }

    #[test]
    fn the_vm_key_follows_what_makes_a_vm_and_its_size_only() {
        let a = parse("[factory]\nwarm_vms = 2").unwrap();
        let size = a.default_sizing();
        // The pool size and the agent checks do not change the VM.
        let b = parse("[runtime]\nagent_check_interval = 9").unwrap();
        assert_eq!(a.vm_key(size), b.vm_key(size));
        assert_eq!(a.vm_key(size).len(), 16);
        let bigger = Sizing {
            memory_mib: size.memory_mib * 2,
            ..size
        };
        assert_ne!(a.vm_key(size), a.vm_key(bigger));
        for other in [
            "[hypervisor]\nkernel_params = \"x=1\"",
            "[hypervisor]\ndebug_console = true",
            "[shared_fs]\ncache = \"always\"",
            "[runtime]\nstate_dir = \"/run/other\"",
        ] {
            assert_ne!(
                a.vm_key(size),
                parse(other).unwrap().vm_key(size),
                "{other}"
            );
        }
    }

    #[test]
    fn a_missing_file_is_an_error_only_when_named() {
        let p = Path::new("/nonexistent/hull.toml");
        assert!(Config::load(p, false).is_ok());
        let e = Config::load(p, true).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/hull.toml"), "{e}");
    }

    #[test]
    fn check_files_names_the_missing_one() {
        let c = parse("[hypervisor]\npath = \"/bin/sh\"\nkernel = \"/no/vmlinux\"").unwrap();
        let e = c.check_files().unwrap_err().to_string();
        assert!(
            e.contains("hypervisor.kernel") && e.contains("/no/vmlinux"),
            "{e}"
        );
    }

    #[test]
    fn annotations_size_the_sandbox_within_bounds() {
        let c = parse("").unwrap();
        let s = c.sizing(&ann(&[])).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (1, 256));
        let s = c
            .sizing(&ann(&[
                ("io.katacontainers.config.hypervisor.default_vcpus", "2"),
                ("io.katacontainers.config.hypervisor.default_memory", "1024"),
            ]))
            .unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (2, 1024));
        // Pod limits on top: 1.5 CPUs round up to 2 more; 128 MiB more.
        let s = c
            .sizing(&ann(&[
                ("io.kubernetes.cri.sandbox-cpu-quota", "150000"),
                ("io.kubernetes.cri.sandbox-cpu-period", "100000"),
                ("io.kubernetes.cri.sandbox-memory", "134217728"),
            ]))
            .unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (3, 384));
        for (k, v) in [
            ("io.katacontainers.config.hypervisor.default_vcpus", "0"),
            ("io.katacontainers.config.hypervisor.default_vcpus", "many"),
            (
                "io.katacontainers.config.hypervisor.default_memory",
                "1000000",
            ),
            ("io.katacontainers.config.hypervisor.kernel_params", "x"),
            ("io.kubernetes.cri.sandbox-memory", "-1"),
        ] {
            let e = c.sizing(&ann(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains(v), "{k}={v}: {e}");
        }
        let strict = parse("[hypervisor]\nenable_annotations = []").unwrap();
        let e = strict
            .sizing(&ann(&[(
                "io.katacontainers.config.hypervisor.default_vcpus",
                "2",
            )]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not enabled"), "{e}");
    }
}
