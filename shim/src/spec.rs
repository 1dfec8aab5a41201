//! The container's OCI spec, from containerd's bundle to what the agent gets: where the rootfs
//! and bind-mounted volumes are in the guest, which namespaces make sense inside the VM, and
//! what CRI's annotations say about the pod.
//!
//! The spec is handled as JSON so that every field the shim does not touch reaches the agent
//! as containerd wrote it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::sandbox::GUEST_SHARED;

/// CRI's annotation for the role of a container.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming a container's pod sandbox.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What a spec says about the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not from CRI: a container with a VM of its own.
    Standalone,
    /// A pod's sandbox (pause) container: starts the pod's VM.
    Sandbox,
    /// A container of pod `sandbox_id`: joins its VM.
    PodContainer {
        /// The sandbox container's id.
        sandbox_id: String,
    },
}

/// The spec could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// config.json could not be read or parsed.
    #[error("cannot read the OCI spec {path}: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Something in it cannot be honoured.
    #[error("the OCI spec of {id}: {why}")]
    Unsupported {
        /// The container.
        id: String,
        /// What and why.
        why: String,
    },
}

/// Reads `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Value, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| SpecError::Read {
        path: path.clone(),
        why: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| SpecError::Read {
        path,
        why: e.to_string(),
    })
}

