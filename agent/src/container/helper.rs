//! The container helper: a short-lived, single-threaded re-exec of the agent
//! (`/proc/self/exe __container-helper`) that runs youki's libcontainer for the steps that fork.
//!
//! Why a separate process: libcontainer clones (an intermediate process, then the container's
//! init), and what runs after a clone in a multi-threaded (tokio) process is not async-signal-safe;
//! and libcontainer waits for its own children, which the agent's blanket reaper would steal (see
//! `reaper`). The helper has one thread and no reaper. Kata's agent does the same.
//!
//! Protocol, on the helper's fd 3 (a stream socketpair; the agent owns the other end): the agent
//! writes one JSON [`Request`] line; the helper does it and answers one JSON [`Response`] line.
//! When the answer carries a PID (a container init or an exec'd process, the helper's child until
//! the helper exits), the helper then waits for the agent's `ack` line (or end of file) before it
//! exits: by then the agent watches that PID, and when the helper exits the process is reparented
//! to the agent (PID 1, or a child subreaper on the host), whose reaper gets its status.
//!
//! The helper's stdin, stdout and stderr are the container process's: libcontainer passes them on.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};

/// The first argument that makes the agent a helper.
pub const HELPER_ARG: &str = "__container-helper";

/// The helper's control socket's fd number.
pub const CONTROL_FD: i32 = 3;

/// What the agent asks of a helper.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Build a container from `bundle/config.json`; its init waits to be started.
    Create {
        /// The container id.
        id: String,
        /// libcontainer's state root.
        root: PathBuf,
        /// The bundle (with `config.json`).
        bundle: PathBuf,
        /// Where the agent listens for the pty master (a terminal process).
        console_socket: Option<PathBuf>,
    },
    /// Start a process (the OCI process in `process`) in a running container.
    Exec {
        /// The container id.
        id: String,
        /// libcontainer's state root.
        root: PathBuf,
        /// The OCI process JSON file.
        process: PathBuf,
        /// As in `Create`.
        console_socket: Option<PathBuf>,
    },
    /// Start a created container (runs the spec's poststart hooks).
    Start {
        /// The container id.
        id: String,
        /// libcontainer's state root.
        root: PathBuf,
    },
    /// Delete a container (runs the spec's poststop hooks).
    Delete {
        /// The container id.
        id: String,
        /// libcontainer's state root.
        root: PathBuf,
        /// Kill its processes first.
        force: bool,
    },
}

/// What a helper answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Done; for `Create` and `Exec`, the new process's PID.
    Ok {
        /// The PID (0 when the request makes no process).
        pid: i32,
    },
    /// Failed: the error and its causes, outermost first.
    Error {
        /// The message.
        message: String,
    },
}

/// The line the agent sends once it watches the PID of a `Response::Ok`.
pub const ACK: &str = "ack\n";

/// The helper's `main`: serves one request on fd 3 and exits (0: answered, 1: the control
/// socket is broken).
pub fn main() -> std::process::ExitCode {
    reset_signals();
    // SAFETY: the agent started this process with fd 3 open on the socketpair and nothing else
    // in this process owns it; taking ownership once, here, at the start of main.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let stream = UnixStream::from(control);
    match serve(&stream) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // stderr is the container's: nothing else to tell, the agent sees the closed socket.
            drop(e);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Gives the processes this helper makes the default signal dispositions and an empty signal
/// mask, as runc does. An ignored signal survives exec: Rust's runtime ignores SIGPIPE in the
/// agent and in this helper, and whatever started the agent may have ignored others; a container
/// would inherit them (`yes | head` would never end).
fn reset_signals() {
    /// The kernel's `struct sigaction` on x86_64 (glibc's differs, and glibc refuses to touch
    /// the signals it reserves, 32 and 33, which may still have been ignored by someone).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    for sig in 1..=64i64 {
        if sig == i64::from(libc::SIGKILL) || sig == i64::from(libc::SIGSTOP) {
            continue;
        }
        let mut old = KernelSigaction {
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: rt_sigaction with no new action writes the current one into `old`, a live
        // local of the kernel's layout; the last argument is the size of the kernel's sigset.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                8usize,
            )
        };
        if rc == 0 && old.handler == libc::SIG_IGN {
            let dfl = KernelSigaction {
                handler: libc::SIG_DFL,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            // SAFETY: as above, installing the default disposition from a live local.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                )
            };
        }
    }
    // SAFETY: an empty set, initialised by sigemptyset, installed as the mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn serve(stream: &UnixStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => match run(request) {
            Ok(pid) => Response::Ok { pid },
            Err(message) => Response::Error { message },
        },
        Err(e) => Response::Error {
            message: format!("bad helper request: {e}"),
        },
    };
    let mut out = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    out.push('\n');
    (&*stream).write_all(out.as_bytes())?;
    if let Response::Ok { pid } = response {
        if pid > 0 {
            // Wait for the agent to watch the PID (or to go away).
            line.clear();
            reader.read_line(&mut line)?;
        }
    }
    Ok(())
}

/// The error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

fn run(request: Request) -> Result<i32, String> {
    match request {
        Request::Create {
            id,
            root,
            bundle,
            console_socket,
        } => {
            let container = ContainerBuilder::new(id, SyscallType::default())
                .with_root_path(root)
                .map_err(|e| chain(&e))?
                .with_console_socket(console_socket)
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| chain(&e))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "libcontainer built the container but reports no PID".to_owned())
        }
        Request::Exec {
            id,
            root,
            process,
            console_socket,
        } => ContainerBuilder::new(id, SyscallType::default())
            .with_root_path(root)
            .map_err(|e| chain(&e))?
            .with_console_socket(console_socket)
            .as_tenant()
            .with_detach(true)
            .with_process(Some(process))
            .build()
            .map(|p| p.as_raw())
            .map_err(|e| chain(&e)),
        Request::Start { id, root } => {
            let mut c = Container::load(root.join(&id)).map_err(|e| chain(&e))?;
            c.start().map_err(|e| chain(&e))?;
            Ok(0)
        }
        Request::Delete { id, root, force } => {
            let mut c = Container::load(root.join(&id)).map_err(|e| chain(&e))?;
            if force && c.can_kill() {
                // Best effort: delete(force) kills what is left as well.
                let _ = c.kill(Signal::try_from(9).map_err(|e| chain(&e))?, true);
            }
            c.delete(force).map_err(|e| chain(&e))?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        let r = Request::Exec {
            id: "c1".into(),
            root: "/run/hull/containers".into(),
            process: "/run/hull/exec/c1/e1.json".into(),
            console_socket: None,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.starts_with(r#"{"op":"exec","id":"c1""#), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        let ok = serde_json::to_string(&Response::Ok { pid: 42 }).unwrap();
        assert_eq!(ok, r#"{"ok":{"pid":42}}"#);
    }
}
