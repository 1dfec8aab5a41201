//! The host side: reaching an agent and calling it.
//!
//! # Transports
//!
//! - [`Target::HybridVsock`]: the agent in a guest, through the VMM's hybrid-vsock Unix socket
//!   (Firecracker's scheme). The host connects to the socket and writes `CONNECT <port>\n`; the
//!   VMM opens a vsock stream to that guest port and answers `OK <n>\n`, `n` being the host-side
//!   port it assigned. From then on the Unix stream carries the guest stream's bytes, here ttrpc.
//!   If nothing listens on the guest port yet, the guest resets the stream and the VMM closes the
//!   Unix socket before (or instead of) answering: that is "not ready yet", not an error.
//! - [`Target::Unix`]: a host-mode agent (`hull-agent --listen unix:<path>`), for tests.
//!
//! # Connecting
//!
//! [`connect`] (and [`connect_watching`]) retry with a short backoff (10 ms doubling to 200 ms)
//! until the agent answers `Check` with `SERVING`, then compare its `Version` with
//! [`API_VERSION`]. They give up with a distinct [`ClientError`] for each way it can end: the VM
//! died (the caller's liveness check said so: no more retries), the agent never answered before the
//! deadline (with the last failure), or the other side speaks another protocol (a handshake reply
//! that is not `OK <n>`, another API version): retrying cannot fix that, so it is reported at once.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::agent::{self, check_response::ServingStatus};
use crate::agent_ttrpc::AgentServiceClient;
use crate::API_VERSION;

/// First pause between two attempts; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(2);
/// Longest pause between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(20);
/// How long one attempt (connect, handshake, `Check`, `Version`) may take before it is abandoned
/// and retried on a new connection (always cut to the deadline).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the liveness check runs while an attempt or a pause is under way.
pub const LIVENESS_POLL: Duration = Duration::from_millis(20);
/// The per-call timeout of a new [`AgentClient`].
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest handshake reply line accepted (`OK 4294967295` is 13 bytes).
const MAX_REPLY_LINE: usize = 64;

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A guest's agent, through the VMM's hybrid-vsock Unix socket `uds`, guest port `port`.
    HybridVsock {
        /// The VMM's hybrid-vsock socket on the host.
        uds: PathBuf,
        /// The guest vsock port the agent listens on (usually [`crate::DEFAULT_AGENT_PORT`]).
        port: u32,
    },
    /// A host-mode agent's Unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HybridVsock { uds, port } => {
                write!(f, "hybrid vsock {} port {port}", uds.display())
            }
            Self::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// How the other side's protocol differs from ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The hybrid-vsock socket answered `CONNECT <port>` with something other than `OK <n>`.
    HandshakeReply(String),
    /// The agent speaks another API version.
    ApiVersion {
        /// What the agent reported.
        agent: u32,
        /// [`API_VERSION`].
        client: u32,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HandshakeReply(reply) => write!(
                f,
                "the hybrid-vsock handshake reply is {reply:?}, not \"OK <port>\" \
                 (is this a Hull VMM's vsock socket?)"
            ),
            Self::ApiVersion { agent, client } => write!(
                f,
                "the agent speaks API version {agent}, this client {client}: \
                 rebuild the guest image or the host tools from the same tree"
            ),
        }
    }
}

/// Why connecting to or calling an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The caller's liveness check reported the VM dead: retrying is pointless.
    #[error("{target}: the VM died before the agent answered{}", last_failure(.last))]
    VmDied {
        /// Where we were connecting.
        target: String,
        /// The last failed attempt, if there was one.
        last: Option<String>,
    },
    /// The deadline passed without an answer.
    #[error(
        "{target}: the agent never answered ({attempts} attempts in {} ms); last failure: {last}",
        waited.as_millis()
    )]
    NeverAnswered {
        /// Where we were connecting.
        target: String,
        /// How long we tried.
        waited: Duration,
        /// How many connections were tried.
        attempts: u32,
        /// What the last attempt ran into.
        last: String,
    },
    /// The other side does not speak our protocol.
    #[error("{target}: protocol mismatch: {mismatch}")]
    ProtocolMismatch {
        /// Where we were connecting.
        target: String,
        /// What differs.
        mismatch: Mismatch,
    },
    /// A call failed: an error status from the agent, or a broken connection.
    #[error("{method}: {}", describe(.source))]
    Rpc {
        /// The RPC, e.g. `SetGuestTime`.
        method: &'static str,
        /// What ttrpc reported.
        #[source]
        source: ttrpc::Error,
    },
    /// A call got no reply in time.
    #[error("{method}: no reply within {} ms", after.as_millis())]
    Timeout {
        /// The RPC.
        method: &'static str,
        /// The timeout.
        after: Duration,
    },
}

