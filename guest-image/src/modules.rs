//! Kernel modules of an unpacked package: `depmod` once (Debian's .deb ships no `modules.dep`), our own
//! parser of `modules.dep` and `modules.builtin`, and a dependencies-first load order.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::{self, DEPMOD};
use crate::error::{Error, Result};
use crate::KernelPackage;

impl KernelPackage {
    /// The named modules (e.g. `"virtio_mmio"`, `"kvm-amd"`) and everything they depend on, as paths
    /// of `.ko` files, dependencies first, each once. `-` and `_` are the same in names; modules built
    /// into the kernel (`modules.builtin`) are skipped; an unknown name is an error naming it.
    pub fn module_load_order(&self, names: &[&str]) -> Result<Vec<PathBuf>, Error> {
        let dir = self.modules_dir();
        let dep_file = dir.join("modules.dep");
        if !dep_file.is_file() {
            self.depmod()?;
        }
        let text = fs::read_to_string(&dep_file).map_err(Error::io("read", &dep_file))?;
        let deps = ModulesDep::parse(&text);
        // Debian ships modules.builtin in the package; without it nothing counts as built in.
        let builtin_file = dir.join("modules.builtin");
        let builtin = match fs::read_to_string(&builtin_file) {
            Ok(text) => parse_builtin(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(Error::io("read", &builtin_file)(e)),
        };
        let order = deps.load_order(names, &builtin, &dep_file)?;
        Ok(order.into_iter().map(|rel| dir.join(rel)).collect())
    }

    /// `depmod -b ROOT -F ROOT/boot/System.map-REL REL`: writes `modules.dep` and friends.
    fn depmod(&self) -> Result<()> {
        let system_map = self
            .root
            .join("boot")
            .join(format!("System.map-{}", self.release));
        let mut command = Command::new(DEPMOD.program);
        command
            .arg("-b")
            .arg(&self.root)
            .arg("-F")
            .arg(&system_map)
            .arg(&self.release);
        cmd::run(
            DEPMOD,
            &mut command,
            &format!(
                "is {} a complete unpacked kernel package? delete it and retry",
                self.root.display()
            ),
        )
        .map(drop)
    }
}

/// The module name of a path in `modules.dep`/`modules.builtin`: file name without `.ko[.xz|.zst|.gz]`,
/// `-` folded to `_` (the kernel does the same).
pub(crate) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(file);
    normalize(stem)
}

/// `-` and `_` are interchangeable in module names.
pub(crate) fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn parse_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect()
}

/// `modules.dep`: for each module (by normalized name) its path and the paths it depends on, all
/// relative to `lib/modules/<release>`.
#[derive(Debug, Default)]
pub(crate) struct ModulesDep {
    modules: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    path: String,
    deps: Vec<String>,
}

impl ModulesDep {
    /// Parses the text of `modules.dep` (`path: dep dep ...` per line). Lines without a colon are
    /// ignored.
    pub(crate) fn parse(text: &str) -> Self {
        let modules = text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(path, _)| !path.trim().is_empty())
            .map(|(path, deps)| {
                let path = path.trim().to_owned();
                let deps = deps.split_whitespace().map(str::to_owned).collect();
                (module_name(&path), Entry { path, deps })
            })
            .collect();
        Self { modules }
    }

    /// Paths (relative) of `names` and their dependencies, dependencies first, each once.
    pub(crate) fn load_order(
        &self,
        names: &[&str],
        builtin: &HashSet<String>,
        dep_file: &Path,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for name in names {
            let name = normalize(name);
            if self.modules.contains_key(&name) {
                self.visit(&name, &mut done, &mut visiting, &mut out, dep_file)?;
            } else if !builtin.contains(&name) {
                return Err(Error::UnknownModule {
                    name,
                    modules_dep: dep_file.to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// Depth-first: every dependency before its dependant. `modules.dep` lists the transitive
    /// dependencies of each module; visiting each of them recursively orders them whatever the order of
    /// the list.
    fn visit(
        &self,
        name: &str,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
        out: &mut Vec<String>,
        dep_file: &Path,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_owned()) {
            return Err(Error::ModuleCycle {
                name: name.to_owned(),
                modules_dep: dep_file.to_owned(),
            });
        }
        let Some(entry) = self.modules.get(name) else {
            // A dependency modules.dep does not describe itself: load it with no dependencies of its own.
            visiting.remove(name);
            return Ok(());
        };
        for dep in &entry.deps {
            let dep_name = module_name(dep);
            if self.modules.contains_key(&dep_name) {
                self.visit(&dep_name, done, visiting, out, dep_file)?;
            } else if done.insert(dep_name) {
                out.push(dep.clone());
            }
        }
        visiting.remove(name);
        done.insert(name.to_owned());
        out.push(entry.path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko kernel/drivers/crypto/ccp/ccp.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/crypto/ccp/ccp.ko:
";

    fn order(names: &[&str], builtin: &[&str]) -> Result<Vec<String>> {
        let builtin = builtin.iter().map(|n| normalize(n)).collect();
        ModulesDep::parse(DEP).load_order(names, &builtin, Path::new("modules.dep"))
    }

    fn pos(v: &[String], suffix: &str) -> usize {
        v.iter()
            .position(|p| p.ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix} missing from {v:?}"))
    }

    #[test]
    fn dependencies_come_first_each_once() {
        let v = order(&["virtio_mmio", "vmw_vsock_virtio_transport", "vsock"], &[]).unwrap();
        assert_eq!(v.len(), 6, "{v:?}");
        assert!(pos(&v, "/virtio_ring.ko") < pos(&v, "/virtio.ko"));
        assert!(pos(&v, "/virtio.ko") < pos(&v, "/virtio_mmio.ko"));
        assert!(pos(&v, "/vsock.ko") < pos(&v, "/vmw_vsock_virtio_transport_common.ko"));
        assert!(pos(&v, "_common.ko") < pos(&v, "/vmw_vsock_virtio_transport.ko"));
        let unique: HashSet<_> = v.iter().collect();
        assert_eq!(unique.len(), v.len());
    }

    #[test]
    fn dash_and_underscore_are_the_same() {
        let a = order(&["kvm-amd"], &[]).unwrap();
        let b = order(&["kvm_amd"], &[]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.last().unwrap(), "kernel/arch/x86/kvm/kvm-amd.ko");
        assert!(pos(&a, "/irqbypass.ko") < pos(&a, "/kvm.ko"));
        assert!(pos(&a, "/ccp.ko") < pos(&a, "/kvm-amd.ko"));
    }

    #[test]
    fn builtin_is_skipped_unknown_is_an_error() {
        assert_eq!(order(&["ext4"], &["ext4"]).unwrap(), Vec::<String>::new());
        match order(&["virtio_mmio", "nosuchmod"], &[]) {
            Err(Error::UnknownModule { name, .. }) => assert_eq!(name, "nosuchmod"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cycle_is_reported() {
        let dep = "a.ko: b.ko\nb.ko: a.ko\n";
        let r = ModulesDep::parse(dep).load_order(&["a"], &HashSet::new(), Path::new("m"));
        assert!(matches!(r, Err(Error::ModuleCycle { .. })), "{r:?}");
    }

    #[test]
    fn names_of_paths() {
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-amd.ko"), "kvm_amd");
        assert_eq!(module_name("kernel/fs/fuse/virtiofs.ko.xz"), "virtiofs");
        assert_eq!(module_name("kernel/fs/overlayfs/overlay.ko"), "overlay");
    }
}
