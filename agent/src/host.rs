//! Host mode: `hull-agent --listen unix:<path> [--echo unix:<path>]`, a plain process (not PID 1)
//! serving the same ttrpc API on a Unix socket, so that the API, the client and the shim are
//! testable in milliseconds without a VM. Nothing touches the machine: no mounts, no modules, no
//! hostname; `SetGuestTime` is refused; `DestroySandbox` (or SIGTERM / SIGINT) ends the process
//! with status 0 after the reply, removing its sockets.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio::net::UnixListener;
use tokio::signal::unix::SignalKind;

use crate::container;
use crate::error::ServeError;
use crate::reaper::Reaper;
use crate::rpc::{self, Mode, State};
use crate::{echo, log};

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Serve.
    Serve {
        /// `--listen unix:<path>`.
        listen: PathBuf,
        /// `--echo unix:<path>`.
        echo: Option<PathBuf>,
        /// `--state-dir <path>`.
        state_dir: Option<PathBuf>,
        /// `--cgroup-parent <path>`.
        cgroup_parent: Option<String>,
    },
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

/// The usage text.
pub const USAGE: &str = "\
usage: hull-agent --listen unix:<path> [--echo unix:<path>] [--state-dir <dir>]
                  [--cgroup-parent <path>]

Hull's guest agent. As a guest's PID 1 (the initramfs's /init) it takes its settings from the
kernel command line. Run by hand it is in host mode, for tests: it serves the same ttrpc API on
the Unix socket of --listen, and with --echo an echo service on a second one; it never touches
the machine (SetGuestTime is refused) and DestroySandbox, SIGTERM or SIGINT end it (status 0).
Containers work as in the guest (root is needed): their state goes under --state-dir, their
cgroups under --cgroup-parent; at exit the agent removes every container it made.

options:
  --listen unix:<path>   serve the agent API on this Unix socket
  --echo unix:<path>     echo every byte of every connection on this Unix socket
  --state-dir <dir>      container state (default /run/hull-agent/<pid>)
  --cgroup-parent <path> the cgroup containers go under (default /hull-agent-<pid>)
  --version              print the agent's version and API version
  --help                 this text";

/// Parses the arguments (without the program name).
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let (mut listen, mut echo, mut state_dir, mut cgroup_parent) = (None, None, None, None);
    while let Some(arg) = args.next() {
        let arg = arg.into_string().map_err(|a| format!("{a:?}: not UTF-8"))?;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut raw = |name: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .ok_or_else(|| format!("{name}: a value is missing"))?
                    .into_string()
                    .map_err(|a| format!("{name} {a:?}: not UTF-8")),
            }
        };
        let unix = |name: &str, v: String| {
            unix_path(&v).ok_or_else(|| format!("{name} {v}: want unix:<path>"))
        };
        match name.as_str() {
            "--listen" => listen = Some(unix("--listen", raw("--listen")?)?),
            "--echo" => echo = Some(unix("--echo", raw("--echo")?)?),
            "--state-dir" => state_dir = Some(PathBuf::from(raw("--state-dir")?)),
            "--cgroup-parent" => {
                let v = raw("--cgroup-parent")?;
                if !v.starts_with('/') {
                    return Err(format!("--cgroup-parent {v}: want an absolute cgroup path"));
                }
                cgroup_parent = Some(v);
            }
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            other => return Err(format!("{other}: unknown argument")),
        }
    }
    match listen {
        Some(listen) => Ok(Command::Serve {
            listen,
            echo,
            state_dir,
            cgroup_parent,
        }),
        None => Err("--listen unix:<path> is required outside the guest".into()),
    }
}

/// `unix:<path>` or `unix://<path>` → `<path>`.
fn unix_path(addr: &str) -> Option<PathBuf> {
    let rest = addr.strip_prefix("unix:")?;
    let path = rest.strip_prefix("//").unwrap_or(rest);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// The host-mode `main`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    match parse_args(args) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!(
                "hull-agent {} (API version {})",
                crate::rpc::health::AGENT_VERSION,
                hull_agent_api::API_VERSION
            );
            ExitCode::SUCCESS
        }
        Ok(Command::Serve {
            listen,
            echo,
            state_dir,
            cgroup_parent,
        }) => {
            let pid = std::process::id();
            let cfg = container::Config {
                state_dir: state_dir
                    .unwrap_or_else(|| PathBuf::from(format!("/run/hull-agent/{pid}"))),
                cgroup_parent: cgroup_parent.unwrap_or_else(|| format!("/hull-agent-{pid}")),
            };
            match run(&listen, echo.as_deref(), cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hull-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!(
                "hull-agent: {e}\n(this is PID {}; as the guest's init it must be PID 1)\n\n{USAGE}",
                std::process::id()
            );
            ExitCode::from(2)
        }
    }
}

