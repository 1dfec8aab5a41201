//! Test doubles for code that talks to an agent (feature `test-utils`; always on in this crate's
//! own tests): a fake VMM hybrid-vsock socket, a fake agent, and a self-removing temp dir.
//!
//! [`FakeHybridVsock`] plays the VMM's side of the handshake described in [`crate::client`]: it reads
//! `CONNECT <port>\n` (case-insensitive, like Firecracker's muxer), and for the one guest port it
//! knows connects to a Unix socket standing for the guest's listener, answers `OK <n>\n` (`n` counting
//! up from 2^30, the host-side ports the VMM assigns) and proxies bytes both ways. For any other port,
//! a malformed request or an unreachable backend it closes the connection without a reply, which is
//! what the VMM does when the guest resets the stream.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use ttrpc::r#async::TtrpcContext;

use crate::agent::{self, check_response::ServingStatus};
use crate::agent_ttrpc::{create_agent_service, AgentService};

/// The first host-side port a hybrid-vsock VMM hands out.
pub const FIRST_HOST_PORT: u32 = 1 << 30;

/// A directory under the system temp dir, removed with everything in it on drop. Paths stay short
/// (Unix socket paths are limited to 107 bytes).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `<tmp>/hull-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hull-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake VMM hybrid-vsock socket (see the module docs). Stops and removes its socket on drop.
#[derive(Debug)]
pub struct FakeHybridVsock {
    path: PathBuf,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FakeHybridVsock {
    /// Listens on `uds`; `CONNECT <port>` reaches the Unix socket `backend`. Needs a tokio runtime.
    pub fn start(uds: &Path, port: u32, backend: &Path) -> io::Result<Self> {
        let listener = UnixListener::bind(uds)?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let next_port = Arc::new(AtomicU32::new(FIRST_HOST_PORT));
        let backend = backend.to_owned();
        let task = {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let backend = backend.clone();
                    let next_port = next_port.clone();
                    tokio::spawn(async move {
                        let _ = proxy(conn, port, &backend, &next_port).await;
                    });
                }
            })
        };
        Ok(Self {
            path: uds.to_owned(),
            accepted,
            task,
        })
    }

    /// The socket a client connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FakeHybridVsock {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One hybrid-vsock connection: handshake, then bytes both ways until either side closes.
async fn proxy(
    mut conn: UnixStream,
    port: u32,
    backend: &Path,
    next_port: &AtomicU32,
) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        let b = conn.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > 64 {
            return Ok(());
        }
    }
    let line = String::from_utf8_lossy(&line);
    let asked = line
        .split_once(' ')
        .filter(|(verb, _)| verb.eq_ignore_ascii_case("connect"))
        .and_then(|(_, p)| p.trim().parse::<u32>().ok());
    if asked != Some(port) {
        return Ok(()); // like a guest reset: close without a reply
    }
    let Ok(mut guest) = UnixStream::connect(backend).await else {
        return Ok(());
    };
    let host_port = next_port.fetch_add(1, Ordering::Relaxed);
    conn.write_all(format!("OK {host_port}\n").as_bytes())
        .await?;
    tokio::io::copy_bidirectional(&mut conn, &mut guest).await?;
    Ok(())
}

/// What a [`FakeAgent`] was asked to do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeAgentLog {
    /// `SetGuestTime` requests: (seconds, nanos).
    pub times_set: Vec<(i64, u32)>,
    /// How many `DestroySandbox` calls.
    pub destroys: usize,
    /// Calls by method name.
    pub calls: HashMap<&'static str, usize>,
}

/// An in-process agent on a Unix socket that answers every RPC with fixed values and records what
/// it was asked. `api_version` lets a test play an agent from another API version.
pub struct FakeAgent {
    server: ttrpc::r#async::Server,
    path: PathBuf,
    log: Arc<Mutex<FakeAgentLog>>,
}

impl std::fmt::Debug for FakeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAgent")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The values a [`FakeAgent`] reports.
pub mod fake_values {
    /// `GuestDetails.kernel_release`.
    pub const KERNEL_RELEASE: &str = "6.1.0-fake-amd64";
    /// `GuestDetails.mem_total_kib`.
    pub const MEM_TOTAL_KIB: u64 = 491_520;
    /// `GuestDetails.online_cpus`.
    pub const ONLINE_CPUS: u32 = 2;
    /// `agent_version` everywhere.
    pub const AGENT_VERSION: &str = "0.0.0-fake";
}

struct FakeService {
    api_version: u32,
    log: Arc<Mutex<FakeAgentLog>>,
}

impl FakeService {
    fn record(&self, method: &'static str) {
        *self
            .log
            .lock()
            .expect("lock")
            .calls
            .entry(method)
            .or_default() += 1;
    }
}

#[async_trait]
impl AgentService for FakeService {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _: agent::CheckRequest,
    ) -> ttrpc::Result<agent::CheckResponse> {
        self.record("Check");
        Ok(agent::CheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _: agent::VersionRequest,
    ) -> ttrpc::Result<agent::VersionResponse> {
        self.record("Version");
        Ok(agent::VersionResponse {
            agent_version: fake_values::AGENT_VERSION.into(),
            api_version: self.api_version,
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _: agent::GetGuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetails> {
        self.record("GetGuestDetails");
        Ok(agent::GuestDetails {
            kernel_release: fake_values::KERNEL_RELEASE.into(),
            mem_total_kib: fake_values::MEM_TOTAL_KIB,
            online_cpus: fake_values::ONLINE_CPUS,
            agent_version: fake_values::AGENT_VERSION.into(),
            uptime_ms: 1,
            ..Default::default()
        })
    }

    async fn set_guest_time(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetGuestTimeRequest,
    ) -> ttrpc::Result<agent::SetGuestTimeResponse> {
        self.record("SetGuestTime");
        self.log
            .lock()
            .expect("lock")
            .times_set
            .push((req.seconds, req.nanos));
        Ok(agent::SetGuestTimeResponse::new())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<agent::DestroySandboxResponse> {
        self.record("DestroySandbox");
        self.log.lock().expect("lock").destroys += 1;
        Ok(agent::DestroySandboxResponse::new())
    }
}

impl FakeAgent {
    /// Serves on the Unix socket `path`. Needs a tokio runtime.
    pub async fn start(path: &Path, api_version: u32) -> ttrpc::Result<Self> {
        let log = Arc::new(Mutex::new(FakeAgentLog::default()));
        let service = Arc::new(FakeService {
            api_version,
            log: log.clone(),
        });
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", path.display()))?
            .register_service(create_agent_service(service));
        server.start().await?;
        Ok(Self {
            server,
            path: path.to_owned(),
            log,
        })
    }

    /// Its socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What it was asked so far.
    pub fn log(&self) -> FakeAgentLog {
        self.log.lock().expect("lock").clone()
    }

    /// Stops listening, closes the connections and removes the socket.
    pub async fn stop(mut self) {
        let _ = self.server.shutdown().await;
        let _ = std::fs::remove_file(&self.path);
    }
}
