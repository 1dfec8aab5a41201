//! `cargo xtask bench fs`: the same workload (`hull-fsbench`: sequential write and read of one
//! large file, then create/stat/unlink of many small files) in three places, alternately, in ONE
//! harness run:
//! - `virtiofs`: in a guest container, on a directory of the virtio-fs share (virtiofsd
//!   `--cache=auto` on a directory of L1's file system);
//! - `blk`: in the same container, on an ext4 file system of a virtio-blk disk (a raw image file
//!   on that same L1 file system), mounted by the agent by its serial;
//! - `host`: on L1 itself, in a directory of that same file system.
//!
//! Reported as medians; the last two lines are `fs_seq_read_mib_s virtiofs=… blk=… host=…` and
//! `fs_meta_ops_s virtiofs=… blk=… host=…`. Page caches are dropped between the write and the
//! read (the guest's, and L1's), so the guest's read goes through its transport.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hull_tests::containers::{Ctx, GUEST_FIXTURE_ROOTFS};
use hull_tests::virtiofsd::Virtiofsd;
use hull_tests::RunningVm;
use serde_json::json;

use crate::bench::InnerArgs;

/// Where the bench initramfs puts the workload binary.
pub const GUEST_FSBENCH: &str = "/bench/hull-fsbench";
const TAG: &str = "hullbench";
const SERIAL: &str = "hull-bench";
/// Size of the large file, MiB.
const FILE_MIB: usize = 64;
/// Small files per metadata run.
const FILES: usize = 1000;

/// Builds `hull-fsbench` static (like the agent: it runs in the guest and on L1) and returns it.
pub fn build_fsbench() -> Result<PathBuf> {
    Ok(crate::cargo::build_release(&["hull-fsbench"])?.join("hull-fsbench"))
}

/// One run's three numbers.
#[derive(Debug, Clone, Copy)]
struct Sample {
    write: f64,
    read: f64,
    meta: f64,
}

fn parse(line: &str) -> Result<Sample> {
    let field = |name: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in hull-fsbench's output {line:?}"))
    };
    Ok(Sample {
        write: field("seq_write_mib_s")?,
        read: field("seq_read_mib_s")?,
        meta: field("meta_ops_s")?,
    })
}

