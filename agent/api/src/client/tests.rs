use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::*;
use crate::testing::{fake_values, FakeAgent, FakeHybridVsock, TempDir, FIRST_HOST_PORT};
use crate::DEFAULT_AGENT_PORT;

/// A fake agent on a Unix socket, behind a fake VMM's hybrid-vsock socket, and the target to dial.
async fn agent_behind_hybrid_vsock(name: &str) -> (TempDir, FakeAgent, FakeHybridVsock, Target) {
    let dir = TempDir::new(name).unwrap();
    let agent = FakeAgent::start(&dir.join("agent.sock"), API_VERSION)
        .await
        .unwrap();
    let vmm =
        FakeHybridVsock::start(&dir.join("vsock.sock"), DEFAULT_AGENT_PORT, agent.path()).unwrap();
    let target = Target::HybridVsock {
        uds: vmm.path().to_owned(),
        port: DEFAULT_AGENT_PORT,
    };
    (dir, agent, vmm, target)
}

fn secs(s: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(s)
}

#[test]
fn handshake_reply_lines() {
    assert_eq!(parse_reply("OK 1073741824"), Some(1 << 30));
    assert_eq!(parse_reply("OK 0"), Some(0));
    assert_eq!(parse_reply("OK "), None);
    assert_eq!(parse_reply("OK -1"), None);
    assert_eq!(parse_reply("OK 99999999999"), None);
    assert_eq!(parse_reply("ok 5"), None);
    assert_eq!(parse_reply("OK 5 "), None);
    assert_eq!(parse_reply("HTTP/1.1 400 Bad Request"), None);

    for partial in ["", "O", "OK", "OK ", "OK 12"] {
        assert!(could_be_reply(partial), "{partial:?}");
    }
    for partial in ["X", "OK1", "OK x", "HTTP/1.1"] {
        assert!(!could_be_reply(partial), "{partial:?}");
    }
}

#[test]
fn unix_time_split() {
    let at = |s: u64, n: u32| UNIX_EPOCH + Duration::new(s, n);
    assert_eq!(to_unix(at(0, 0)), (0, 0));
    assert_eq!(to_unix(at(1_700_000_000, 5)), (1_700_000_000, 5));
    assert_eq!(to_unix(UNIX_EPOCH - Duration::new(1, 0)), (-1, 0));
    assert_eq!(
        to_unix(UNIX_EPOCH - Duration::new(0, 750_000_000)),
        (-1, 250_000_000)
    );
    assert_eq!(to_unix(UNIX_EPOCH - Duration::new(2, 1)), (-3, 999_999_999));
}

#[test]
fn errors_say_what_failed() {
    let e = ClientError::ProtocolMismatch {
        target: Target::HybridVsock {
            uds: "/run/v.sock".into(),
            port: 1024,
        }
        .to_string(),
        mismatch: Mismatch::HandshakeReply("NOPE".into()),
    };
    let text = e.to_string();
    assert!(
        text.starts_with("hybrid vsock /run/v.sock port 1024: protocol mismatch"),
        "{text}"
    );
    assert!(text.contains("\"NOPE\""), "{text}");

    let e = ClientError::Rpc {
        method: "SetGuestTime",
        source: ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::FAILED_PRECONDITION,
            "not the guest's PID 1",
        )),
    };
    assert_eq!(
        e.to_string(),
        "SetGuestTime: FAILED_PRECONDITION: not the guest's PID 1"
    );
    assert_eq!(e.rpc_code(), Some(ttrpc::Code::FAILED_PRECONDITION));

    let e = ClientError::VmDied {
        target: "unix socket /x".into(),
        last: None,
    };
    assert_eq!(
        e.to_string(),
        "unix socket /x: the VM died before the agent answered"
    );
    assert_eq!(e.rpc_code(), None);
}

