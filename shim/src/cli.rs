//! The shim's command line, as containerd writes it: Go-style flags (`-namespace ns`,
//! `-id=x`, `--debug`), then an optional action (`start`, `delete`).

/// What containerd asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Find or launch the shim; print its address.
    Start,
    /// Clean up after a dead shim; print a DeleteResponse.
    Delete,
    /// Be the shim.
    Serve,
    /// `-v`: print the version.
    Version,
    /// `warm`: boot a sandbox ahead of need and wait for a pod's `start` to claim it
    /// ([`crate::warm`]); launched by `start`, not by containerd.
    Warm,
    /// `drain-warm`: stop every warm sandbox (an operator's or a test's command).
    DrainWarm,
}

/// Parsed arguments.
#[derive(Debug, Clone)]
pub struct Args {
    /// `-namespace`.
    pub namespace: String,
    /// `-address`: containerd's gRPC socket.
    pub address: String,
    /// `-publish-binary`: containerd's binary (events via `containerd publish`).
    pub publish_binary: String,
    /// `-id`: the container (task) id.
    pub id: String,
    /// `-bundle` (delete only; else the working directory is the bundle).
    pub bundle: String,
    /// `-debug`.
    pub debug: bool,
    /// The action.
    pub action: Action,
}

/// Parses `args` (without the program name).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        namespace: String::new(),
        address: String::new(),
        publish_binary: String::new(),
        id: String::new(),
        bundle: String::new(),
        debug: false,
        action: Action::Serve,
    };
    let mut it = args.into_iter();
    let mut action = None;
    while let Some(arg) = it.next() {
        if let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            let value = |it: &mut dyn Iterator<Item = String>| -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| format!("-{name} needs a value"))
            };
            match name {
                "namespace" => a.namespace = value(&mut it)?,
                "address" => a.address = value(&mut it)?,
                "publish-binary" => a.publish_binary = value(&mut it)?,
                "id" => a.id = value(&mut it)?,
                "bundle" => a.bundle = value(&mut it)?,
                "debug" => a.debug = inline.as_deref() != Some("false"),
                "v" | "version" => action = Some(Action::Version),
                // Flags other containerd versions pass that the shim does not need.
                "socket" | "ttrpc-address" | "systemd-cgroup" | "criu" => {
                    let _ = value(&mut it);
                }
                other => return Err(format!("unknown flag -{other}")),
            }
            continue;
        }
        match arg.as_str() {
            "start" => action = Some(Action::Start),
            "delete" => action = Some(Action::Delete),
            "warm" => action = Some(Action::Warm),
            "drain-warm" => action = Some(Action::DrainWarm),
            other => {
                return Err(format!(
                    "unknown action {other:?} (start, delete, warm or drain-warm)"
                ))
            }
        }
    }
    a.action = action.unwrap_or(Action::Serve);
    if !matches!(a.action, Action::Version | Action::DrainWarm) {
        if a.id.is_empty() {
            return Err("-id is required".into());
        }
        if a.namespace.is_empty() && a.action != Action::Warm {
            return Err("-namespace is required".into());
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn containerd_start_line() {
        let a = p(&[
            "-namespace",
            "default",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "c1",
            "-debug",
            "start",
        ])
        .unwrap();
        assert_eq!(a.action, Action::Start);
        assert_eq!((a.namespace.as_str(), a.id.as_str()), ("default", "c1"));
        assert_eq!(a.address, "/run/containerd/containerd.sock");
        assert!(a.debug);
    }

    #[test]
    fn other_spellings_and_actions() {
        let a = p(&["--namespace=k8s.io", "-id=c2", "-bundle", "/b", "delete"]).unwrap();
        assert_eq!((a.action, a.bundle.as_str()), (Action::Delete, "/b"));
        let a = p(&["-namespace", "n", "-id", "x"]).unwrap();
        assert_eq!(a.action, Action::Serve);
        assert_eq!(p(&["-v"]).unwrap().action, Action::Version);
        assert_eq!(p(&["drain-warm"]).unwrap().action, Action::DrainWarm);
        let a = p(&["-id", ".boot-k-1", "warm"]).unwrap();
        assert_eq!((a.action, a.id.as_str()), (Action::Warm, ".boot-k-1"));
        assert!(p(&["warm"]).unwrap_err().contains("-id"));
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(p(&["-namespace", "n", "start"])
            .unwrap_err()
            .contains("-id"));
        assert!(p(&["-id", "x", "-namespace"])
            .unwrap_err()
            .contains("value"));
        assert!(p(&["-id", "x", "-namespace", "n", "-bogus", "1"])
            .unwrap_err()
            .contains("bogus"));
        assert!(p(&["-id", "x", "-namespace", "n", "run"])
            .unwrap_err()
            .contains("run"));
    }
}
