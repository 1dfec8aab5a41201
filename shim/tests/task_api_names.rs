//! The shim binary's start handshake and the two names of its Task service, without a VM:
//! `start` prints a plain `unix://` address (what containerd 1.6, 1.7 and 2.x all accept), and on
//! that one socket the service answers as `containerd.task.v2.Task` (containerd 1.6 to 2.x speak
//! it to a shim that answered a plain address) and as `containerd.task.v3.Task` (for a daemon that
//! asks for v3). Shutdown then ends the shim and removes its socket.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::path::Path;
use std::process::Command;

use containerd_shim_protos::api;
use protobuf::Message;

/// Kills the serving shim if the test fails before Shutdown.
struct ShimPid(Option<i32>);

impl Drop for ShimPid {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on the shim this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn try_call(
    client: &ttrpc::Client,
    service: &str,
    method: &str,
    payload: Vec<u8>,
) -> ttrpc::Result<ttrpc::Response> {
    let mut req = ttrpc::Request::new();
    req.service = service.into();
    req.method = method.into();
    req.payload = payload;
    req.timeout_nano = 10_000_000_000;
    client.request(req)
}

fn call(client: &ttrpc::Client, service: &str, method: &str, payload: Vec<u8>) -> ttrpc::Response {
    try_call(client, service, method, payload)
        .unwrap_or_else(|e| panic!("{service}/{method}: {e:?}"))
}

#[test]
fn start_prints_a_plain_address_and_both_task_api_names_answer_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/"},"root":{"path":"rootfs"}}"#,
    )
    .unwrap();
    let containerd = dir.path().join("containerd.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_containerd-shim-kata-v2"))
        .args(["-namespace", "hull-test", "-id", "c1", "-address"])
        .arg(&containerd)
        .arg("start")
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", dir.path().join("containerd.sock.ttrpc"))
        .output()
        .unwrap();
    assert!(out.status.success(), "start: {out:?}");
    let address = String::from_utf8(out.stdout).unwrap();
    let address = address.trim();
    assert!(
        address.starts_with("unix://") && !address.contains('{'),
        "start must print a plain unix:// address, not JSON: {address:?}"
    );
    let pid: i32 = std::fs::read_to_string(bundle.join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut guard = ShimPid(Some(pid));
    assert_eq!(
        std::fs::read_to_string(bundle.join("address"))
            .unwrap()
            .trim(),
        address
    );

    let client = ttrpc::Client::connect(address).unwrap();
    let mut connect = api::ConnectRequest::new();
    connect.id = "c1".into();
    for service in ["containerd.task.v2.Task", "containerd.task.v3.Task"] {
        let resp = call(
            &client,
            service,
            "Connect",
            connect.write_to_bytes().unwrap(),
        );
        assert_eq!(
            resp.status.code.value(),
            ttrpc::Code::OK as i32,
            "{service}: {:?}",
            resp.status
        );
        let r = api::ConnectResponse::parse_from_bytes(&resp.payload).unwrap();
        assert_eq!(
            r.shim_pid, pid as u32,
            "{service}: the serving shim answers"
        );
    }
    // An unknown method is UNIMPLEMENTED, and the shim keeps serving.
    match try_call(
        &client,
        "containerd.task.v2.Task",
        "NoSuchMethod",
        Vec::new(),
    ) {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED, "{s:?}")
        }
        other => panic!("NoSuchMethod: {other:?}"),
    }

    // Shutdown with nothing running ends the shim and takes its socket with it.
    let resp = call(
        &client,
        "containerd.task.v3.Task",
        "Shutdown",
        api::ShutdownRequest::new().write_to_bytes().unwrap(),
    );
    assert_eq!(resp.status.code.value(), ttrpc::Code::OK as i32);
    drop(client);
    let path = address.trim_start_matches("unix://");
    let mut alive = hull_agent_api::client::process_alive(pid as u32);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!alive(), "the shim still runs after Shutdown");
    guard.0 = None;
    assert!(
        !Path::new(path).exists(),
        "the shim's socket is left: {path}"
    );
}
