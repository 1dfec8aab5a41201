//! `cargo xtask bench ctr`: `ctr run --rm <busybox> true` through one private containerd, with
//! `io.containerd.kata.v2` (Hull: a microVM per run) and with `io.containerd.runc.v2`,
//! alternately, N runs each, in ONE harness run; then the host memory of one idle Hull sandbox.
//!
//! Each round runs Hull with the default configuration (the VM boots on the pod's time), runc,
//! and Hull with one warm sandbox (`[factory] warm_vms = 1`: the pod gets a VM booted before).
//! Before each measured run the pool is full and no warm VM is booting (the benchmark waits),
//! so a refill never runs in a measured run: the warm numbers are those of a pool that keeps up
//! with the pods, its one idle VM present during every run.
//!
//! Before the last lines, `hull_phases_ms …` and `hull_warm_phases_ms …`: medians of what the
//! shims logged for the measured runs (VM up, CreateContainer in the guest, VM stopped), and
//! the PSS of the idle sandbox right after `ctr run -d` returned; then
//! `ctr_run_ms_warm hull_warm=… runc=… ratio=…`.
//!
//! Last two lines:
//! - `sandbox_pss_mib=… (shim=… vmm=… virtiofsd=…)`: the proportional set size (PSS, from
//!   `/proc/<pid>/smaps_rollup`) of the shim, hull-vmm and virtiofsd of one sandbox running
//!   `sleep`, summed, once it settled: the guest's free page reports (2 s after pages are freed)
//!   make it fall after the start; it is sampled each second until it stops falling (at most
//!   30 s);
//! - `ctr_run_ms hull=… runc=… ratio=…`: medians of the wall time of `ctr run --rm … true`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hull_tests::containerd::{Containerd, HullPaths, BUSYBOX_IMAGE, HULL_RUNTIME, RUNC_RUNTIME};

use crate::bench::InnerArgs;

fn run_once(ctd: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    run_with(ctd, runtime, &[], id)
}

fn run_with(ctd: &Containerd, runtime: &str, extra: &[&str], id: &str) -> Result<f64> {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[BUSYBOX_IMAGE, id, "true"]);
    let t = Instant::now();
    let out = ctd
        .ctr(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("run ctr")?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "ctr run --runtime {runtime} failed ({}): {}\ncontainerd: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            ctd.log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(ms)
}

/// Waits until the warm pool in `state` has a ready sandbox and none booting.
fn wait_pool_full(state: &Path) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let names: Vec<String> = std::fs::read_dir(state)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let ready = names.iter().any(|n| n.starts_with(".warm-"));
        let booting = names.iter().any(|n| n.starts_with(".boot-"));
        if ready && !booting {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the warm pool did not fill within 300 s ({names:?}); its log: {}",
                std::fs::read_to_string(state.join(".warm.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The `key` values (e.g. `ms=`) of the shim log lines (in containerd's log) saying `msg` about
/// a container or sandbox whose id starts with `who`.
fn log_ms(log: &str, msg: &str, key: &str, who: &str) -> Vec<f64> {
    let (plain, quoted) = (format!("={who}"), format!("=\"{who}"));
    log.lines()
        .filter(|l| l.contains(msg) && (l.contains(&plain) || l.contains(&quoted)))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.trim_matches('"').parse().ok())
        })
        .collect()
}

