//! The guest channel end to end: hull-vmm with a virtio-vsock device, the agent serving ttrpc on
//! vsock port 1024 and the test echo service, reached from the host through hybrid vsock.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hull_agent_api::agent::check_response::ServingStatus;
use hull_agent_api::client::{connect_watching, process_alive, ClientError, Target};
use hull_tests::{hybrid_connect, hybrid_connect_retry, pattern, RunningVm};

const ECHO_PORT: u32 = 5000;
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// Sends `data` on a new echo stream and checks every byte comes back in order.
fn echo_round_trip(uds: &std::path::Path, seed: u64, len: usize) {
    let mut s = hybrid_connect(uds, ECHO_PORT).expect("echo stream");
    let data = pattern(seed, len);
    let mut r = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(len);
    r.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), len, "stream {seed}: length");
    assert!(back == pattern(seed, len), "stream {seed}: bytes differ");
}

#[test]
fn sixty_four_streams_carry_64_mib_through_the_guest_echo() {
    let vm = RunningVm::start("echo", 2, 512, &format!("agent.echo_port={ECHO_PORT}"));
    drop(hybrid_connect_retry(&vm.uds, ECHO_PORT, BOOT_LIMIT));
    let uds = vm.uds.clone();
    let threads: Vec<_> = (0..64u64)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || echo_round_trip(&uds, i, 1 << 20))
        })
        .collect();
    for t in threads {
        t.join().expect("a stream failed");
    }
}

#[test]
fn a_client_killed_mid_stream_leaves_the_vm_serving() {
    let vm = RunningVm::start("killed", 1, 256, &format!("agent.echo_port={ECHO_PORT}"));
    drop(hybrid_connect_retry(&vm.uds, ECHO_PORT, BOOT_LIMIT));
    // A client that sends half a megabyte and vanishes without reading anything back.
    let mut s = hybrid_connect(&vm.uds, ECHO_PORT).unwrap();
    s.write_all(&pattern(1, 512 << 10)).unwrap();
    drop(s);
    // Others carry on, and new streams work.
    for i in 0..4 {
        echo_round_trip(&vm.uds, 100 + i, 256 << 10);
    }
}

