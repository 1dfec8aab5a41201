//! `start` and `delete`: the two short-lived runs of the shim binary.
//!
//! `start` (cwd = the bundle) finds the sandbox this container belongs to from CRI's annotations
//! (`io.kubernetes.cri.sandbox-id`, else the container itself), and its socket,
//! `<dir of containerd's socket>/s/<sha256 of address/namespace/sandbox>` (for the default
//! containerd, `/run/containerd/s/…`, as runc's shim). If a shim serves there, that is the answer;
//! otherwise it binds the socket, launches the serving shim with the listener as fd 3, in a
//! session of its own and with no pipe of containerd's open, and answers its address. With
//! `[factory] warm_vms` (the configuration as containerd's options on stdin name it), a new
//! default-sized sandbox first tries to claim a warm shim and hands it the listener instead, and
//! the pool is topped up ([`crate::warm`]). Either way it writes the address to
//! `<bundle>/address` (containerd reads it back after a restart).
//!
//! The answer is a plain `unix://` address on stdout and nothing else: every containerd from 1.6
//! to 2.x accepts it, and then speaks task API v2 to the shim (which also serves v3).
//!
//! `delete` runs when the shim died: it stops what is left of the sandbox (by pid files), its
//! mounts and directories, and prints a `DeleteResponse` (protobuf) with status 137.

use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};
use sha2::{Digest, Sha256};

use crate::cli::Args;
use crate::config::{self, Config};
use crate::spec::{self, Role};

/// Longest socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The sandbox the container in `bundle` belongs to.
pub fn group_of(bundle: &Path, id: &str) -> Result<(String, Role)> {
    let s = spec::load(bundle)?;
    let role = spec::role(&spec::annotations(&s));
    let group = match &role {
        Role::PodContainer { sandbox_id } => sandbox_id.clone(),
        _ => id.to_string(),
    };
    Ok((group, role))
}

/// The socket of `group`'s shim.
pub fn socket_path(address: &str, namespace: &str, group: &str) -> PathBuf {
    let address = address.trim_start_matches("unix://");
    let dir = Path::new(address)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/run/containerd"))
        .join("s");
    let hash = Sha256::digest(format!("{address}/{namespace}/{group}").as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(hex)
}

fn write_address(bundle: &Path, address: &str) -> Result<()> {
    let tmp = bundle.join(".address");
    std::fs::write(&tmp, address).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, bundle.join("address"))
        .with_context(|| format!("write {}/address", bundle.display()))
}

/// `start`.
pub fn start(args: &Args) -> Result<()> {
    let bundle = std::env::current_dir().context("the bundle (working directory)")?;
    let (group, role) = group_of(&bundle, &args.id)?;
    let socket = socket_path(&args.address, &args.namespace, &group);
    let sock_str = socket.to_string_lossy().into_owned();
    if sock_str.len() > MAX_SOCKET_PATH {
        bail!(
            "the shim socket path {sock_str} is longer than {MAX_SOCKET_PATH} bytes: put containerd's socket in a shorter directory"
        );
    }
    let address = format!("unix://{sock_str}");
    if UnixStream::connect(&socket).is_ok() {
        // A shim serves this sandbox already: the container joins it.
        write_address(&bundle, &address)?;
        print!("{address}");
        return Ok(());
    }
    if let Role::PodContainer { sandbox_id } = &role {
        bail!("container {} joins sandbox {sandbox_id}, but no shim serves that sandbox (was its sandbox container started with this runtime?)", args.id);
    }
    let dir = socket.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).with_context(|| format!("listen on {sock_str}"))?;
    let fd: OwnedFd = listener.into();
    // Warm sandboxes: claimed only with a configuration that asks for them (a bad one is
    // Create's to report), and for a pod of the default size; every start brings its
    // configuration's pool to what it asks now (`refill`, also when that is none).
    let cfg = start_config();
    if let Some(cfg) = cfg.as_ref().filter(|c| c.factory.warm_vms > 0) {
        let default_size = spec::load(&bundle)
            .ok()
            .and_then(|s| cfg.sizing(&spec::annotations(&s)).ok())
            .is_some_and(|size| size == cfg.default_sizing());
        let req = crate::warm::Adopt {
            id: args.id.clone(),
            sandbox: group.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            publish_binary: args.publish_binary.clone(),
            bundle: bundle.clone(),
            debug: args.debug,
            ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        };
        if let Some(pid) = default_size
            .then(|| crate::warm::claim(cfg, &group, &fd, &req))
            .flatten()
        {
            drop(fd);
            std::fs::write(bundle.join("shim.pid"), pid.to_string()).ok();
            write_address(&bundle, &address)?;
            crate::warm::refill(cfg);
            print!("{address}");
            std::io::stdout().flush()?;
            return Ok(());
        }
    }
    let raw = fd.as_raw_fd();
    let exe = std::env::current_exe().context("find the shim's own binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["-namespace", &args.namespace, "-address", &args.address])
        .args(["-publish-binary", &args.publish_binary, "-id", &args.id]);
    if args.debug {
        cmd.arg("-debug");
    }
    cmd.current_dir(&bundle)
        // containerd reads our output to its end: the daemon must not hold it.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid and dup2 are async-signal-safe; `raw` stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // fd 3 without close-on-exec (dup2 clears it; when raw is 3 already, clear it).
            if raw == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("launch the serving shim")?;
    drop(fd);
    std::fs::write(bundle.join("shim.pid"), child.id().to_string()).ok();
    write_address(&bundle, &address)?;
    if let Some(cfg) = &cfg {
        crate::warm::refill(cfg);
    }
    print!("{address}");
    std::io::stdout().flush()?;
    Ok(())
}

