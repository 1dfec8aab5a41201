//! Checking what a client sends before anything is built: ids, the OCI runtime spec and process
//! (JSON), the rootfs; and writing the bundle libcontainer reads (`config.json` with the rootfs
//! and cgroups path filled in). Each error says what is wrong with which field.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Spec};

/// The largest spec or process JSON accepted.
pub const MAX_JSON: usize = 1 << 20;

/// The longest id accepted.
pub const MAX_ID: usize = 64;

/// Checks a container or exec id: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 64 bytes (it names
/// directories and cgroups).
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    let ok_first = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > MAX_ID {
        return Err(format!(
            "{what} is {} bytes long (at most {MAX_ID})",
            id.len()
        ));
    }
    if !ok_first || !ok_rest {
        return Err(format!("{what} {id:?}: want [A-Za-z0-9][A-Za-z0-9_.-]*"));
    }
    Ok(())
}

fn check_size(what: &str, json: &str) -> Result<(), String> {
    if json.len() > MAX_JSON {
        return Err(format!(
            "{what} is {} bytes (at most {MAX_JSON})",
            json.len()
        ));
    }
    Ok(())
}

/// Parses and checks a runtime spec; `rootfs` (if not empty) replaces `root.path`. Returns the
/// spec with an absolute, existing rootfs.
pub fn parse_spec(json: &str, rootfs: &str) -> Result<Spec, String> {
    check_size("spec_json", json)?;
    let mut spec: Spec = serde_json::from_str(json)
        .map_err(|e| format!("spec_json is not an OCI runtime spec: {e}"))?;
    let process = spec.process().as_ref().ok_or("spec has no process")?;
    check_process(process)?;
    if spec.linux().is_none() {
        return Err("spec has no linux section".into());
    }
    let root = match (rootfs, spec.root()) {
        ("", Some(r)) => r.path().clone(),
        ("", None) => return Err("no rootfs given and the spec has no root".into()),
        (p, _) => PathBuf::from(p),
    };
    if !root.is_absolute() {
        return Err(format!("rootfs {}: want an absolute path", root.display()));
    }
    if !root.is_dir() {
        return Err(format!("rootfs {}: no such directory", root.display()));
    }
    let mut r = spec.root().clone().unwrap_or_default();
    r.set_path(root);
    spec.set_root(Some(r));
    Ok(spec)
}

/// Parses and checks an OCI process (for exec).
pub fn parse_process(json: &str) -> Result<Process, String> {
    check_size("process_json", json)?;
    let p: Process = serde_json::from_str(json)
        .map_err(|e| format!("process_json is not an OCI process: {e}"))?;
    check_process(&p)?;
    Ok(p)
}

fn check_process(p: &Process) -> Result<(), String> {
    match p.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => Ok(()),
        _ => Err("process.args is empty: nothing to run".into()),
    }
}

/// The cgroups path: the spec's, or `<parent>/<id>`.
pub fn cgroups_path(spec: &mut Spec, parent: &str, id: &str) -> PathBuf {
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    match linux.cgroups_path() {
        Some(p) => p.clone(),
        None => {
            let p = Path::new(parent).join(id);
            linux.set_cgroups_path(Some(p.clone()));
            p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("container_id", "c1").is_ok());
        assert!(check_id("container_id", "a.b_c-9").is_ok());
        assert_eq!(
            check_id("container_id", "").unwrap_err(),
            "container_id is empty"
        );
        assert!(check_id("container_id", "../x")
            .unwrap_err()
            .contains("want [A-Za-z0-9]"));
        assert!(check_id("exec_id", "-x").is_err());
        assert!(check_id("exec_id", &"a".repeat(65))
            .unwrap_err()
            .contains("65 bytes long"));
    }

    #[test]
    fn specs() {
        let dir = std::env::temp_dir();
        let base = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": {}
        });
        let spec = parse_spec(&base.to_string(), dir.to_str().unwrap()).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().path(), &dir);
        assert!(parse_spec(&base.to_string(), "")
            .unwrap_err()
            .contains("want an absolute path"));
        assert!(parse_spec(&base.to_string(), "/nonexistent/rootfs")
            .unwrap_err()
            .contains("no such directory"));
        assert!(parse_spec("{not json", "/")
            .unwrap_err()
            .starts_with("spec_json is not an OCI runtime spec"));
        let mut no_args = base.clone();
        no_args["process"]["args"] = serde_json::json!([]);
        assert!(parse_spec(&no_args.to_string(), "/")
            .unwrap_err()
            .contains("process.args is empty"));
        let huge = " ".repeat(MAX_JSON + 1);
        assert!(parse_spec(&huge, "/").unwrap_err().contains("at most"));

        let mut spec = parse_spec(&base.to_string(), "/").unwrap();
        assert_eq!(
            cgroups_path(&mut spec, "/hull", "c1"),
            PathBuf::from("/hull/c1")
        );
        assert_eq!(
            cgroups_path(&mut spec, "/other", "c1"),
            PathBuf::from("/hull/c1")
        );
    }
}