impl ClientError {
    /// The status code the agent answered with, when this is an error status of an RPC.
    pub fn rpc_code(&self) -> Option<ttrpc::Code> {
        match self {
            Self::Rpc {
                source: ttrpc::Error::RpcStatus(status),
                ..
            } => Some(status.code()),
            _ => None,
        }
    }
}

fn last_failure(last: &Option<String>) -> String {
    last.as_ref()
        .map(|l| format!(" (last failure: {l})"))
        .unwrap_or_default()
}

/// A ttrpc error as one readable line: `CODE: message` for a status.
fn describe(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message),
        other => other.to_string(),
    }
}

/// Connects to the agent at `target`, retrying until it answers or `deadline` passes.
///
/// Same as [`connect_watching`] with a liveness check that always says "alive".
pub async fn connect(target: &Target, deadline: Instant) -> Result<AgentClient, ClientError> {
    connect_watching(target, deadline, || true).await
}

/// Connects to the agent at `target`, retrying until it answers `Check` or `deadline` passes.
///
/// `vm_alive` is asked before each attempt and every [`LIVENESS_POLL`] while one is under way;
/// once it returns false the connect stops with [`ClientError::VmDied`] (e.g. pass a closure that
/// checks the VMM process, or [`process_alive`]). A handshake or API-version mismatch also ends it
/// at once ([`ClientError::ProtocolMismatch`]).
pub async fn connect_watching<F>(
    target: &Target,
    deadline: Instant,
    mut vm_alive: F,
) -> Result<AgentClient, ClientError>
where
    F: FnMut() -> bool + Send,
{
    let start = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    let mut last: Option<String> = None;
    let vm_died = |last: Option<String>| ClientError::VmDied {
        target: target.to_string(),
        last,
    };
    loop {
        if !vm_alive() {
            return Err(vm_died(last));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ClientError::NeverAnswered {
                target: target.to_string(),
                waited: now - start,
                attempts,
                last: last.unwrap_or_else(|| "none: the deadline had already passed".into()),
            });
        }
        let budget = deadline.saturating_duration_since(now).min(ATTEMPT_TIMEOUT);
        attempts += 1;
        let attempt = tokio::time::timeout(budget, attempt(target, budget));
        match watching(attempt, &mut vm_alive).await {
            None => return Err(vm_died(last)),
            Some(Ok(Ok(client))) => return Ok(client.with_timeout(DEFAULT_RPC_TIMEOUT)),
            Some(Ok(Err(Failure::Mismatch(mismatch)))) => {
                return Err(ClientError::ProtocolMismatch {
                    target: target.to_string(),
                    mismatch,
                })
            }
            Some(Ok(Err(Failure::Retry(why)))) => last = Some(why),
            Some(Err(_elapsed)) => {
                last = Some(format!("no answer within {} ms", budget.as_millis()))
            }
        }
        let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if !pause.is_zero()
            && watching(tokio::time::sleep(pause), &mut vm_alive)
                .await
                .is_none()
        {
            return Err(vm_died(last));
        }
    }
}

/// A liveness check for [`connect_watching`]: whether process `pid` (e.g. the VMM) still runs.
/// A zombie (exited, not yet reaped by its parent) counts as dead.
pub fn process_alive(pid: u32) -> impl FnMut() -> bool + Send {
    let stat = format!("/proc/{pid}/stat");
    move || match std::fs::read_to_string(&stat) {
        // The state is the first field after the parenthesised command name.
        Ok(text) => !matches!(
            text.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z" | "X" | "x") | None
        ),
        Err(_) => false,
    }
}