#[tokio::test]
async fn hybrid_handshake_reaches_the_agent() {
    let (_dir, agent, vmm, target) = agent_behind_hybrid_vsock("client-hybrid").await;

    let client = connect(&target, secs(5.0)).await.unwrap();
    assert_eq!(vmm.accepted(), 1);
    assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);
    let v = client.version().await.unwrap();
    assert_eq!(
        (v.api_version, v.agent_version.as_str()),
        (API_VERSION, fake_values::AGENT_VERSION)
    );
    let d = client.guest_details().await.unwrap();
    assert_eq!(d.kernel_release, fake_values::KERNEL_RELEASE);
    assert_eq!(d.online_cpus, fake_values::ONLINE_CPUS);
    let when = UNIX_EPOCH + Duration::new(1_800_000_000, 42);
    client.set_guest_time(when).await.unwrap();
    client.destroy_sandbox().await.unwrap();

    let log = agent.log();
    assert_eq!(log.times_set, [(1_800_000_000, 42)]);
    assert_eq!(log.destroys, 1);
    // connect's own Check and Version, then ours.
    assert_eq!(log.calls["Check"], 2);
    assert_eq!(log.calls["Version"], 2);
    agent.stop().await;
}

#[tokio::test]
async fn the_handshake_consumes_only_its_line() {
    // A server that answers the CONNECT and at once sends more bytes: they must stay in the stream.
    let dir = TempDir::new("client-line").unwrap();
    let listener = UnixListener::bind(dir.join("v.sock")).unwrap();
    tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let mut conn = BufReader::new(conn);
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        assert_eq!(line, "CONNECT 77\n");
        conn.get_mut()
            .write_all(b"OK 1073741825\nnext")
            .await
            .unwrap();
    });
    let mut stream = UnixStream::connect(dir.join("v.sock")).await.unwrap();
    assert_eq!(
        hybrid_handshake(&mut stream, 77).await.unwrap(),
        FIRST_HOST_PORT + 1
    );
    let mut rest = String::new();
    stream.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "next");
}

#[tokio::test]
async fn unix_target_reaches_a_host_mode_agent() {
    let dir = TempDir::new("client-unix").unwrap();
    let agent = FakeAgent::start(&dir.join("agent.sock"), API_VERSION)
        .await
        .unwrap();
    let client = connect(&Target::Unix(agent.path().to_owned()), secs(5.0))
        .await
        .unwrap();
    assert_eq!(client.timeout(), DEFAULT_RPC_TIMEOUT);
    assert_eq!(
        client.guest_details().await.unwrap().mem_total_kib,
        fake_values::MEM_TOTAL_KIB
    );
    agent.stop().await;
}

#[tokio::test]
async fn garbage_reply_is_a_protocol_mismatch() {
    let dir = TempDir::new("client-garbage").unwrap();
    let listener = UnixListener::bind(dir.join("v.sock")).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let mut conn = BufReader::new(conn);
            let mut line = String::new();
            let _ = conn.read_line(&mut line).await;
            let _ = conn
                .get_mut()
                .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .await;
        }
    });
    let target = Target::HybridVsock {
        uds: dir.join("v.sock"),
        port: DEFAULT_AGENT_PORT,
    };
    let t = Instant::now();
    let err = connect(&target, secs(5.0)).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "no retry on a mismatch: {:?}",
        t.elapsed()
    );
    match &err {
        ClientError::ProtocolMismatch {
            mismatch: Mismatch::HandshakeReply(reply),
            ..
        } => assert_eq!(reply, "HTTP/1.1 400 Bad Request\r"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("protocol mismatch"), "{err}");
}

