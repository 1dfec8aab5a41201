//! virtio-fs end to end: virtiofsd (from crates.io, `target/tools/bin/virtiofsd`) serving a host
//! directory, hull-vmm's vhost-user-fs device, the agent mounting the tag on `/run/hull/shared`,
//! and containers whose rootfs and volumes come from that share.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hull_tests::containers::{fixtures, Ctx};
use hull_tests::virtiofsd::Virtiofsd;
use hull_tests::RunningVm;
use serde_json::json;

const BOOT_LIMIT: Duration = Duration::from_secs(180);
const TAG: &str = "hullfs";
/// The size of the big files, MiB: 256 unless `HULL_TEST_FS_MIB` says otherwise.
fn big_mib() -> usize {
    std::env::var("HULL_TEST_FS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A VM whose virtio-fs device is served by `fsd`.
fn boot(name: &str, fsd: &Virtiofsd) -> RunningVm {
    let dir = RunningVm::prepare(name);
    RunningVm::start_full(
        dir,
        &hull_tests::guest_image().initramfs,
        1,
        512,
        &format!("agent.shared_fs={TAG}"),
        &[
            "--fs".into(),
            format!("tag={TAG},socket={}", fsd.socket.display()),
        ],
    )
}

async fn ctx(vm: &RunningVm, prefix: &str) -> Ctx {
    Ctx::guest(
        vm.uds.clone(),
        vm.pid(),
        "/run/hull/shared/rootfs",
        prefix,
        BOOT_LIMIT,
    )
    .await
    .0
}

/// Runs `script` with sh on the host; its stdout.
fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hull-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn files_cross_both_ways_and_a_container_runs_from_the_share() {
    let dir = scratch("fs");
    let shared = dir.join("shared");
    for d in ["data", "ro"] {
        std::fs::create_dir_all(shared.join(d)).unwrap();
    }
    // The container's rootfs is on the share.
    let st = Command::new("cp")
        .arg("-a")
        .arg(fixtures().join("rootfs"))
        .arg(shared.join("rootfs"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(shared.join("data/hostfile.txt"), "from the host\n").unwrap();
    let big_len = big_mib() << 20;
    let t0 = Instant::now();
    let big = shared.join("data/big.bin");
    let big_sum = sh(&format!(
        "yes hull-host-data | head -c {big_len} > {0} && sha256sum {0} | cut -d' ' -f1",
        big.display()
    ));
    std::fs::write(shared.join("ro/keep.txt"), "read only\n").unwrap();

    let fsd = Virtiofsd::start(&dir, &shared);
    let vm = boot("fs", &fsd);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = ctx(&vm, "fs").await;
        let script = "cat /data/hostfile.txt; sha256sum /data/big.bin | cut -d' ' -f1; \
                      echo from the guest > /data/guestfile.txt; \
                      yes hull-virtio-fs | head -c $BIG | dd of=/data/guestbig.bin bs=1M 2>/dev/null; \
                      sha256sum /data/guestbig.bin | cut -d' ' -f1; \
                      cat /ro/keep.txt; touch /ro/x 2>&1 || echo ro-refused";
        eprintln!("fs: host files ready after {:?}; VM booted", t0.elapsed());
        let t1 = Instant::now();
        let mut spec = ctx.spec(&["sh", "-c", script]);
        spec["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!(format!("BIG={big_len}")));
        let mounts = spec["mounts"].as_array_mut().unwrap();
        mounts.push(json!({"destination": "/data", "type": "bind",
                           "source": "/run/hull/shared/data", "options": ["rbind", "rw"]}));
        mounts.push(json!({"destination": "/ro", "type": "bind",
                           "source": "/run/hull/shared/ro", "options": ["rbind", "ro"]}));
        let out = ctx.run("fs-1", &spec, None).await.unwrap();
        eprintln!("fs: the container's reads, writes and checksums took {:?}", t1.elapsed());
        assert_eq!(out.status, 0, "{}", out.err());
        let text = out.out();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "from the host");
        assert_eq!(format!("{}\n", lines[1]), big_sum, "host → guest, 256 MiB");
        let guest_big = shared.join("data/guestbig.bin");
        assert_eq!(std::fs::metadata(&guest_big).unwrap().len(), big_len as u64);
        let host_view = sh(&format!("sha256sum {} | cut -d' ' -f1", guest_big.display()));
        assert_eq!(format!("{}\n", lines[2]), host_view, "guest → host, 256 MiB");
        let want = sh(&format!(
            "yes hull-virtio-fs | head -c {big_len} | sha256sum | cut -d' ' -f1"
        ));
        assert_eq!(host_view, want, "the guest's file differs from what it wrote");
        assert_eq!(
            std::fs::read_to_string(shared.join("data/guestfile.txt")).unwrap(),
            "from the guest\n"
        );
        assert_eq!(lines[3], "read only");
        assert!(text.contains("Read-only file system") && text.ends_with("ro-refused\n"), "{text}");
        assert!(!shared.join("ro/x").exists());
    });
    drop(vm);
    drop(fsd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn virtiofsd_killed_stops_the_vm_with_an_error() {
    let dir = scratch("fskill");
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let fsd = Virtiofsd::start(&dir, &shared);
    let vm = boot("fskill", &fsd);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = ctx(&vm, "fskill").await;
    });
    // SAFETY: kill(2) of our own child, not yet reaped.
    unsafe { libc::kill(fsd.pid(), libc::SIGKILL) };
    let run = vm.wait(Duration::from_secs(120));
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("virtiofsd") && run.stderr.contains("went away"),
        "{}",
        run.stderr
    );
    drop(fsd);
    // Nothing of the share is mounted on this host.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(shared.to_str().unwrap()), "{mounts}");
    let _ = std::fs::remove_dir_all(&dir);
}