/// What each thread of process `pid` (e.g. hull-vmm) is doing, for a report on a guest that
/// stopped answering: `name state cpu=seconds wchan=…` per thread, `; `-separated. A vCPU thread
/// that is `R` and gains CPU time runs guest code (a guest spinning); one that sleeps in
/// `kvm_vcpu_block` is halted with no interrupt coming (a lost wakeup). Empty if `pid` is gone.
pub fn thread_states(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let mut lines: Vec<(u64, String)> = tasks
        .flatten()
        .filter_map(|t| {
            let tid: u64 = t.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            Some((tid, describe_thread(&stat, &wchan)?))
        })
        .collect();
    lines.sort();
    lines
        .into_iter()
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One thread from its `/proc/…/task/TID/stat` and `wchan` texts.
fn describe_thread(stat: &str, wchan: &str) -> Option<String> {
    // "TID (comm) S ppid … utime stime …": the name may hold spaces and parentheses.
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?;
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name; in clock ticks
    // (USER_HZ, 100 on Linux).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let wchan = match wchan.trim() {
        "" | "0" => "-",
        w => w,
    };
    Some(format!(
        "{name} {state} cpu={}.{:02}s wchan={wchan}",
        ticks / 100,
        ticks % 100
    ))
}

/// Runs `fut`, polling `vm_alive` every [`LIVENESS_POLL`]; `None` when the VM died first.
async fn watching<T, F: FnMut() -> bool>(
    fut: impl Future<Output = T>,
    vm_alive: &mut F,
) -> Option<T> {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(LIVENESS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset(); // the caller has just checked
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = tick.tick() => {
                if !vm_alive() {
                    return None;
                }
            }
        }
    }
}

/// How one attempt failed.
#[derive(Debug)]
enum Failure {
    /// Not there (yet): try again.
    Retry(String),
    /// Another protocol: give up.
    Mismatch(Mismatch),
}

