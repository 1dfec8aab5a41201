//! The container suite (`hull_tests::containers`) against the agent inside a guest: one VM for the
//! whole suite (booted by the first case, killed when this process ends), whose initramfs carries
//! the busybox fixtures at `/fixtures/busybox` (`$HULL_FIXTURES_INITRD`, made by `cargo xtask
//! test`). Each case connects its own client through hybrid vsock.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use hull_agent_api::client::process_alive;
use hull_tests::containers::{Ctx, GUEST_FIXTURE_ROOTFS};
use hull_tests::RunningVm;

const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// The shared VM: its hybrid-vsock socket and its VMM's PID. If the VM died (a case that made it
/// die fails on its own), the next case gets a new one, numbered, rather than failing on a corpse.
fn vm() -> (PathBuf, u32) {
    static VM: Mutex<Option<(PathBuf, u32)>> = Mutex::new(None);
    static BOOTS: AtomicU32 = AtomicU32::new(0);
    let mut slot = VM.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((uds, pid)) = slot.clone() {
        if process_alive(pid)() {
            return (uds, pid);
        }
        eprintln!("the suite's VM (pid {pid}) is gone: booting another");
    }
    let n = BOOTS.fetch_add(1, Ordering::Relaxed);
    let started = start_vm(n);
    *slot = Some(started.clone());
    started
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

async fn ctx(name: &str) -> (Ctx, Guard) {
    let (uds, pid) = vm();
    let (ctx, _) = Ctx::guest(uds, pid, GUEST_FIXTURE_ROOTFS, name, BOOT_LIMIT).await;
    (ctx, Guard)
}

hull_tests::all_container_cases!();
