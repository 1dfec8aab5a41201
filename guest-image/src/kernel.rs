//! Fetching a Debian kernel: resolving the metapackage to its versioned `linux-image-*` package,
//! `apt-get download` into a cache directory and `dpkg-deb -x` into a folder of its own, with stamps so
//! that a second call costs no apt run at all. Never installs anything on the host.
//!
//! Cache layout (under the caller's `cache_dir`):
//! - `<metapackage>.resolved`: the versioned package name, valid while the apt lists are unchanged;
//! - `<package>/<package>_<version>_amd64.deb`: the download;
//! - `<package>/root/`: the unpacked package, `<package>/.unpacked`: its stamp (holds the release).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::UNIX_EPOCH;

use crate::cmd::{self, APT_CACHE, APT_GET, DPKG_DEB};
use crate::error::{Error, Result};
use crate::{Flavour, KernelPackage};

/// Where apt keeps its package lists.
const APT_LISTS: &str = "/var/lib/apt/lists";

impl Flavour {
    /// The Debian metapackage that depends on the newest kernel of this flavour.
    pub fn metapackage(self) -> &'static str {
        match self {
            Flavour::Cloud => "linux-image-cloud-amd64",
            Flavour::Generic => "linux-image-amd64",
        }
    }
}

/// The result of [`fetch`]: the package, and whether this call downloaded or unpacked it.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub package: KernelPackage,
    /// The versioned package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub name: String,
    /// False when everything was already in the cache.
    pub fresh: bool,
}

/// Downloads (if not cached) and unpacks the newest kernel of `flavour` under `cache_dir`.
pub fn fetch_kernel(cache_dir: &Path, flavour: Flavour) -> Result<KernelPackage> {
    fetch(cache_dir, flavour).map(|f| f.package)
}

/// [`fetch_kernel`], also telling whether anything had to be done.
pub(crate) fn fetch(cache_dir: &Path, flavour: Flavour) -> Result<Fetched> {
    fs::create_dir_all(cache_dir).map_err(Error::io("create", cache_dir))?;
    let name = resolve(cache_dir, flavour)?;
    let dir = cache_dir.join(&name);
    let stamp = dir.join(".unpacked");
    let root = dir.join("root");

    if let Ok(release) = fs::read_to_string(&stamp) {
        let package = KernelPackage {
            release: release.trim().to_owned(),
            root: root.clone(),
        };
        if package.vmlinuz().is_file() {
            return Ok(Fetched {
                package,
                name,
                fresh: false,
            });
        }
    }

    fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    let deb = match find_deb(&dir, &name)? {
        Some(deb) => deb,
        None => {
            download(&dir, &name)?;
            find_deb(&dir, &name)?.ok_or_else(|| Error::CommandFailed {
                command: format!("apt-get download {name}"),
                status: "exit status: 0".into(),
                stderr: String::new(),
                hint: format!(
                    "it left no {name}_*.deb in {}; run 'apt-get update' and retry",
                    dir.display()
                ),
            })?
        }
    };

    // Unpack next to the final place, then rename: a crash or a concurrent run never leaves a half tree
    // that looks finished.
    let tmp = dir.join(format!("root.tmp-{}", std::process::id()));
    remove_dir_if_exists(&tmp)?;
    cmd::run(
        DPKG_DEB,
        Command::new(DPKG_DEB.program).arg("-x").arg(&deb).arg(&tmp),
        &format!(
            "the download may be damaged: delete {} and retry",
            deb.display()
        ),
    )?;
    remove_dir_if_exists(&root)?;
    fs::rename(&tmp, &root).map_err(Error::io("rename into place", &root))?;

    let release = release_of(&root)?;
    fs::write(&stamp, format!("{release}\n")).map_err(Error::io("write", &stamp))?;
    Ok(Fetched {
        package: KernelPackage { release, root },
        name,
        fresh: true,
    })
}