/// One connection: connect, handshake, `Check`, `Version`.
async fn attempt(target: &Target, rpc_timeout: Duration) -> Result<AgentClient, Failure> {
    let stream = match target {
        Target::Unix(path) => UnixStream::connect(path)
            .await
            .map_err(|e| Failure::Retry(format!("connect {}: {e}", path.display())))?,
        Target::HybridVsock { uds, port } => {
            let mut stream = UnixStream::connect(uds)
                .await
                .map_err(|e| Failure::Retry(format!("connect {}: {e}", uds.display())))?;
            hybrid_handshake(&mut stream, *port).await?;
            stream
        }
    };
    let client =
        AgentClient::new(ttrpc::r#async::Client::new(stream.into())).with_timeout(rpc_timeout);
    match client.check().await {
        Ok(ServingStatus::SERVING) => {}
        Ok(status) => return Err(Failure::Retry(format!("Check: the agent is {status:?}"))),
        Err(e) => return Err(Failure::Retry(e.to_string())),
    }
    let version = client
        .version()
        .await
        .map_err(|e| Failure::Retry(e.to_string()))?;
    if version.api_version != API_VERSION {
        return Err(Failure::Mismatch(Mismatch::ApiVersion {
            agent: version.api_version,
            client: API_VERSION,
        }));
    }
    Ok(client)
}

/// The client half of the hybrid-vsock handshake: writes `CONNECT <port>\n`, reads `OK <n>\n`
/// (byte by byte, so not one byte of the stream that follows is consumed) and returns `n`.
async fn hybrid_handshake<S>(stream: &mut S, port: u32) -> Result<u32, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| Failure::Retry(format!("hybrid vsock: write CONNECT {port}: {e}")))?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| Failure::Retry(format!("hybrid vsock: read the CONNECT reply: {e}")))?;
        if n == 0 {
            let text = String::from_utf8_lossy(&line).into_owned();
            return Err(if could_be_reply(&text) {
                Failure::Retry(format!(
                    "hybrid vsock: the VMM closed the connection (nothing listens on guest \
                     port {port} yet?){}",
                    if text.is_empty() {
                        String::new()
                    } else {
                        format!(" after {text:?}")
                    }
                ))
            } else {
                Failure::Mismatch(Mismatch::HandshakeReply(text))
            });
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY_LINE {
            let text = String::from_utf8_lossy(&line).into_owned();
            return Err(Failure::Mismatch(Mismatch::HandshakeReply(text + "…")));
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    parse_reply(&text).ok_or(Failure::Mismatch(Mismatch::HandshakeReply(text)))
}

/// `OK <n>` → `n`.
fn parse_reply(line: &str) -> Option<u32> {
    let n = line.strip_prefix("OK ")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Whether `partial` is the start of some `OK <n>` line.
fn could_be_reply(partial: &str) -> bool {
    let full = "OK ";
    if partial.len() <= full.len() {
        return full.starts_with(partial);
    }
    partial.starts_with(full) && partial[full.len()..].bytes().all(|b| b.is_ascii_digit())
}

/// A connected agent: the generated [`AgentServiceClient`] with typed calls and a timeout on each.
///
/// Cheap to clone (clones share the connection) and usable from many tasks at once.
#[derive(Clone)]
pub struct AgentClient {
    inner: AgentServiceClient,
    timeout: Duration,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Wraps a connected ttrpc client (no check that an agent is behind it: see [`connect`]).
    pub fn new(client: ttrpc::r#async::Client) -> Self {
        Self {
            inner: AgentServiceClient::new(client),
            timeout: DEFAULT_RPC_TIMEOUT,
        }
    }

    /// Sets the timeout of each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The timeout of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The generated client, for calls this wrapper does not have yet.
    pub fn raw(&self) -> &AgentServiceClient {
        &self.inner
    }

    /// `Check`: whether the agent serves.
    pub async fn check(&self) -> Result<ServingStatus, ClientError> {
        let req = agent::CheckRequest::new();
        let resp = self
            .call("Check", |ctx| self.inner.check(ctx, &req))
            .await?;
        Ok(resp.status.enum_value_or_default())
    }

    /// `Version`: the agent's version and API version.
    pub async fn version(&self) -> Result<agent::VersionResponse, ClientError> {
        let req = agent::VersionRequest::new();
        self.call("Version", |ctx| self.inner.version(ctx, &req))
            .await
    }

    /// `GetGuestDetails`: kernel, memory, vCPUs, uptime of the guest.
    pub async fn guest_details(&self) -> Result<agent::GuestDetails, ClientError> {
        let req = agent::GetGuestDetailsRequest::new();
        self.call("GetGuestDetails", |ctx| {
            self.inner.get_guest_details(ctx, &req)
        })
        .await
    }

    /// `SetGuestTime`: sets the guest's wall clock to `time`.
    pub async fn set_guest_time(&self, time: SystemTime) -> Result<(), ClientError> {
        let (seconds, nanos) = to_unix(time);
        let req = agent::SetGuestTimeRequest {
            seconds,
            nanos,
            ..Default::default()
        };
        self.call("SetGuestTime", |ctx| self.inner.set_guest_time(ctx, &req))
            .await
            .map(drop)
    }

    /// `DestroySandbox`: the agent replies, then powers the guest off (a host-mode agent exits).
    pub async fn destroy_sandbox(&self) -> Result<(), ClientError> {
        let req = agent::DestroySandboxRequest::new();
        self.call("DestroySandbox", |ctx| {
            self.inner.destroy_sandbox(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// Runs one call under [`Self::timeout`].
    async fn call<T, Fut>(
        &self,
        method: &'static str,
        call: impl FnOnce(ttrpc::context::Context) -> Fut,
    ) -> Result<T, ClientError>
    where
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        // The timeout is ours (one clock, one error variant), not ttrpc's request deadline.
        match tokio::time::timeout(self.timeout, call(ttrpc::context::Context::default())).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(source)) => Err(ClientError::Rpc { method, source }),
            Err(_) => Err(ClientError::Timeout {
                method,
                after: self.timeout,
            }),
        }
    }
}

/// `time` as seconds and nanoseconds since the epoch, nanoseconds in 0..1e9 (so one second before
/// the epoch plus a quarter is (-1, 250_000_000)).
fn to_unix(time: SystemTime) -> (i64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    }
}

#[cfg(test)]
mod tests;
