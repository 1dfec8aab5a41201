//! The container suite (`hull_tests::containers`) against the real `hull-agent` in host mode: a
//! fresh agent per case, with its own state directory and cgroup parent. Needs root (namespaces,
//! mounts, cgroups), as CI has.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hull_agent_api::client::{connect, Target};
use hull_agent_api::testing::TempDir;
use hull_tests::containers::{fixtures, template, Ctx};

/// The agent of one case: SIGTERM on drop (it removes its containers and cgroups), then reaped.
struct Guard {
    child: Child,
    _dir: TempDir,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a PID of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

async fn ctx(name: &str) -> (Ctx, Guard) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the container tests need root");
    let rootfs = fixtures().join("rootfs");
    let dir = TempDir::new("c").unwrap();
    let socket = dir.join("agent.sock");
    let cgroup_parent = format!("/hull-test-{}-{name}", std::process::id());
    let child = Command::new(env!("CARGO_BIN_EXE_hull-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--cgroup-parent")
        .arg(&cgroup_parent)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let agent_pid = child.id() as i32;
    let guard = Guard { child, _dir: dir };
    let target = Target::Unix(socket);
    let client = connect(&target, Instant::now() + Duration::from_secs(10))
        .await
        .expect("host-mode agent answers");
    let ctx = Ctx {
        client: client.raw().clone(),
        rootfs,
        template: template(),
        agent_pid,
        cgroup_parent,
        prefix: name.chars().take(12).collect::<String>().replace('_', "-"),
        target,
    };
    (ctx, guard)
}

hull_tests::all_container_cases!();