/// The KiB value of `key` (e.g. `MemFree:`) in a `/proc` key-value text.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `label=MiB …` for each `(label, key)` of a `/proc` text in kB (`?` for a key it lacks).
fn mib_fields(text: &str, fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(label, key)| {
            let v =
                field_kib(text, key).map_or("?".into(), |v| format!("{:.1}", v as f64 / 1024.0));
            format!("{label}={v}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// PSS of `pid`, KiB.
fn pss_kib(pid: i32) -> Option<u64> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    field_kib(&t, "Pss:")
}

/// Pids whose executable's file name is `name` and whose command line mentions `needle`.
fn pids_of(name: &str, needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read_to_string(e.path().join("cmdline")) else {
            continue;
        };
        let first = cmd.split('\0').next().unwrap_or_default();
        if Path::new(first).file_name().is_some_and(|n| n == name) && cmd.contains(needle) {
            v.push(pid);
        }
    }
    v
}

/// The part that runs where guests boot.
pub fn inner(a: &InnerArgs) -> Result<()> {
    let paths = HullPaths {
        shim_dir: crate::cargo::release_dir(),
        vmm: a.vmm.clone(),
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        virtiofsd: hull_tests::virtiofsd::binary(),
        debug: false,
    };
    let dir = PathBuf::from(format!("/run/hull-bench-ctr-{}", std::process::id()));
    let ctd = Containerd::start(&dir, &paths, true).map_err(anyhow::Error::msg)?;
    ctd.import_busybox().map_err(anyhow::Error::msg)?;
    // The same configuration with a pool of one warm sandbox.
    let pool_cfg = dir.join("hull-warm.toml");
    let base = std::fs::read_to_string(&ctd.hull_config)?;
    std::fs::write(&pool_cfg, format!("{base}\n[factory]\nwarm_vms = 1\n"))?;
    let pool_path = pool_cfg.display().to_string();
    let pool = ["--runtime-config-path", pool_path.as_str()];
    // One unmeasured run of each: page cache, containerd's first snapshot; the pool fills.
    run_once(&ctd, HULL_RUNTIME, "prime-hull")?;
    run_once(&ctd, RUNC_RUNTIME, "prime-runc")?;
    run_with(&ctd, HULL_RUNTIME, &pool, "prime-pool")?;
    println!(
        "bench ctr: ctr run --rm {BUSYBOX_IMAGE} true, {} runs of each runtime, alternating",
        a.runs
    );
    let (mut hull, mut runc, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.runs {
        wait_pool_full(&ctd.hull_state)?;
        let h = run_once(&ctd, HULL_RUNTIME, &format!("hc{i}"))?;
        wait_pool_full(&ctd.hull_state)?;
        let r = run_once(&ctd, RUNC_RUNTIME, &format!("r{i}"))?;
        wait_pool_full(&ctd.hull_state)?;
        let w = run_with(&ctd, HULL_RUNTIME, &pool, &format!("hw{i}"))?;
        println!("run {i:2} hull_ms={h:8.1} runc_ms={r:8.1} hull_warm_ms={w:8.1}");
        hull.push(h);
        runc.push(r);
        warm.push(w);
    }
    wait_pool_full(&ctd.hull_state)?;
    let drained = std::process::Command::new(ctd.shim_dir.join("containerd-shim-kata-v2"))
        .arg("drain-warm")
        .env("HULL_CONF_FILE", &pool_cfg)
        .output()?;
    if !drained.status.success() {
        bail!(
            "drain-warm failed: {}",
            String::from_utf8_lossy(&drained.stderr)
        );
    }

    // One idle sandbox: its processes' PSS.
    let out = ctd
        .ctr(&[
            "run",
            "-d",
            "--runtime",
            HULL_RUNTIME,
            BUSYBOX_IMAGE,
            "idle",
            "sleep",
            "3600",
        ])
        .output()?;
    if !out.status.success() {
        bail!("ctr run -d: {}", String::from_utf8_lossy(&out.stderr));
    }
    let sandbox = ctd.hull_state.join("idle").display().to_string();
    let shim = pids_of("containerd-shim-kata-v2", "-id\0idle");
    let vmm = pids_of("hull-vmm", &sandbox);
    let fsd = pids_of("virtiofsd", &sandbox);
    // virtiofsd runs as two processes (its sandbox's parent and the server).
    if shim.len() != 1 || vmm.len() != 1 || fsd.is_empty() {
        bail!("expected one shim, one hull-vmm and virtiofsd for the idle sandbox, found {shim:?} {vmm:?} {fsd:?}");
    }
    let sum = |p: &[i32]| p.iter().filter_map(|&p| pss_kib(p)).sum::<u64>() as f64 / 1024.0;
    let sample = || (sum(&shim), sum(&vmm), sum(&fsd));
    let at_start = sample();
    let total = |x: (f64, f64, f64)| x.0 + x.1 + x.2;
    let mut settled = at_start;
    let since = Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let next = sample();
        let falling = total(next) < total(settled) - 0.5;
        settled = next;
        if (!falling && since.elapsed().as_secs() >= 3) || since.elapsed().as_secs() >= 30 {
            break;
        }
    }
    let (s, v, f) = settled;
    // Where the VMM's share goes: the guest's own view, and hull-vmm's mappings.
    let meminfo = ctd
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "meminfo",
            "idle",
            "cat",
            "/proc/meminfo",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    println!(
        "guest_meminfo_mib {}",
        mib_fields(
            &meminfo,
            &[
                ("total", "MemTotal:"),
                ("free", "MemFree:"),
                ("cached", "Cached:"),
                ("shmem", "Shmem:"),
                ("slab", "Slab:"),
                ("kernel_stack", "KernelStack:"),
                ("page_tables", "PageTables:"),
                ("anon", "AnonPages:"),
            ]
        )
    );
    // Every process of the sandbox, by kind of memory.
    for (name, pids) in [("shim", &shim), ("vmm", &vmm), ("virtiofsd", &fsd)] {
        for pid in pids.iter() {
            let rollup =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            println!(
                "smaps_mib {name} pid={pid} {}",
                mib_fields(
                    &rollup,
                    &[
                        ("rss", "Rss:"),
                        ("pss", "Pss:"),
                        ("pss_anon", "Pss_Anon:"),
                        ("pss_file", "Pss_File:"),
                        ("pss_shmem", "Pss_Shmem:"),
                        ("shmem_pmd_mapped", "ShmemPmdMapped:"),
                    ]
                )
            );
        }
    }
    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", "idle"]).output();
    let _ = ctd.ctr(&["task", "delete", "idle"]).output();
    let _ = ctd.ctr(&["container", "delete", "idle"]).output();

    let (hm, rm, wm) = (
        crate::bench::median(hull),
        crate::bench::median(runc),
        crate::bench::median(warm),
    );
    let log = ctd.log();
    let phases = |who: &str| {
        let phase = |msg: &str, key: &str| {
            let v = log_ms(&log, msg, key, who);
            if v.is_empty() {
                "?".to_string()
            } else {
                format!("{:.0}", crate::bench::median(v))
            }
        };
        format!(
            "shim_serving_to_create={} create={} vm_up={} create_in_guest={} vm_stopped={}",
            phase(" create ", "since_serve_ms="),
            phase(" created", "ms="),
            phase("sandbox VM up", "ms="),
            phase("CreateContainer in the guest", "ms="),
            phase("sandbox VM stopped", "ms="),
        )
    };
    println!(
        "hull_phases_ms {}; sandbox_pss_mib_at_start={:.1}",
        phases("hc"),
        total(at_start)
    );
    println!("hull_warm_phases_ms {}", phases("hw"));
    println!(
        "ctr_run_ms_warm hull_warm={wm:.1} runc={rm:.1} ratio={:.2}",
        wm / rm
    );
    println!(
        "sandbox_pss_mib={:.1} (shim={s:.1} vmm={v:.1} virtiofsd={f:.1})",
        s + v + f
    );
    println!("ctr_run_ms hull={hm:.1} runc={rm:.1} ratio={:.2}", hm / rm);
    Ok(())
}
