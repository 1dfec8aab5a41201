//! Host mounts the shim makes: containerd's rootfs mounts (the snapshotter's overlay or bind),
//! bind mounts of volumes into the sandbox's share, the share's own shared mount point, and
//! unmounting everything under a directory at teardown.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One mount as containerd describes it (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// File system type; `bind` (or a `bind`/`rbind` option) means a bind mount.
    pub fstype: String,
    /// Source path or device.
    pub source: String,
    /// mount(8)-style options.
    pub options: Vec<String>,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn sys_mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let to_c = |s: Option<&str>| -> io::Result<Option<CString>> {
        s.map(|s| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput)))
            .transpose()
    };
    let (source, fstype, data) = (to_c(source)?, to_c(fstype)?, to_c(data)?);
    let target = cstr(target)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null where
    // mount(2) allows it.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Splits mount(8) options into flags and the data string the file system gets.
pub fn parse_options(options: &[String]) -> (libc::c_ulong, Vec<String>, bool) {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    let mut bind = false;
    for o in options {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match o.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "noatime" => (libc::MS_NOATIME, 0),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "bind" => {
                bind = true;
                (libc::MS_BIND, 0)
            }
            "rbind" => {
                bind = true;
                (libc::MS_BIND | libc::MS_REC, 0)
            }
            // Propagation is set apart; "defaults" means nothing.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "defaults" => {
                (0, 0)
            }
            other => {
                data.push(other.to_string());
                (0, 0)
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, data, bind)
}

/// Mounts `m` on `target` (which must exist). A read-only bind is remounted read-only, as the
/// kernel ignores MS_RDONLY on the first bind.
pub fn mount(m: &MountSpec, target: &Path) -> io::Result<()> {
    let (flags, data, bind_opt) = parse_options(&m.options);
    let bind = bind_opt || m.fstype == "bind";
    if bind {
        let f = flags | libc::MS_BIND;
        sys_mount(Some(&m.source), target, None, f & !libc::MS_RDONLY, None)?;
        if f & libc::MS_RDONLY != 0 {
            sys_mount(
                None,
                target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | (f & !libc::MS_REC),
                None,
            )?;
        }
        return Ok(());
    }
    let data = data.join(",");
    sys_mount(
        Some(&m.source),
        target,
        Some(&m.fstype),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
}

/// Makes `dir` a mount point of its own (a bind of itself) with shared propagation, so that
/// mounts made under it later also appear in mount namespaces cloned from it (virtiofsd's).
pub fn make_shared_mountpoint(dir: &Path) -> io::Result<()> {
    sys_mount(Some(&dir.to_string_lossy()), dir, None, libc::MS_BIND, None)?;
    // A bind of a private mount is private; and a shared peer group of its own is what we want.
    sys_mount(None, dir, None, libc::MS_PRIVATE, None)?;
    sys_mount(None, dir, None, libc::MS_SHARED, None)
}

/// Mount points at or under `dir`, deepest first, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts `target` (lazily if busy); not mounted is fine.
pub fn unmount(target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: a NUL-terminated path; umount2 reads it only.
    let rc = unsafe { libc::umount2(t.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        Some(libc::EBUSY) => {
            // SAFETY: as above.
            let rc = unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        _ => Err(e),
    }
}

/// Unmounts every mount at or under `dir`, deepest first (each stacked mount too).
pub fn unmount_all_under(dir: &Path) {
    for _ in 0..8 {
        let list = mounts_under(dir);
        if list.is_empty() {
            return;
        }
        for m in list {
            if let Err(e) = unmount(&m) {
                tracing::warn!(mount = %m.display(), "cannot unmount: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d, bind) = parse_options(&opts(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l1:/l2",
            "ro",
            "nosuid",
        ]));
        assert_eq!(f, libc::MS_RDONLY | libc::MS_NOSUID);
        assert_eq!(
            d,
            opts(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"])
        );
        assert!(!bind);
        let (f, d, bind) = parse_options(&opts(&["rbind", "ro", "rw", "rprivate"]));
        assert_eq!(f, libc::MS_BIND | libc::MS_REC);
        assert!(d.is_empty() && bind);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }

    #[test]
    fn mounts_under_a_fresh_dir_are_none() {
        let d = tempfile::tempdir().unwrap();
        assert!(mounts_under(d.path()).is_empty());
        assert_eq!(
            mounts_under(Path::new("/")).last(),
            Some(&PathBuf::from("/"))
        );
    }
}