/// The versioned package the metapackage of `flavour` depends on. `apt-cache` is slow (~0.6 s), so
/// the answer is cached in `cache_dir` together with a fingerprint of the apt lists it came from.
fn resolve(cache_dir: &Path, flavour: Flavour) -> Result<String> {
    let meta = flavour.metapackage();
    let cache = cache_dir.join(format!("{meta}.resolved"));
    let mut lists = lists_fingerprint();
    if lists.is_empty() {
        apt_get_update_once()?;
        lists = lists_fingerprint();
    }
    if let Ok(text) = fs::read_to_string(&cache) {
        if let Some((fp, name)) = text.rsplit_once("\n---\n") {
            if fp == lists && !name.trim().is_empty() {
                return Ok(name.trim().to_owned());
            }
        }
    }

    let out = cmd::run(
        APT_CACHE,
        Command::new(APT_CACHE.program).arg("depends").arg(meta),
        "run 'apt-get update' and retry",
    )?;
    let name = parse_depends(&String::from_utf8_lossy(&out.stdout), meta)
        .ok_or(Error::NoKernelPackage { metapackage: meta })?;
    // Only a cache: failing to write it costs speed, not correctness.
    let _ = fs::write(&cache, format!("{lists}\n---\n{name}\n"));
    Ok(name)
}

/// The first `linux-image-*` dependency in `apt-cache depends` output.
pub(crate) fn parse_depends(text: &str, meta: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|dep| dep.starts_with("linux-image-") && *dep != meta)
        .map(str::to_owned)
}

/// Names, sizes and mtimes of apt's package lists: changes whenever `apt-get update` fetched anything.
/// Empty when there are no lists.
fn lists_fingerprint() -> String {
    let Ok(entries) = fs::read_dir(APT_LISTS) else {
        return String::new();
    };
    let mut lines: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            let mtime = md
                .modified()
                .ok()?
                .duration_since(UNIX_EPOCH)
                .ok()?
                .as_nanos();
            Some(format!(
                "{} {} {}",
                e.file_name().to_string_lossy(),
                md.len(),
                mtime
            ))
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// `apt-get update`, at most once per process.
fn apt_get_update_once() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = cmd::run(
            APT_GET,
            Command::new(APT_GET.program).args(["update", "-q"]),
            "check /etc/apt/sources.list and the network, then run 'apt-get update' by hand",
        )
        .map(drop);
    });
    result
}

/// `apt-get download NAME` into `dir`.
fn download(dir: &Path, name: &str) -> Result<()> {
    let mut command = Command::new(APT_GET.program);
    // Running as root, apt would hand the download to the `_apt` user, who cannot write to most cache
    // dirs (a harmless warning); download as the caller instead.
    command
        .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
        .arg(name)
        .current_dir(dir);
    cmd::run(
        APT_GET,
        &mut command,
        &format!("could not download {name}: run 'apt-get update' and retry"),
    )
    .map(drop)
}

/// The downloaded `.deb` of `name` in `dir`, if any.
fn find_deb(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{name}_");
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(Error::io("list", dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

/// The release: what follows `vmlinuz-` in `root/boot`.
fn release_of(root: &Path) -> Result<String> {
    let boot = root.join("boot");
    let entries = fs::read_dir(&boot).map_err(|_| Error::NoKernelImage { root: root.into() })?;
    let mut releases: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .collect();
    releases.sort();
    releases
        .pop()
        .ok_or_else(|| Error::NoKernelImage { root: root.into() })
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", dir)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_picks_the_versioned_package() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(text, "linux-image-cloud-amd64").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let alt = "linux-image-amd64\n |Depends: linux-image-6.1.0-56-amd64\n  Depends: linux-image-6.1.0-55-amd64\n";
        assert_eq!(
            parse_depends(alt, "linux-image-amd64").as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            parse_depends("linux-image-amd64\n", "linux-image-amd64"),
            None
        );
    }

    #[test]
    fn release_is_what_follows_vmlinuz() {
        let dir = std::env::temp_dir().join(format!("hull-gi-release-{}", std::process::id()));
        fs::create_dir_all(dir.join("boot")).unwrap();
        fs::write(dir.join("boot/vmlinuz-6.1.0-56-cloud-amd64"), b"x").unwrap();
        fs::write(dir.join("boot/System.map-6.1.0-56-cloud-amd64"), b"x").unwrap();
        assert_eq!(release_of(&dir).unwrap(), "6.1.0-56-cloud-amd64");
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(release_of(&dir), Err(Error::NoKernelImage { .. })));
    }
}