#[tokio::test]
async fn garbage_then_close_is_a_protocol_mismatch_too() {
    let dir = TempDir::new("client-garbage2").unwrap();
    let listener = UnixListener::bind(dir.join("v.sock")).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let mut conn = BufReader::new(conn);
            let mut line = String::new();
            let _ = conn.read_line(&mut line).await;
            let _ = conn.get_mut().write_all(b"ERR").await; // no newline, then close
        }
    });
    let target = Target::HybridVsock {
        uds: dir.join("v.sock"),
        port: DEFAULT_AGENT_PORT,
    };
    let err = connect(&target, secs(5.0)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::ProtocolMismatch { mismatch: Mismatch::HandshakeReply(r), .. } if r == "ERR"),
        "{err:?}"
    );
}

#[tokio::test]
async fn api_version_mismatch() {
    let dir = TempDir::new("client-api").unwrap();
    let agent = FakeAgent::start(&dir.join("agent.sock"), API_VERSION + 1)
        .await
        .unwrap();
    let err = connect(&Target::Unix(agent.path().to_owned()), secs(5.0))
        .await
        .unwrap_err();
    match err {
        ClientError::ProtocolMismatch {
            mismatch: Mismatch::ApiVersion { agent, client },
            ..
        } => assert_eq!((agent, client), (API_VERSION + 1, API_VERSION)),
        other => panic!("{other:?}"),
    }
    agent.stop().await;
}

#[tokio::test]
async fn nothing_there_never_answers() {
    let dir = TempDir::new("client-nothing").unwrap();
    for target in [
        Target::Unix(dir.join("agent.sock")),
        Target::HybridVsock {
            uds: dir.join("vsock.sock"),
            port: DEFAULT_AGENT_PORT,
        },
    ] {
        let t = Instant::now();
        let err = connect(&target, secs(0.3)).await.unwrap_err();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        match &err {
            ClientError::NeverAnswered { attempts, last, .. } => {
                // Pauses of 2, 4, 8, 16, then 20 ms: about 17 attempts in 300 ms (fewer on a
                // loaded machine), never a busy loop.
                assert!((2..=40).contains(attempts), "{attempts}");
                assert!(last.contains("No such file or directory"), "{last}");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("never answered"), "{err}");
    }
}

#[tokio::test]
async fn a_guest_that_is_not_listening_yet_is_retried() {
    // The VMM is up, the guest's agent is not: the VMM closes each connection without a reply.
    let dir = TempDir::new("client-late").unwrap();
    let agent_path = dir.join("agent.sock");
    let vmm =
        FakeHybridVsock::start(&dir.join("vsock.sock"), DEFAULT_AGENT_PORT, &agent_path).unwrap();
    let target = Target::HybridVsock {
        uds: vmm.path().to_owned(),
        port: DEFAULT_AGENT_PORT,
    };
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        FakeAgent::start(&agent_path, API_VERSION).await.unwrap()
    });
    let client = connect(&target, secs(5.0)).await.unwrap();
    assert!(vmm.accepted() > 1, "{}", vmm.accepted());
    assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);
    late.await.unwrap().stop().await;
}

#[tokio::test]
async fn a_dead_vm_stops_at_once() {
    let (_dir, agent, vmm, target) = agent_behind_hybrid_vsock("client-dead").await;
    let t = Instant::now();
    let err = connect_watching(&target, secs(5.0), || false)
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(
        matches!(err, ClientError::VmDied { last: None, .. }),
        "{err:?}"
    );
    assert_eq!(vmm.accepted(), 0, "no attempt once the VM is known dead");
    agent.stop().await;
}

