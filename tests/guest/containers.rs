//! The container suite (`hull_tests::containers`) against the agent inside a guest: one VM for the
//! whole suite (booted by the first case, killed when this process ends), whose initramfs carries
//! the busybox fixtures at `/fixtures/busybox` (`$HULL_FIXTURES_INITRD`, made by `cargo xtask
//! test`). Each case connects its own client through hybrid vsock.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use hull_agent_api::client::{connect_watching, process_alive, thread_states, Target};
use hull_tests::containers::{Ctx, GUEST_FIXTURE_ROOTFS};
use hull_tests::RunningVm;

const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// How long a VM that has booted may take to answer a new connection (as the shim's
/// `agent_check_timeout`).
const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// The shared VM: its hybrid-vsock socket, its VMM's PID, and whether it was just booted. If the VM died (a case that made it
/// die fails on its own), the next case gets a new one, numbered, rather than failing on a corpse.
fn vm() -> (PathBuf, u32, bool) {
    static VM: Mutex<Option<(PathBuf, u32)>> = Mutex::new(None);
    static BOOTS: AtomicU32 = AtomicU32::new(0);
    let mut slot = VM.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((uds, pid)) = slot.clone() {
        if process_alive(pid)() {
            return (uds, pid, false);
        }
        eprintln!("the suite's VM (pid {pid}) is gone: booting another");
    }
    let n = BOOTS.fetch_add(1, Ordering::Relaxed);
    let started = start_vm(n);
    *slot = Some(started.clone());
    (started.0, started.1, true)
}

/// Boots VM number `n` of this suite.
fn start_vm(n: u32) -> (PathBuf, u32) {
    let initrd = std::env::var_os("HULL_FIXTURES_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            hull_tests::workspace_root().join("target/guest/initramfs-fixtures.cpio")
        });
    assert!(
        initrd.exists(),
        "{} is missing: cargo xtask test makes it",
        initrd.display()
    );
    let (tx, rx) = mpsc::channel();
    // The VM's parent thread lives as long as the process (the VMM dies with it).
    std::thread::spawn(move || {
        let dir = RunningVm::prepare(&format!("containers-{n}"));
        // Nothing reads this VM's console: with HULL_TEST_LOG_DIR (cargo xtask test) it is
        // kept on disk, so that a VM that dies mid-suite leaves its last words.
        let console: Vec<String> = match (
            std::env::var_os("HULL_TEST_LOG_DIR"),
            std::env::var_os("HULL_TEST_CONSOLE_DIR"),
        ) {
            (Some(d), None) => vec![
                "--console".into(),
                format!(
                    "file:{}",
                    PathBuf::from(d)
                        .join(format!("containers-{n}.console"))
                        .display()
                ),
            ],
            _ => Vec::new(),
        };
        let vm = RunningVm::start_full(dir, &initrd, 1, 768, "", &console);
        tx.send((vm.uds.clone(), vm.pid())).expect("send");
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("the VM thread")
}

/// Nothing to clean up per case: the VM goes with the process.
struct Guard;

/// Each case starts with a VM that answers: one that stopped answering (a hang is the failure of
/// the case it happened in) is killed, with its threads' states on stderr, and another booted, so
/// that the cases after it do not each wait out [`BOOT_LIMIT`] on it.
async fn ctx(name: &str) -> (Ctx, Guard) {
    let (mut uds, mut pid, fresh) = vm();
    let limit = if fresh { BOOT_LIMIT } else { ANSWER_LIMIT };
    let target = Target::HybridVsock {
        uds: uds.clone(),
        port: hull_agent_api::DEFAULT_AGENT_PORT,
    };
    if let Err(e) = connect_watching(&target, Instant::now() + limit, process_alive(pid)).await {
        eprintln!(
            "the suite's VM (pid {pid}) does not answer ({e}); its threads: {}; killing it",
            thread_states(pid)
        );
        // SAFETY: kill(2) on our own child, not reaped (its parent thread never waits for it).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        (uds, pid, _) = vm();
    }
    let (ctx, _) = Ctx::guest(uds, pid, GUEST_FIXTURE_ROOTFS, name, BOOT_LIMIT).await;
    (ctx, Guard)
}

hull_tests::all_container_cases!();
