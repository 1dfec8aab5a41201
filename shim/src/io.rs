//! A process's stdio between containerd and the guest agent: containerd's FIFOs (or a
//! `file://` log, or a `binary://` logging program) on the host side, the agent's
//! ReadStdout/ReadStderr/WriteStdin/CloseStdin streams on the guest side.
//!
//! Nothing is buffered here beyond one chunk: each direction reads one chunk and writes it
//! before reading the next, so back-pressure reaches the container's pipe. The output pumps end
//! at the agent's end of stream, which is how "all output delivered" is known before an exit is
//! reported.

use std::path::PathBuf;
use std::process::Stdio;

use hull_agent_api::agent;
use hull_agent_api::agent_ttrpc::AgentServiceClient;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

/// Bytes per agent read or write.
const CHUNK: u32 = 128 * 1024;

fn rpc() -> ttrpc::context::Context {
    // A read waits for output: no deadline but the agent's own end of stream.
    ttrpc::context::with_timeout(0)
}

/// Where an output stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// Nothing asked for it: the stream is still read, and dropped.
    Discard,
    /// A FIFO (or any file) containerd opened for reading.
    Fifo(PathBuf),
    /// `file:///path`: appended to a file.
    File(PathBuf),
    /// `binary:///path?k=v&…`: a logging program gets the stream on fd 3 (stdout) or 4
    /// (stderr), with `CONTAINER_ID` and `CONTAINER_NAMESPACE` set.
    Binary {
        /// The program.
        path: PathBuf,
        /// Its arguments, from the query string (`k=v` pairs become `k` `v`).
        args: Vec<String>,
    },
}

/// Parses containerd's stdout/stderr field.
pub fn parse_target(s: &str) -> Result<OutputTarget, String> {
    if s.is_empty() {
        return Ok(OutputTarget::Discard);
    }
    if let Some(rest) = s.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(format!("{s}: a file:// log needs an absolute path"));
        }
        return Ok(OutputTarget::File(PathBuf::from(rest)));
    }
    if let Some(rest) = s.strip_prefix("binary://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') {
            return Err(format!("{s}: a binary:// log needs an absolute path"));
        }
        let mut args = Vec::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            args.push(k.to_string());
            if !v.is_empty() {
                args.push(v.to_string());
            }
        }
        return Ok(OutputTarget::Binary {
            path: PathBuf::from(path),
            args,
        });
    }
    if s.contains("://") {
        return Err(format!(
            "{s}: unsupported stdio URI (a FIFO path, file:// or binary:// is)"
        ));
    }
    Ok(OutputTarget::Fifo(PathBuf::from(s)))
}

/// The host side of one output stream.
pub type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// A process's opened outputs: stdout, stderr (none with a terminal), and the `binary://`
/// logging program, reaped once both streams are closed.
pub struct Outputs {
    /// Where stdout goes.
    pub stdout: Sink,
    /// Where stderr goes.
    pub stderr: Option<Sink>,
    /// The logging program.
    pub logger: Option<std::process::Child>,
}

async fn open_one(target: &OutputTarget) -> std::io::Result<Sink> {
    Ok(match target {
        OutputTarget::Discard | OutputTarget::Binary { .. } => Box::new(tokio::io::sink()),
        // Opening a FIFO for writing waits for its reader: containerd has it open already.
        OutputTarget::Fifo(p) => Box::new(tokio::fs::OpenOptions::new().write(true).open(p).await?),
        OutputTarget::File(p) => {
            if let Some(d) = p.parent() {
                tokio::fs::create_dir_all(d).await?;
            }
            Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .await?,
            )
        }
    })
}

fn pipe_sink(fd: std::os::fd::OwnedFd) -> Sink {
    Box::new(tokio::fs::File::from_std(std::fs::File::from(fd)))
}

/// A pipe (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are new and ours.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Starts a `binary://` logger as containerd's shims do: stdout on its fd 3, stderr on fd 4, and
/// fd 5 a pipe it writes to (or closes) once it is ready; returns when it is.
async fn start_logger(
    path: &std::path::Path,
    args: &[String],
    ns: &str,
    id: &str,
) -> std::io::Result<Outputs> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt as _;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let fds: [OwnedFd; 3] = [out_r, err_r, ready_w];
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = std::process::Command::new(path);
    cmd.args(args)
        .env_clear()
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", ns)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: dup2/fcntl are async-signal-safe; the fds stay open until spawn returns. The
    // sources are first moved above 5 so that no dup2 overwrites a source not yet copied.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0i32; 3];
            for (i, &fd) in raw.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high.iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(fds);
    // Ready: a byte, or the end of the pipe.
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut b = [0u8; 1];
        let _ = std::fs::File::from(ready_r).read(&mut b);
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok(Outputs {
        stdout: pipe_sink(out_w),
        stderr: Some(pipe_sink(err_w)),
        logger: Some(child),
    })
}

/// Opens a process's outputs: `stdout` and `stderr` as containerd gave them (`stderr` unused
/// with a terminal). A `binary://` stdout starts its logger and waits until it is ready, as the
/// process must not start before.
pub async fn open_outputs(
    stdout: &OutputTarget,
    stderr: &OutputTarget,
    terminal: bool,
    ns: &str,
    id: &str,
) -> std::io::Result<Outputs> {
    if let OutputTarget::Binary { path, args } = stdout {
        let mut o = start_logger(path, args, ns, id).await?;
        if terminal {
            o.stderr = None;
        }
        return Ok(o);
    }
    Ok(Outputs {
        stdout: open_one(stdout).await?,
        stderr: if terminal {
            None
        } else {
            Some(open_one(stderr).await?)
        },
        logger: None,
    })
}