/// The configuration as the serving shim will find it: containerd passes the runtime options
/// (with `ConfigPath`) to `start` on stdin. `None` if it cannot be read.
fn start_config() -> Option<Config> {
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use std::io::{IsTerminal as _, Read as _};
    let mut named = None;
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut bytes = Vec::new();
        if stdin.lock().read_to_end(&mut bytes).is_ok() && !bytes.is_empty() {
            named = Any::parse_from_bytes(&bytes)
                .ok()
                .and_then(|a| crate::service::config_path_option(&a));
        }
    }
    let (path, required) = config::locate(named.as_deref());
    Config::load(&path, required).ok()
}

/// `delete`.
pub fn delete(args: &Args) -> Result<()> {
    let bundle = if args.bundle.is_empty() {
        std::env::current_dir().context("the bundle (working directory)")?
    } else {
        PathBuf::from(&args.bundle)
    };
    let (path, required) = config::locate(None);
    let cfg = Config::load(&path, required).unwrap_or_default();
    let group = group_of(&bundle, &args.id)
        .map(|(g, _)| g)
        .unwrap_or_else(|_| args.id.clone());
    if !crate::sandbox::owned_by(&cfg, &group, &args.namespace) {
        // The same id in another namespace runs there (this one's create was refused).
    } else if group == args.id {
        // The sandbox's own container: the whole sandbox goes.
        crate::sandbox::force_cleanup(&cfg, &group, &args.namespace);
    } else {
        // A container of a pod whose shim died: only its share.
        let dir = crate::sandbox::sandbox_dir(&cfg, &group)
            .join("shared")
            .join(&args.id);
        crate::mount::unmount_all_under(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The dead shim's socket, unless a shim still serves there (a pod's other containers).
    let socket = socket_path(&args.address, &args.namespace, &group);
    if UnixStream::connect(&socket).is_err() {
        let _ = std::fs::remove_file(&socket);
    }
    let mut r = DeleteResponse::new();
    r.exit_status = 128 + libc::SIGKILL as u32;
    r.exited_at = MessageField::some(crate::events::now());
    let bytes = r.write_to_bytes().context("encode the DeleteResponse")?;
    std::io::stdout().write_all(&bytes)?;
    std::io::stdout().flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_live_beside_containerds() {
        let a = socket_path("/run/containerd/containerd.sock", "default", "c1");
        assert!(a.starts_with("/run/containerd/s/"));
        assert_eq!(a.file_name().unwrap().len(), 64);
        assert_eq!(
            a,
            socket_path("unix:///run/containerd/containerd.sock", "default", "c1")
        );
        assert_ne!(
            a,
            socket_path("/run/containerd/containerd.sock", "k8s.io", "c1")
        );
        assert_ne!(
            a,
            socket_path("/run/containerd/containerd.sock", "default", "c2")
        );
        let b = socket_path("/work/x/containerd.sock", "default", "c1");
        assert!(b.starts_with("/work/x/s/"));
    }
}