fn sh(script: &str) -> Result<()> {
    let out = Command::new("sh").args(["-c", script]).output()?;
    ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The part that runs where guests boot.
pub fn inner(a: &InnerArgs) -> Result<()> {
    let fsbench = a
        .fsbench
        .clone()
        .context("bench fs needs --fsbench (the static hull-fsbench)")?;
    // A directory of L1's own file system (not the shared target/): all three sides use it.
    let dir = std::env::temp_dir().join(format!("hull-bench-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (shared, host) = (dir.join("shared"), dir.join("host"));
    for d in [shared.join("bench"), host.clone()] {
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    }
    let image = dir.join("disk.img");
    sh(&format!(
        "truncate -s 1G {0} && mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {0}",
        image.display()
    ))?;
    let result = run_all(a, &fsbench, &dir, &shared, &host, &image);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_all(
    a: &InnerArgs,
    fsbench: &Path,
    dir: &Path,
    shared: &Path,
    host: &Path,
    image: &Path,
) -> Result<()> {
    let fsd = Virtiofsd::start(dir, shared);
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir)?;
    std::env::set_var("HULL_VMM", &a.vmm);
    let vm = RunningVm::start_full(
        vm_dir,
        &a.initrd,
        a.vcpus,
        a.memory,
        &format!("agent.shared_fs={TAG}"),
        &[
            "--fs".into(),
            format!("tag={TAG},socket={}", fsd.socket.display()),
            "--drive".into(),
            format!("path={},serial={SERIAL}", image.display()),
        ],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let guest = rt.block_on(async {
        let (ctx, client) = Ctx::guest(
            vm.uds.clone(),
            vm.pid(),
            GUEST_FIXTURE_ROOTFS,
            "bench",
            Duration::from_secs(300),
        )
        .await;
        let mut m = hull_agent_api::agent::MountStorageRequest::new();
        m.block_serial = SERIAL.into();
        m.fstype = "ext4".into();
        m.mount_point = "/run/hull/storage/bench".into();
        ctx.client
            .mount_storage(
                hull_agent_api::ttrpc::context::with_timeout(120_000_000_000),
                &m,
            )
            .await
            .context("MountStorage of the bench disk")?;
        Ok::<_, anyhow::Error>((ctx, client))
    });
    let (ctx, client) = guest?;

    println!(
        "bench fs: {FILE_MIB} MiB file, {FILES} small files, {} runs of each side, alternating",
        a.runs
    );
    let (mut vfs, mut blk, mut hst) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.runs {
        let v = rt.block_on(in_guest(&ctx, "/vfs", i))?;
        let b = rt.block_on(in_guest(&ctx, "/blk", i))?;
        let h = on_host(fsbench, host)?;
        println!("run {i:2} virtiofs {v:?}\nrun {i:2} blk      {b:?}\nrun {i:2} host     {h:?}");
        vfs.push(v);
        blk.push(b);
        hst.push(h);
    }
    rt.block_on(client.destroy_sandbox())
        .context("DestroySandbox")?;
    let run = vm.wait(Duration::from_secs(120));
    ensure!(run.status.success(), "hull-vmm failed: {}", run.stderr);
    drop(fsd);

    let med = |v: &[Sample], f: fn(&Sample) -> f64| crate::bench::median(v.iter().map(f).collect());
    let line = |name: &str, f: fn(&Sample) -> f64| {
        let (v, b, h) = (med(&vfs, f), med(&blk, f), med(&hst, f));
        (
            format!("{name} virtiofs={v:.1} blk={b:.1} host={h:.1}"),
            v / h,
            b / h,
        )
    };
    let w = line("fs_seq_write_mib_s", |s| s.write);
    let r = line("fs_seq_read_mib_s", |s| s.read);
    let m = line("fs_meta_ops_s", |s| s.meta);
    println!(
        "fs_ratio_to_host write virtiofs={:.3} blk={:.3}; read virtiofs={:.3} blk={:.3}; meta virtiofs={:.3} blk={:.3}",
        w.1, w.2, r.1, r.2, m.1, m.2
    );
    println!("{}\n{}\n{}", w.0, r.0, m.0);
    Ok(())
}

/// One workload run in a fresh guest container on `dir` (`/vfs` or `/blk`).
async fn in_guest(ctx: &Ctx, dir: &str, i: usize) -> Result<Sample> {
    let mut spec = ctx.spec(&[
        GUEST_FSBENCH,
        dir,
        "--mib",
        &FILE_MIB.to_string(),
        "--files",
        &FILES.to_string(),
        "--drop-caches",
    ]);
    let mounts = spec["mounts"].as_array_mut().context("spec mounts")?;
    for (dest, src, ro) in [
        ("/vfs", "/run/hull/shared/bench", false),
        ("/blk", "/run/hull/storage/bench", false),
        ("/bench", "/bench", true),
    ] {
        mounts.push(json!({"destination": dest, "type": "bind", "source": src,
                           "options": ["rbind", if ro { "ro" } else { "rw" }]}));
    }
    // drop_caches: /proc/sys writable and CAP_SYS_ADMIN (this container is the benchmark's own).
    spec["linux"]["readonlyPaths"] = json!([]);
    for set in ["bounding", "effective", "permitted"] {
        if let Some(caps) = spec["process"]["capabilities"][set].as_array_mut() {
            caps.push(json!("CAP_SYS_ADMIN"));
        }
    }
    let id = format!("fsbench-{}-{i}", dir.trim_start_matches('/'));
    let out = ctx
        .run(&id, &spec, None)
        .await
        .map_err(|e| anyhow::anyhow!("the {dir} run in the guest: {e:?}"))?;
    if out.status != 0 {
        bail!(
            "hull-fsbench on {dir} in the guest exited {}: {}",
            out.status,
            out.err()
        );
    }
    parse(out.out().trim())
}

fn on_host(fsbench: &Path, dir: &Path) -> Result<Sample> {
    let out = Command::new(fsbench)
        .arg(dir)
        .args([
            "--mib",
            &FILE_MIB.to_string(),
            "--files",
            &FILES.to_string(),
        ])
        .arg("--drop-caches")
        .output()
        .with_context(|| format!("run {}", fsbench.display()))?;
    ensure!(
        out.status.success(),
        "hull-fsbench on the host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(String::from_utf8_lossy(&out.stdout).trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_workload_line() {
        let s = parse("seq_write_mib_s=12.5 seq_read_mib_s=40.0 meta_ops_s=900").unwrap();
        assert_eq!((s.write, s.read, s.meta), (12.5, 40.0, 900.0));
        assert!(parse("seq_write_mib_s=1 meta_ops_s=2").is_err());
    }
}