/// The spec's annotations.
pub fn annotations(spec: &Value) -> BTreeMap<String, String> {
    spec["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The container's role in its pod, from CRI's annotations.
pub fn role(annotations: &BTreeMap<String, String>) -> Role {
    match annotations.get(CONTAINER_TYPE).map(String::as_str) {
        Some("sandbox") => Role::Sandbox,
        Some("container") => match annotations.get(SANDBOX_ID) {
            Some(s) if !s.is_empty() => Role::PodContainer {
                sandbox_id: s.clone(),
            },
            _ => Role::Standalone,
        },
        _ => Role::Standalone,
    }
}

/// For a standalone container, its own limits in CRI's pod-limit annotations
/// (`sandbox-cpu-quota`/`-period`, `sandbox-memory`), so the VM is sized to hold them the same
/// way a pod's is; added to `annotations` unless they are set already.
pub fn limits_as_pod_annotations(spec: &Value, annotations: &mut BTreeMap<String, String>) {
    let r = &spec["linux"]["resources"];
    let mut put = |k: &str, v: Option<i64>| {
        if let Some(v) = v.filter(|&v| v > 0) {
            annotations
                .entry(k.to_string())
                .or_insert_with(|| v.to_string());
        }
    };
    put(
        "io.kubernetes.cri.sandbox-cpu-quota",
        r["cpu"]["quota"].as_i64(),
    );
    put(
        "io.kubernetes.cri.sandbox-cpu-period",
        r["cpu"]["period"].as_i64(),
    );
    put(
        "io.kubernetes.cri.sandbox-memory",
        r["memory"]["limit"].as_i64(),
    );
}

/// A host path to bind into the share before the container is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host source.
    pub source: PathBuf,
    /// Relative to the sandbox's shared directory.
    pub shared_rel: PathBuf,
    /// Read-only.
    pub readonly: bool,
}

/// The guest path of container `cid`'s rootfs.
pub fn guest_rootfs(cid: &str) -> String {
    format!("{GUEST_SHARED}/{cid}/rootfs")
}

/// Rewrites `spec` for the guest, in place, and returns the host paths the shim must bind into
/// the share (relative destinations under `<shared>/<cid>/mounts/`):
/// - `root.path` is the rootfs in the share;
/// - each bind mount's source becomes its copy in the share (without a share: an error);
/// - the network namespace is dropped (the VM is the pod's network boundary), and namespace
///   `path`s (host `/proc/<pid>/ns/...`) are dropped: they mean nothing in the guest;
/// - hooks are dropped: they are host programs.
pub fn for_guest(spec: &mut Value, cid: &str, shared: bool) -> Result<Vec<HostBind>, SpecError> {
    spec["root"]["path"] = json!(guest_rootfs(cid));
    let mut binds = Vec::new();
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        for (i, m) in mounts.iter_mut().enumerate() {
            let opts: Vec<String> = m["options"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            let is_bind = m["type"].as_str() == Some("bind")
                || opts.iter().any(|o| o == "bind" || o == "rbind");
            if !is_bind {
                continue;
            }
            let source = m["source"].as_str().unwrap_or_default().to_string();
            if !source.starts_with('/') {
                return Err(SpecError::Unsupported {
                    id: cid.into(),
                    why: format!("bind mount source {source:?} is not an absolute host path"),
                });
            }
            if !shared {
                return Err(SpecError::Unsupported {
                    id: cid.into(),
                    why: format!(
                        "bind mount of {source} needs a shared file system (shared_fs.mode is none)"
                    ),
                });
            }
            let rel = PathBuf::from(cid).join("mounts").join(i.to_string());
            m["source"] = json!(format!("{GUEST_SHARED}/{}", rel.display()));
            binds.push(HostBind {
                source: PathBuf::from(source),
                shared_rel: rel,
                readonly: opts.iter().any(|o| o == "ro"),
            });
        }
    }
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"].as_str() != Some("network"));
        for n in ns.iter_mut() {
            if let Some(o) = n.as_object_mut() {
                o.remove("path");
            }
        }
    }
    if let Some(o) = spec.as_object_mut() {
        o.remove("hooks");
    }
    Ok(binds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts",
                 "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "none", "source": "/srv/data",
                 "options": ["rbind", "rw"]}
            ],
            "hooks": {"prestart": [{"path": "/usr/bin/true"}]},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"},
                               {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "mount"}],
                "cgroupsPath": "/default/c1"
            },
            "annotations": {"io.kubernetes.cri.container-type": "container",
                            "io.kubernetes.cri.sandbox-id": "pod1", "other": "x"}
        })
    }

    #[test]
    fn the_spec_points_into_the_share() {
        let mut s = sample();
        let binds = for_guest(&mut s, "c1", true).unwrap();
        assert_eq!(s["root"]["path"], "/run/hull/shared/c1/rootfs");
        assert_eq!(s["root"]["readonly"], true);
        assert_eq!(s["mounts"][0]["source"], "proc");
        assert_eq!(s["mounts"][1]["source"], "/run/hull/shared/c1/mounts/1");
        assert_eq!(s["mounts"][2]["source"], "/run/hull/shared/c1/mounts/2");
        assert_eq!(
            binds,
            vec![
                HostBind {
                    source: "/var/lib/c/hosts".into(),
                    shared_rel: "c1/mounts/1".into(),
                    readonly: true
                },
                HostBind {
                    source: "/srv/data".into(),
                    shared_rel: "c1/mounts/2".into(),
                    readonly: false
                },
            ]
        );
        assert_eq!(
            s["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}])
        );
        assert!(s.get("hooks").is_none());
        assert_eq!(s["linux"]["cgroupsPath"], "/default/c1");
    }

    #[test]
    fn binds_without_a_share_are_refused() {
        let e = for_guest(&mut sample(), "c1", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/var/lib/c/hosts") && e.contains("shared"),
            "{e}"
        );
        let mut s = sample();
        s["mounts"][1]["source"] = json!("relative");
        let e = for_guest(&mut s, "c1", true).unwrap_err().to_string();
        assert!(e.contains("relative"), "{e}");
    }

    #[test]
    fn a_standalone_containers_limits_size_its_vm() {
        let spec = json!({"linux": {"resources": {"cpu": {"quota": 150000, "period": 100000},
                                                  "memory": {"limit": 134217728}}}});
        let mut a = BTreeMap::new();
        a.insert(
            "io.kubernetes.cri.sandbox-memory".to_string(),
            "1".to_string(),
        );
        limits_as_pod_annotations(&spec, &mut a);
        assert_eq!(a["io.kubernetes.cri.sandbox-cpu-quota"], "150000");
        assert_eq!(a["io.kubernetes.cri.sandbox-cpu-period"], "100000");
        assert_eq!(
            a["io.kubernetes.cri.sandbox-memory"], "1",
            "set already: kept"
        );
        let mut b = BTreeMap::new();
        limits_as_pod_annotations(
            &json!({"linux": {"resources": {"memory": {"limit": -1}}}}),
            &mut b,
        );
        assert!(b.is_empty());
    }

    #[test]
    fn roles_come_from_cri_annotations() {
        let a = annotations(&sample());
        assert_eq!(
            role(&a),
            Role::PodContainer {
                sandbox_id: "pod1".into()
            }
        );
        let mut a2 = BTreeMap::new();
        assert_eq!(role(&a2), Role::Standalone);
        a2.insert(CONTAINER_TYPE.into(), "sandbox".into());
        assert_eq!(role(&a2), Role::Sandbox);
    }
}
