//! The real `hull-agent` binary in host mode (`--listen unix:<path>`), driven through the client
//! library: the whole API without a VM.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use hull_agent_api::agent::check_response::ServingStatus;
use hull_agent_api::client::{connect, AgentClient, ClientError, Target};
use hull_agent_api::testing::{FakeHybridVsock, TempDir};
use hull_agent_api::{ttrpc, API_VERSION, DEFAULT_AGENT_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A host-mode agent process; killed on drop if still running.
struct Agent {
    child: Child,
    socket: PathBuf,
    echo: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Agent {
    fn spawn(tag: &str) -> Self {
        let dir = TempDir::new(tag).unwrap();
        let socket = dir.join("agent.sock");
        let echo = dir.join("echo.sock");
        let log = dir.join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_hull-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--echo")
            .arg(format!("unix:{}", echo.display()))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            socket,
            echo,
            log,
            _dir: dir,
        }
    }

    fn target(&self) -> Target {
        Target::Unix(self.socket.clone())
    }

    async fn client(&self) -> AgentClient {
        let deadline = Instant::now() + Duration::from_secs(10);
        connect(&self.target(), deadline)
            .await
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.log()))
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to 10 s for the process to end.
    async fn exit_status(&mut self) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the agent did not exit; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn host_cpus() -> u32 {
    let text = fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    text.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((lo, hi)) => hi.parse::<u32>().unwrap() - lo.parse::<u32>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

fn host_mem_kib() -> u64 {
    let text = fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn host_uptime_ms() -> u64 {
    let text = fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = text.split_whitespace().next().unwrap().parse().unwrap();
    (secs * 1000.0) as u64
}

#[tokio::test]
async fn health_version_and_details() {
    let agent = Agent::spawn("agent-api");
    let client = agent.client().await;
    assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);

    let v = client.version().await.unwrap();
    assert_eq!(v.api_version, API_VERSION);
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));

    let before = host_uptime_ms();
    let d = client.guest_details().await.unwrap();
    let after = host_uptime_ms();
    assert_eq!(d.online_cpus, host_cpus());
    assert_eq!(d.mem_total_kib, host_mem_kib());
    assert_eq!(
        d.kernel_release,
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );
    assert_eq!(d.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(
        (before.saturating_sub(10)..=after + 10).contains(&d.uptime_ms),
        "{before} <= {} <= {after}",
        d.uptime_ms
    );
}

#[tokio::test]
async fn set_guest_time_is_refused_on_a_host() {
    let agent = Agent::spawn("agent-time");
    let client = agent.client().await;
    let err = client
        .set_guest_time(SystemTime::now() + Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert_eq!(
        err.rpc_code(),
        Some(ttrpc::Code::FAILED_PRECONDITION),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(
            "SetGuestTime: FAILED_PRECONDITION: SetGuestTime: this agent is not the guest's PID 1"
        ),
        "{text}"
    );
    assert!(text.contains("the host clock is left alone"), "{text}");

    // A malformed request is reported as such, whatever the mode.
    let req = hull_agent_api::agent::SetGuestTimeRequest {
        seconds: 1,
        nanos: 1_000_000_000,
        ..Default::default()
    };
    let err = client
        .raw()
        .set_guest_time(ttrpc::context::with_timeout(5_000_000_000), &req)
        .await
        .unwrap_err();
    match err {
        ttrpc::Error::RpcStatus(s) => {
            assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT);
            assert!(s.message.contains("nanos 1000000000"), "{}", s.message);
        }
        other => panic!("{other:?}"),
    }
    // Still serving.
    assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);
}

#[tokio::test]
async fn destroy_sandbox_ends_the_process() {
    let mut agent = Agent::spawn("agent-destroy");
    let client = agent.client().await;
    client.destroy_sandbox().await.unwrap();
    let status = agent.exit_status().await;
    assert!(status.success(), "{status}; log:\n{}", agent.log());
    assert!(!agent.socket.exists(), "the socket is left behind");
    assert!(!agent.echo.exists(), "the echo socket is left behind");
    // The connection is closed, not hanging.
    let err = client
        .clone()
        .with_timeout(Duration::from_secs(5))
        .check()
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Rpc { .. }), "{err:?}");
}

#[tokio::test]
async fn sigterm_ends_the_process_cleanly() {
    let mut agent = Agent::spawn("agent-term");
    let _client = agent.client().await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = agent.exit_status().await;
    assert!(status.success(), "{status}; log:\n{}", agent.log());
    assert!(!agent.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_at_once() {
    let agent = Agent::spawn("agent-16");
    let target = agent.target();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                let client = connect(&target, Instant::now() + Duration::from_secs(10))
                    .await
                    .unwrap();
                for _ in 0..20 {
                    assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);
                    assert!(client.guest_details().await.unwrap().online_cpus >= 1);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // And concurrent calls on one connection.
    let client = agent.client().await;
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.version().await.unwrap().api_version })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), API_VERSION);
    }
}

#[tokio::test]
async fn clients_that_vanish_mid_call_leave_it_serving() {
    let mut agent = Agent::spawn("agent-vanish");
    let client = agent.client().await;

    // Half a ttrpc frame header (10 bytes: length, stream id, type, flags), then gone.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    raw.write_all(&[0, 0, 0, 20, 0, 0]).await.unwrap();
    drop(raw);

    // A header that announces a payload that never comes.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    raw.write_all(&[0, 0, 0, 200, 0, 0, 0, 1, 1, 0, 1, 2, 3])
        .await
        .unwrap();
    drop(raw);

    // Garbage.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    raw.write_all(&[0xff; 64]).await.unwrap();
    drop(raw);

    // Whole requests whose callers give up before the reply, connection dropped right after.
    for _ in 0..8 {
        let quitter = agent.client().await;
        let _ = tokio::time::timeout(Duration::from_micros(1), quitter.guest_details()).await;
        drop(quitter);
    }

    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(agent.running(), "log:\n{}", agent.log());
    assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);
    assert_eq!(
        agent.client().await.check().await.unwrap(),
        ServingStatus::SERVING
    );
}

#[tokio::test]
async fn through_a_hybrid_vsock_socket() {
    let agent = Agent::spawn("agent-hybrid");
    let dir = TempDir::new("agent-hybrid-vmm").unwrap();
    let vmm =
        FakeHybridVsock::start(&dir.join("v.sock"), DEFAULT_AGENT_PORT, &agent.socket).unwrap();
    let target = Target::HybridVsock {
        uds: vmm.path().to_owned(),
        port: DEFAULT_AGENT_PORT,
    };
    let client = connect(&target, Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);
    assert_eq!(
        client.guest_details().await.unwrap().mem_total_kib,
        host_mem_kib()
    );
}

async fn echo_roundtrip(path: &Path, len: usize, seed: u8) {
    let stream = UnixStream::connect(path).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(len);
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert!(back == expected, "echo of {len} bytes differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_service() {
    let agent = Agent::spawn("agent-echo");
    let _ = agent.client().await; // up
    echo_roundtrip(&agent.echo, 4 << 20, 0).await;
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let path = agent.echo.clone();
            tokio::spawn(async move { echo_roundtrip(&path, 256 << 10, i).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn without_listen_outside_the_guest_it_explains() {
    let out = Command::new(env!("CARGO_BIN_EXE_hull-agent"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen unix:<path> is required"), "{err}");
    assert!(err.contains("must be PID 1"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_hull-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "hull-agent {} (API version {API_VERSION})",
            env!("CARGO_PKG_VERSION")
        )
    );
}