#[tokio::test]
async fn a_vm_dying_while_retrying_stops_the_retries() {
    let dir = TempDir::new("client-dies").unwrap();
    let target = Target::Unix(dir.join("agent.sock"));
    let alive = Arc::new(AtomicBool::new(true));
    let killer = {
        let alive = alive.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            alive.store(false, Ordering::SeqCst);
        })
    };
    let t = Instant::now();
    let err = connect_watching(&target, secs(5.0), || alive.load(Ordering::SeqCst))
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(120) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    match err {
        ClientError::VmDied {
            last: Some(last), ..
        } => {
            assert!(last.contains("No such file or directory"), "{last}")
        }
        other => panic!("{other:?}"),
    }
    killer.await.unwrap();
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // Accepts, never answers: connect gives up at the deadline, a call at its timeout.
    let dir = TempDir::new("client-silent").unwrap();
    let listener = UnixListener::bind(dir.join("agent.sock")).unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                held.lock().unwrap().push(conn);
            }
        });
    }
    let target = Target::Unix(dir.join("agent.sock"));
    let err = connect(&target, secs(0.3)).await.unwrap_err();
    match &err {
        ClientError::NeverAnswered { last, .. } => {
            assert!(
                last.contains("no answer within") || last.contains("Check: no reply"),
                "{last}"
            )
        }
        other => panic!("{other:?}"),
    }

    let stream = UnixStream::connect(dir.join("agent.sock")).await.unwrap();
    let client = AgentClient::new(ttrpc::r#async::Client::new(stream.into()))
        .with_timeout(Duration::from_millis(100));
    let t = Instant::now();
    let err = client.check().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                method: "Check",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(err.to_string(), "Check: no reply within 100 ms");
}

#[test]
fn process_liveness() {
    let mut me = process_alive(std::process::id());
    assert!(me());

    let mut child = std::process::Command::new("true").spawn().unwrap();
    let mut it = process_alive(child.id());
    // Exited but not reaped: a zombie counts as dead.
    let t = Instant::now();
    while it() {
        assert!(t.elapsed() < Duration::from_secs(5), "`true` never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait().unwrap();
    assert!(!it());
}

#[test]
fn thread_reports_read_proc() {
    let stat = "4242 (vcpu 0 (x)) R 1 1 1 0 -1 4194560 10 0 0 0 1234 56 0 0 20 0 3 0 99";
    assert_eq!(
        describe_thread(stat, "0").as_deref(),
        Some("vcpu 0 (x) R cpu=12.90s wchan=-")
    );
    assert_eq!(
        describe_thread(stat, "kvm_vcpu_block\n").as_deref(),
        Some("vcpu 0 (x) R cpu=12.90s wchan=kvm_vcpu_block")
    );
    assert_eq!(describe_thread("garbage", ""), None);

    // This process (other tests' threads come and go): every entry is a thread's.
    let here = thread_states(std::process::id());
    assert!(!here.is_empty());
    for t in here.split("; ") {
        assert!(t.contains(" cpu=") && t.contains(" wchan="), "{here}");
    }
    assert_eq!(thread_states(u32::MAX), "");
}

#[test]
fn connect_futures_are_send() {
    // The shim spawns them on a multi-threaded runtime.
    fn assert_send<T: Send>(_: &T) {}
    let target = Target::Unix("/nonexistent".into());
    let deadline = Instant::now();
    assert_send(&connect(&target, deadline));
    assert_send(&connect_watching(&target, deadline, process_alive(1)));
}

#[test]
fn the_generated_service_has_our_name() {
    struct Nothing;
    impl crate::agent_ttrpc::AgentService for Nothing {}
    let services = crate::agent_ttrpc::create_agent_service(Arc::new(Nothing));
    let methods: std::collections::BTreeSet<&str> = services[crate::SERVICE_NAME]
        .methods
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        methods.into_iter().collect::<Vec<_>>(),
        [
            "Check",
            "CloseStdin",
            "CreateContainer",
            "DestroySandbox",
            "ExecProcess",
            "GetGuestDetails",
            "GetOOMEvent",
            "ListProcesses",
            "MountStorage",
            "PauseContainer",
            "ReadStderr",
            "ReadStdout",
            "RemoveContainer",
            "ResumeContainer",
            "SetGuestTime",
            "SignalProcess",
            "StartContainer",
            "StatsContainer",
            "TtyWinResize",
            "UnmountStorage",
            "UpdateContainer",
            "Version",
            "WaitProcess",
            "WriteStdin"
        ]
    );
}