/// Copies the agent's stdout (or stderr) of `cid`/`exec` to `sink` until the stream ends.
/// Returns the bytes copied.
pub fn pump_output(
    agent: AgentServiceClient,
    cid: String,
    exec: String,
    stderr: bool,
    sink: Sink,
) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut sink = Some(sink);
        let mut total = 0u64;
        loop {
            let mut req = agent::ReadStreamRequest::new();
            req.container_id = cid.clone();
            req.exec_id = exec.clone();
            req.len = CHUNK;
            let res = if stderr {
                agent.read_stderr(rpc(), &req).await
            } else {
                agent.read_stdout(rpc(), &req).await
            };
            let data = match res {
                Ok(r) if !r.data.is_empty() => r.data,
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(%cid, %exec, stderr, "output stream ended: {e:?}");
                    break;
                }
            };
            total += data.len() as u64;
            if let Some(s) = sink.as_mut() {
                if let Err(e) = s.write_all(&data).await {
                    // The reader went away: keep draining so the process is not blocked.
                    tracing::debug!(%cid, %exec, stderr, "output reader gone: {e}");
                    sink = None;
                }
            }
        }
        if let Some(mut s) = sink {
            let _ = s.flush().await;
            let _ = s.shutdown().await;
        }
        total
    })
}

/// Reaps a `binary://` logger once its streams are closed (it ends at their end).
pub fn reap_logger(logger: std::process::Child) {
    tokio::task::spawn_blocking(move || {
        let mut l = logger;
        let _ = l.wait();
    });
}

/// Copies containerd's stdin FIFO to the agent until it ends, then closes the process's stdin.
pub fn pump_stdin(
    agent: AgentServiceClient,
    cid: String,
    exec: String,
    fifo: PathBuf,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Opening for reading waits for containerd's writer.
        match tokio::fs::File::open(&fifo).await {
            Ok(mut f) => {
                let mut buf = vec![0u8; CHUNK as usize];
                loop {
                    let n = match f.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            tracing::debug!(%cid, %exec, "stdin read failed: {e}");
                            break;
                        }
                    };
                    let mut req = agent::WriteStreamRequest::new();
                    req.container_id = cid.clone();
                    req.exec_id = exec.clone();
                    req.data = buf[..n].to_vec();
                    if let Err(e) = write_all(&agent, req).await {
                        tracing::debug!(%cid, %exec, "stdin write to the agent failed: {e:?}");
                        break;
                    }
                }
            }
            Err(e) => tracing::warn!(%cid, %exec, fifo = %fifo.display(), "cannot open stdin: {e}"),
        }
        close_stdin(&agent, &cid, &exec).await;
    })
}

async fn write_all(
    agent: &AgentServiceClient,
    mut req: agent::WriteStreamRequest,
) -> ttrpc::Result<()> {
    while !req.data.is_empty() {
        let n = agent.write_stdin(rpc(), &req).await?.len as usize;
        if n == 0 {
            return Err(ttrpc::Error::Others("the agent took no bytes".into()));
        }
        req.data.drain(..n.min(req.data.len()));
    }
    Ok(())
}

/// CloseStdin; a process that is gone or has no stdin is fine.
pub async fn close_stdin(agent: &AgentServiceClient, cid: &str, exec: &str) {
    let mut req = agent::ProcessRequest::new();
    req.container_id = cid.to_string();
    req.exec_id = exec.to_string();
    if let Err(e) = agent
        .close_stdin(ttrpc::context::with_timeout(30_000_000_000), &req)
        .await
    {
        tracing::debug!(%cid, %exec, "CloseStdin: {e:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_targets_parse() {
        assert_eq!(parse_target("").unwrap(), OutputTarget::Discard);
        assert_eq!(
            parse_target("/run/containerd/fifo/1/c-stdout").unwrap(),
            OutputTarget::Fifo("/run/containerd/fifo/1/c-stdout".into())
        );
        assert_eq!(
            parse_target("file:///var/log/c.log").unwrap(),
            OutputTarget::File("/var/log/c.log".into())
        );
        assert_eq!(
            parse_target("binary:///usr/bin/logger?tag=x&debug").unwrap(),
            OutputTarget::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["tag".into(), "x".into(), "debug".into()]
            }
        );
        for bad in ["file://relative", "binary://rel", "http://x/y"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_file_target_appends() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/log");
        let t = OutputTarget::File(p.clone());
        for chunk in [&b"one\n"[..], b"two\n"] {
            let mut o = open_outputs(&t, &t, false, "ns", "c").await.unwrap();
            o.stdout.write_all(chunk).await.unwrap();
            o.stdout.shutdown().await.unwrap();
        }
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one\ntwo\n");
    }

    #[tokio::test]
    async fn a_binary_logger_gets_both_streams_and_says_ready() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let script = d.path().join("logger.sh");
        // Ready first (fd 5), then both streams, in order.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID $1 $2\" > {0}\n\
                 cat <&3 >> {0}; cat <&4 >> {0}\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let t = parse_target(&format!("binary://{}?tag=x", script.display())).unwrap();
        let mut o = open_outputs(&t, &t, false, "ns1", "c1").await.unwrap();
        o.stdout.write_all(b"to stdout\n").await.unwrap();
        o.stdout.shutdown().await.unwrap();
        let mut e = o.stderr.take().unwrap();
        e.write_all(b"to stderr\n").await.unwrap();
        e.shutdown().await.unwrap();
        drop((o.stdout, e));
        // The logger ends when both streams are closed.
        let st = o.logger.unwrap().wait().unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "ns1/c1 tag x\nto stdout\nto stderr\n"
        );
    }
}