fn run(listen: &Path, echo_path: Option<&Path>, cfg: container::Config) -> Result<(), ServeError> {
    log::init_host();
    let runtime = crate::runtime()?;
    let result = runtime.block_on(serve(listen, echo_path, cfg));
    // Do not wait for tasks still parked on sockets.
    runtime.shutdown_background();
    for path in std::iter::once(listen).chain(echo_path) {
        let _ = std::fs::remove_file(path);
    }
    result
}

async fn serve(
    listen: &Path,
    echo_path: Option<&Path>,
    cfg: container::Config,
) -> Result<(), ServeError> {
    let sig = |signal: &'static str, kind| {
        tokio::signal::unix::signal(kind).map_err(|source| ServeError::Signal { signal, source })
    };
    let mut term = sig("SIGTERM", SignalKind::terminate())?;
    let mut int = sig("SIGINT", SignalKind::interrupt())?;
    let reaper = Reaper::start().map_err(|source| ServeError::Signal {
        signal: "SIGCHLD",
        source,
    })?;
    // Container processes are the children of short-lived helpers: when a helper exits they
    // must come to this process (as they come to PID 1 in the guest), not to the host's init.
    nix::sys::prctl::set_child_subreaper(true).map_err(|errno| ServeError::Containers {
        what: "prctl(PR_SET_CHILD_SUBREAPER)".into(),
        source: errno.into(),
    })?;
    let state_dir = cfg.state_dir.clone();
    let cgroup_parent = cfg.cgroup_parent.clone();
    let containers = container::Containers::new(cfg, reaper)?;

    let (listener, addr) = bind(listen)?;
    let state = State::with_containers(Mode::Host, containers.clone());
    let server = rpc::Server::start(listener.into(), state, &addr).await?;
    if let Some(path) = echo_path {
        let (listener, addr) = bind(path)?;
        tokio::spawn(async move {
            if let Err(e) = echo::serve_unix(listener).await {
                tracing::error!(%addr, error = %e, "echo service stopped");
            }
        });
    }
    tracing::info!(%addr, echo = ?echo_path, "serving (host mode)");

    tokio::select! {
        _ = server.stop_requested() => {}
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    server.shutdown().await;
    containers.remove_all().await;
    container::cgroup::remove_parent(&cgroup_parent);
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

/// Binds a Unix socket at `path`, replacing a stale socket file (one nobody listens on) but not
/// a live one.
fn bind(path: &Path) -> Result<(UnixListener, String), ServeError> {
    let addr = format!("unix:{}", path.display());
    let err = |source| ServeError::Listen {
        addr: addr.clone(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process serves this socket",
                    )))
                }
                Err(_) => {
                    std::fs::remove_file(path).map_err(err)?;
                    UnixListener::bind(path).map_err(err)?
                }
            }
        }
        other => other.map_err(err)?,
    };
    Ok((listener, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse(&["--listen", "unix:/tmp/a.sock"]),
            Ok(Command::Serve {
                listen: "/tmp/a.sock".into(),
                echo: None,
                state_dir: None,
                cgroup_parent: None,
            })
        );
        assert_eq!(
            parse(&["--listen=unix:///tmp/a.sock", "--echo", "unix:rel/e.sock"]),
            Ok(Command::Serve {
                listen: "/tmp/a.sock".into(),
                echo: Some("rel/e.sock".into()),
                state_dir: None,
                cgroup_parent: None,
            })
        );
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(
            parse(&["--listen", "unix:/x", "--version"]),
            Ok(Command::Version)
        );
    }

    #[test]
    fn bad_arguments() {
        assert!(parse(&[])
            .unwrap_err()
            .contains("--listen unix:<path> is required"));
        assert_eq!(
            parse(&["--listen", "/tmp/a.sock"]).unwrap_err(),
            "--listen /tmp/a.sock: want unix:<path>"
        );
        assert_eq!(
            parse(&["--listen"]).unwrap_err(),
            "--listen: a value is missing"
        );
        assert_eq!(
            parse(&["--listen", "unix:"]).unwrap_err(),
            "--listen unix:: want unix:<path>"
        );
        assert_eq!(
            parse(&["--bogus"]).unwrap_err(),
            "--bogus: unknown argument"
        );
    }

    #[tokio::test]
    async fn binding_replaces_only_stale_sockets() {
        let dir = hull_agent_api::testing::TempDir::new("host-bind").unwrap();
        let path = dir.join("a.sock");
        // A stale socket file: bound, then its listener closed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (live, _) = bind(&path).unwrap();
        let e = bind(&path).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("another process serves this socket"),
            "{e}"
        );
        drop(live);
    }
}