#[test]
fn unknown_port_and_handshake_abuse_close_only_that_client() {
    let vm = RunningVm::start("abuse", 1, 256, &format!("agent.echo_port={ECHO_PORT}"));
    drop(hybrid_connect_retry(&vm.uds, ECHO_PORT, BOOT_LIMIT));
    // Nothing listens on 4242 in the guest: the host connection is closed, no OK.
    let err = hybrid_connect(&vm.uds, 4242).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // (bytes, then close our write side?) — an over-long line must be cut on its length alone.
    let abuse: [(&[u8], bool); 5] = [
        (b"", true),
        (b"CONN", true),
        (b"HELLO THERE\n", false),
        (b"CONNECT 12345678901234567890\n", false),
        (&[b'x'; 100], false),
    ];
    for (bytes, half_close) in abuse {
        let mut s = std::os::unix::net::UnixStream::connect(&vm.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = s.write_all(bytes);
        if half_close {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut buf = [0u8; 16];
        // The VMM closes it: EOF (or a reset), never an OK.
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "abusive client {bytes:?} got {:?}", &buf[..n]);
    }
    // A byte-by-byte handshake is fine.
    let mut s = std::os::unix::net::UnixStream::connect(&vm.uds).unwrap();
    for b in format!("connect {ECHO_PORT}\n").bytes() {
        s.write_all(&[b]).unwrap();
    }
    let mut ok = [0u8; 3];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK ");
    echo_round_trip(&vm.uds, 7, 64 << 10);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn agent_target(vm: &RunningVm) -> Target {
    Target::HybridVsock {
        uds: vm.uds.clone(),
        port: hull_agent_api::DEFAULT_AGENT_PORT,
    }
}

#[test]
fn agent_answers_and_destroy_sandbox_powers_off() {
    let img = hull_tests::guest_image();
    let vm = RunningVm::start("rpc", 2, 512, "");
    let pid = vm.pid();
    runtime().block_on(async {
        let deadline = Instant::now() + BOOT_LIMIT;
        let client = connect_watching(&agent_target(&vm), deadline, process_alive(pid))
            .await
            .expect("the agent answers Check over hybrid vsock");
        assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);
        let v = client.version().await.unwrap();
        assert_eq!(v.api_version, hull_agent_api::API_VERSION);
        let d = client.guest_details().await.unwrap();
        assert_eq!(d.online_cpus, 2);
        assert_eq!(d.kernel_release, img.release);
        let configured = 512 * 1024;
        assert!(
            d.mem_total_kib <= configured && d.mem_total_kib >= configured * 8 / 10,
            "guest sees {} KiB",
            d.mem_total_kib
        );
        client
            .set_guest_time(std::time::SystemTime::now())
            .await
            .unwrap();
        client.destroy_sandbox().await.unwrap();
    });
    let run = vm.wait(Duration::from_secs(120));
    assert!(run.status.success(), "{run:?}");
    assert_eq!(run.stderr.trim(), "hull-vmm: guest powered off", "{run:?}");
}

#[test]
fn sigusr2_logs_each_vcpu_state_and_the_vm_goes_on() {
    let vm = RunningVm::start("dump", 1, 256, "");
    let pid = vm.pid();
    runtime().block_on(async {
        let deadline = Instant::now() + BOOT_LIMIT;
        let client = connect_watching(&agent_target(&vm), deadline, process_alive(pid))
            .await
            .expect("the agent answers");
        // SAFETY: kill(2) on our own child, not reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR2) }, 0);
        // Still alive and serving after the dump; the power-off below takes vCPU exits, and every
        // exit logs a pending request first, so the dump is in stderr by the time the VM ends.
        assert_eq!(client.check().await.unwrap(), ServingStatus::SERVING);
        client.destroy_sandbox().await.unwrap();
    });
    let run = vm.wait(Duration::from_secs(120));
    assert!(run.status.success(), "{run:?}");
    let dumps: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("vCPU state on request"))
        .collect();
    assert_eq!(dumps.len(), 1, "one dump of the one vCPU: {run:?}");
    for field in ["vcpu=0", "rip=0x", "mp_state=", "cr3=0x"] {
        assert!(dumps[0].contains(field), "{field} in {}", dumps[0]);
    }
    assert!(
        run.stderr
            .trim_end()
            .ends_with("hull-vmm: guest powered off"),
        "{run:?}"
    );
}

#[test]
fn a_dead_vm_is_reported_as_such() {
    let mut vm = RunningVm::start("dead", 1, 256, "");
    let pid = vm.pid();
    // SAFETY: plain kill(2) of the VMM we spawned.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    while vm.alive() {
        std::thread::yield_now();
    }
    let result = runtime().block_on(connect_watching(
        &agent_target(&vm),
        Instant::now() + BOOT_LIMIT,
        process_alive(pid),
    ));
    let Err(err) = result else {
        panic!("an agent answered behind a killed VMM");
    };
    assert!(matches!(err, ClientError::VmDied { .. }), "{err}");
}

#[test]
fn guest_initiated_connections_reach_the_host_listener() {
    // The agent's log stream: the guest connects to host CID 2 port 1025, which the VMM forwards
    // to the Unix socket `<uds>_1025`.
    let dir = RunningVm::prepare("guestconn");
    let listener = std::os::unix::net::UnixListener::bind(dir.join("vsock.sock_1025")).unwrap();
    let vm = RunningVm::start_in(dir, 1, 256, "agent.log_port=1025");
    let (stream, _) = listener.accept().expect("the guest connects");
    stream.set_read_timeout(Some(BOOT_LIMIT)).unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut first).unwrap();
    assert!(!first.trim().is_empty(), "a log line from the agent");
    drop(vm);
}
