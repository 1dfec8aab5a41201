//! The storage RPCs: a virtio-blk disk found by its serial (`/sys/block/<dev>/serial`, which the
//! kernel fills from the device's GET_ID answer) and mounted under [`STORAGE_DIR`].

use std::path::{Path, PathBuf};

use hull_agent_api::agent;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::AgentError;
use crate::rpc::{Mode, State};

/// Where storage is mounted in the guest.
pub const STORAGE_DIR: &str = "/run/hull/storage";

/// Flags mount(8) knows by name; everything else is file-system data.
const FLAGS: &[(&str, MsFlags)] = &[
    ("ro", MsFlags::MS_RDONLY),
    ("nosuid", MsFlags::MS_NOSUID),
    ("nodev", MsFlags::MS_NODEV),
    ("noexec", MsFlags::MS_NOEXEC),
    ("noatime", MsFlags::MS_NOATIME),
    ("nodiratime", MsFlags::MS_NODIRATIME),
    ("relatime", MsFlags::MS_RELATIME),
    ("sync", MsFlags::MS_SYNCHRONOUS),
];

/// Splits mount options into flags and the data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match FLAGS.iter().find(|(n, _)| n == o) {
            Some((_, f)) => flags |= *f,
            None => data.push(o.as_str()),
        }
    }
    (flags, data.join(","))
}

/// The block device whose serial is `serial`, among `/sys/block` (`sys` for tests).
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let mut names: Vec<_> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().find(|name| {
        std::fs::read_to_string(sys_block.join(name).join("serial"))
            .is_ok_and(|s| s.trim_end_matches(['\0', '\n']) == serial)
    })
}

fn check_mount_point(p: &str) -> Result<PathBuf, AgentError> {
    let path = PathBuf::from(p);
    let ok = path.is_absolute()
        && path.starts_with(STORAGE_DIR)
        && path != Path::new(STORAGE_DIR)
        && !path
            .components()
            .any(|c| c == std::path::Component::ParentDir);
    if !ok {
        return Err(AgentError::InvalidArgument(format!(
            "mount_point {p:?}: want an absolute path under {STORAGE_DIR} without '..'"
        )));
    }
    Ok(path)
}

fn guest_only(state: &State) -> Result<(), AgentError> {
    if state.mode() != Mode::Guest {
        return Err(AgentError::FailedPrecondition(
            "storage is mounted only by the guest's agent, not in host mode".into(),
        ));
    }
    Ok(())
}

/// MountStorage.
pub fn mount_storage(
    state: &State,
    r: &agent::MountStorageRequest,
) -> Result<agent::Empty, AgentError> {
    let serial = &r.block_serial;
    if serial.is_empty() || serial.len() > 20 || !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AgentError::InvalidArgument(format!(
            "block_serial {serial:?}: want 1 to 20 printable ASCII characters"
        )));
    }
    if r.fstype.is_empty() || !r.fstype.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(AgentError::InvalidArgument(format!(
            "fstype {:?}",
            r.fstype
        )));
    }
    let target = check_mount_point(&r.mount_point)?;
    guest_only(state)?;
    let dev = find_by_serial(Path::new("/sys/block"), serial).ok_or_else(|| {
        AgentError::NotFound(format!(
            "no virtio-blk disk with serial {serial:?} (is the VM's --drive …,serial={serial} set?)"
        ))
    })?;
    std::fs::create_dir_all(&target)
        .map_err(|e| AgentError::Internal(format!("mkdir {}: {e}", target.display())))?;
    let (mut flags, data) = parse_options(&r.options);
    if r.readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    let source = format!("/dev/{dev}");
    mount(
        Some(source.as_str()),
        &target,
        Some(r.fstype.as_str()),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|errno| {
        AgentError::Failed(format!(
            "mount {source} (serial {serial}) as {} on {}: {errno}",
            r.fstype,
            target.display()
        ))
    })?;
    tracing::info!(%serial, %source, target = %target.display(), "storage mounted");
    Ok(agent::Empty::new())
}

/// UnmountStorage.
pub fn unmount_storage(
    state: &State,
    r: &agent::UnmountStorageRequest,
) -> Result<agent::Empty, AgentError> {
    let target = check_mount_point(&r.mount_point)?;
    guest_only(state)?;
    umount2(&target, MntFlags::empty()).map_err(|errno| AgentError::Sys {
        what: "umount2",
        errno,
    })?;
    let _ = std::fs::remove_dir(&target);
    Ok(agent::Empty::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options(&["noatime".into(), "errors=remount-ro".into(), "ro".into()]);
        assert_eq!(f, MsFlags::MS_NOATIME | MsFlags::MS_RDONLY);
        assert_eq!(d, "errors=remount-ro");
    }

    #[test]
    fn disks_are_found_by_serial_only() {
        let dir = std::env::temp_dir().join(format!("hull-sysblock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, serial) in [("vda", "root-disk\0\0"), ("vdb", "data-1"), ("loop0", "")] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("serial"), serial).unwrap();
        }
        assert_eq!(find_by_serial(&dir, "data-1").as_deref(), Some("vdb"));
        assert_eq!(find_by_serial(&dir, "root-disk").as_deref(), Some("vda"));
        assert_eq!(find_by_serial(&dir, "data"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mount_points_stay_under_the_storage_dir() {
        assert!(check_mount_point("/run/hull/storage/data").is_ok());
        for bad in [
            "/etc",
            "run/hull/storage/x",
            "/run/hull/storage",
            "/run/hull/storage/../x",
        ] {
            assert!(check_mount_point(bad).is_err(), "{bad}");
        }
    }
}
