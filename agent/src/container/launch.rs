//! The agent's side of a container helper (see [`super::helper`]): start it with the container
//! process's stdio and the control socket on fd 3, send the request, read the answer, and take
//! over the new process: watch its PID with the reaper, then let the helper exit.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use super::helper::{Request, Response, ACK, CONTROL_FD, HELPER_ARG};
use crate::reaper::{Exit, Reaper};

/// Why a helper could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The helper could not be started or spoken to.
    #[error("container helper: {what}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The helper ended without an answer.
    #[error("container helper ended without an answer ({0})")]
    Died(String),
    /// libcontainer failed; its message.
    #[error("{0}")]
    Failed(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> LaunchError {
    move |source| LaunchError::Io { what, source }
}

/// A process a helper made, now the agent's to wait for.
#[derive(Debug)]
pub struct Launched {
    /// Its PID.
    pub pid: i32,
    /// Its end.
    pub exit: oneshot::Receiver<Exit>,
}

/// Runs `request` in a helper whose stdin, stdout and stderr are `stdio` (`None`: /dev/null).
/// Returns the new process, if the request made one.
pub async fn run(
    reaper: &Reaper,
    request: &Request,
    stdio: [Option<OwnedFd>; 3],
) -> Result<Option<Launched>, LaunchError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| io_err("socketpair")(e.into()))?;

    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG);
    let [stdin, stdout, stderr] = stdio;
    cmd.stdin(stdin.map_or_else(Stdio::null, Stdio::from));
    cmd.stdout(stdout.map_or_else(Stdio::null, Stdio::from));
    cmd.stderr(stderr.map_or_else(Stdio::null, Stdio::from));
    let raw = theirs.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and calls only dup2 and fcntl,
    // which are async-signal-safe; `raw` stays open in the parent until after spawn.
    unsafe {
        cmd.pre_exec(move || {
            if raw == CONTROL_FD {
                // dup2 onto itself keeps FD_CLOEXEC: clear it instead.
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, CONTROL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let helper_exit = {
        let mut guard = reaper.lock();
        let child = cmd.spawn().map_err(io_err("spawn /proc/self/exe"))?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        guard.watch(pid)
    };
    drop(cmd); // the child's stdio ends
    drop(theirs);

    let std_stream = std::os::unix::net::UnixStream::from(ours);
    std_stream
        .set_nonblocking(true)
        .map_err(io_err("control socket"))?;
    let stream = tokio::net::UnixStream::from_std(std_stream).map_err(io_err("control socket"))?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|e| io_err("encode")(e.into()))?;
    line.push('\n');
    let mut rd = BufReader::new(rd);
    let mut answer = String::new();
    let sent = wr.write_all(line.as_bytes()).await;
    let n = match sent {
        Ok(()) => rd.read_line(&mut answer).await.unwrap_or(0),
        Err(_) => 0,
    };
    if n == 0 {
        let status = match helper_exit.await {
            Ok(exit) => format!("{exit:?}"),
            Err(_) => "status unknown".to_owned(),
        };
        return Err(LaunchError::Died(status));
    }
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok { pid }) if pid > 0 => {
            let exit = reaper.lock().watch(pid);
            // The helper exits on this (or on our end closing, if the write fails).
            let _ = wr.write_all(ACK.as_bytes()).await;
            Ok(Some(Launched { pid, exit }))
        }
        Ok(Response::Ok { .. }) => Ok(None),
        Ok(Response::Error { message }) => Err(LaunchError::Failed(message)),
        Err(e) => Err(LaunchError::Died(format!(
            "unreadable answer {answer:?}: {e}"
        ))),
    }
}
