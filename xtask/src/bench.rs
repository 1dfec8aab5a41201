//! `cargo xtask bench boot`: boots the same kernel + initramfs + command line with `hull-vmm` and
//! with QEMU's microvm machine, alternately, N times, inside ONE harness run (or directly on a
//! hardware-KVM host), and reports medians and their ratio.
//!
//! Timing of one run: from just before the VMM process is spawned to the moment the guest's
//! `HULL_GUEST_READY` line is read from its console, and to the VMM's exit (the guest powers off
//! right after the marker). Peak RSS comes from `wait4`.
//!
//! `cargo xtask bench vsock` is in `bench_vsock`, `cargo xtask bench fs` in `bench_fs`, `cargo xtask bench ctr` in `bench_ctr`; `cargo xtask bench agent` (containers through the
//! host-mode agent beside runc, on this host, no harness) is in `bench_agent`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cargo, guest_image, harness};

/// The command line both VMMs boot with.
/// hull-vmm's default (`hull_vmm::config::DEFAULT_CMDLINE`).
pub const BENCH_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 pci=off cryptomgr.notests";
/// The same, with the agent printing its ready line and powering off at once.
pub const ONESHOT_CMDLINE: &str =
    "console=ttyS0 quiet reboot=k panic=-1 pci=off cryptomgr.notests hull.oneshot";

/// Which kernel image both VMMs boot.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KernelKind {
    /// The ELF vmlinux, through its PVH entry.
    Elf,
    /// The compressed bzImage.
    Bzimage,
}

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    /// What to measure.
    #[arg(value_enum)]
    pub what: Bench,
    /// Runs of each side [default: 10; agent: 50].
    #[arg(long)]
    pub runs: Option<usize>,
    /// More detail (agent: per-run and per-phase times of the agent's RPCs).
    #[arg(long)]
    pub verbose: bool,
    /// Kernel image to boot.
    #[arg(long, value_enum, default_value_t = KernelKind::Elf)]
    pub kernel: KernelKind,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
}

/// A benchmark.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bench {
    /// VMM start to the guest's init marker, hull-vmm beside QEMU microvm.
    Boot,
    /// Host → guest → host throughput through hybrid vsock, beside loopback TCP.
    Vsock,
    /// Life of a `true` container through the host-mode agent, beside `runc run` (on this host).
    Agent,
    /// File system workload in a guest over virtio-fs and virtio-blk, beside L1's own.
    Fs,
    /// `ctr run --rm … true` with Hull's shim beside runc's, through one containerd.
    Ctr,
}

/// Arguments of the part that runs where KVM boots guests (inside L1).
#[derive(clap::Args)]
pub struct InnerArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Bench::Boot)]
    pub what: Bench,
    /// Runs per VMM.
    #[arg(long)]
    pub runs: usize,
    /// hull-vmm binary.
    #[arg(long)]
    pub vmm: PathBuf,
    /// Kernel image.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs.
    #[arg(long)]
    pub initrd: PathBuf,
    /// vCPUs.
    #[arg(long)]
    pub vcpus: u8,
    /// RAM, MiB.
    #[arg(long)]
    pub memory: u32,
    /// The static `hull-fsbench` (bench fs).
    #[arg(long)]
    pub fsbench: Option<PathBuf>,
}

impl InnerArgs {
    /// hull-vmm with this kernel, initrd and size, a vsock device and `cmdline`, console hidden.
    pub fn spawn_agent_vm(&self, cmdline: &str) -> Result<crate::agent_vm::AgentVm> {
        crate::agent_vm::AgentVm::spawn(
            &self.vmm,
            &self.kernel,
            &self.initrd,
            self.vcpus,
            self.memory,
            cmdline,
            false,
        )
    }
}

/// Builds what the benchmark needs and runs its inner part where guests boot.
pub fn run(args: Args) -> Result<()> {
    if args.what == Bench::Agent {
        return crate::bench_agent::run(args.runs.unwrap_or(50), args.verbose);
    }
    let img = guest_image::prepare_release()?;
    let mut initrd = img.initramfs.clone();
    let mut extra = Vec::new();
    if args.what == Bench::Fs {
        let fsbench = crate::bench_fs::build_fsbench()?;
        initrd = guest_image::fixtures_initramfs_with(
            &img,
            "initramfs-bench-fs.cpio",
            &[(
                crate::bench_fs::GUEST_FSBENCH.trim_start_matches('/'),
                &fsbench,
            )],
        )?;
        extra = vec!["--fsbench".into(), fsbench.display().to_string()];
    }
    if args.what == Bench::Ctr {
        cargo::build_release(&["hull-shim"])?;
        hull_tests::containers::fixtures();
    }
    let kernel = match args.kernel {
        KernelKind::Elf => img.vmlinux,
        KernelKind::Bzimage => img.vmlinuz,
    };
    let me = std::env::current_exe()?;
    let vmm = cargo::release_dir().join("hull-vmm");
    let cmd: Vec<String> = vec![
        me.display().to_string(),
        "bench-inner".into(),
        "--what".into(),
        match args.what {
            Bench::Boot => "boot",
            Bench::Vsock => "vsock",
            Bench::Fs => "fs",
            Bench::Ctr => "ctr",
            Bench::Agent => unreachable!("bench agent runs on the host"),
        }
        .into(),
        "--runs".into(),
        args.runs.unwrap_or(10).to_string(),
        "--vmm".into(),
        vmm.display().to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--vcpus".into(),
        args.vcpus.to_string(),
        "--memory".into(),
        args.memory.to_string(),
    ]
    .into_iter()
    .chain(extra)
    .collect();
    let status = harness::run_commands(&[cmd], &harness::options(Duration::from_secs(1800)))?;
    if status != 0 {
        bail!("the benchmark failed inside the harness (status {status})");
    }
    Ok(())
}

/// One boot's measurements.
#[derive(Debug, Clone, Copy)]
struct Sample {
    marker_ms: f64,
    /// The guest's own uptime at the marker (kernel start to init's marker). In the harness it
    /// undercounts: until the kernel switches to kvm-clock its clock runs on timer ticks, which
    /// nested TCG delivers late (host timestamps of an `earlyprintk` boot: ~1 s of wall time from
    /// the vCPUs' start to a ready line at 475 ms of uptime).
    guest_ms: f64,
    exit_ms: f64,
    rss_kib: i64,
}

fn boot_once(mut cmd: Command) -> Result<Sample> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let stdout = child.stdout.take().expect("piped");
    let mut marker = None;
    let mut guest_ms = f64::NAN;
    let mut tail = Vec::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if marker.is_none() && line.contains("HULL_GUEST_READY") {
            marker = Some(start.elapsed());
            guest_ms = line
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("uptime_ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
        }
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own unreaped child, with valid pointers to locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let exit = start.elapsed();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    std::mem::forget(child); // reaped by wait4 above
    let Some(marker) = marker else {
        bail!(
            "{cmd:?}: no HULL_GUEST_READY line (exit status {status}); last output:\n{}",
            tail.join("\n")
        );
    };
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} exited with status {status}");
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(Sample {
        marker_ms: ms(marker),
        guest_ms,
        exit_ms: ms(exit),
        rss_kib: usage.ru_maxrss,
    })
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One boot of hull-vmm with vsock, timed to the agent's first answered `Check`, then ended with
/// `DestroySandbox`.
fn hull_agent_once(a: &InnerArgs) -> Result<Sample> {
    let start = Instant::now();
    let mut vm = a.spawn_agent_vm(BENCH_CMDLINE)?;
    let client = vm.wait_agent(Duration::from_secs(300))?;
    let ready = start.elapsed();
    let guest_ms = vm.block_on(client.guest_details())?.uptime_ms as f64;
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(-1);
    let (ok, stderr) = vm.destroy(&client)?;
    if !ok {
        bail!("hull-vmm failed after DestroySandbox: {stderr}");
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(Sample {
        marker_ms: ms(ready),
        guest_ms,
        exit_ms: ms(start.elapsed()),
        rss_kib,
    })
}

/// The inner part: alternates the two VMMs and prints every run, the medians, and the last line
/// `boot_ms hull=… qemu_microvm=… ratio=…`.
pub fn inner(a: InnerArgs) -> Result<()> {
    match a.what {
        Bench::Boot => inner_boot(a),
        Bench::Vsock => crate::bench_vsock::inner(&a),
        Bench::Fs => crate::bench_fs::inner(&a),
        Bench::Ctr => crate::bench_ctr::inner(&a),
        Bench::Agent => bail!("bench agent runs on the host, not inside the harness"),
    }
}

fn inner_boot(a: InnerArgs) -> Result<()> {
    let hull = || {
        let mut c = Command::new(&a.vmm);
        c.arg("--kernel")
            .arg(&a.kernel)
            .arg("--initrd")
            .arg(&a.initrd)
            .args([
                "--vcpus",
                &a.vcpus.to_string(),
                "--memory",
                &a.memory.to_string(),
            ])
            .args(["--cmdline", ONESHOT_CMDLINE]);
        c
    };
    let qemu = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm,rtc=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args([
            "-serial",
            "stdio",
            "-no-reboot",
            "-enable-kvm",
            "-cpu",
            "host",
        ])
        .args(["-smp", &a.vcpus.to_string(), "-m", &a.memory.to_string()])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initrd)
        .args(["-append", ONESHOT_CMDLINE]);
        c
    };
    println!(
        "bench boot: kernel {} initrd {} vcpus {} memory {} MiB, {} runs each, rotating order",
        a.kernel.display(),
        a.initrd.display(),
        a.vcpus,
        a.memory,
        a.runs
    );
    println!(
        "  hull_agent: hull-vmm with vsock, VMM start -> first answered Check over hybrid vsock"
    );
    println!("  hull_init / qemu_microvm_init: VMM start -> the init's ready line (hull.oneshot)");
    // One warm-up each, not counted: brings the images into the page cache for all alike.
    hull_agent_once(&a)?;
    boot_once(hull())?;
    boot_once(qemu())?;
    let names = ["hull_agent", "hull_init", "qemu_microvm_init"];
    let mut samples: [Vec<Sample>; 3] = Default::default();
    for i in 0..a.runs {
        // Rotate the order, so none always follows another.
        for k in 0..3 {
            let which = (i + k) % 3;
            let s = match which {
                0 => hull_agent_once(&a)?,
                1 => boot_once(hull())?,
                _ => boot_once(qemu())?,
            };
            println!(
                "run {i:2} {:17} ready_ms={:8.1} guest_uptime_ms={:8.1} exit_ms={:8.1} peak_rss_kib={}",
                names[which], s.marker_ms, s.guest_ms, s.exit_ms, s.rss_kib
            );
            samples[which].push(s);
        }
    }
    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    for (name, v) in names.iter().zip(&samples) {
        println!(
            "median {name:17} ready_ms={:.1} guest_uptime_ms={:.1} exit_ms={:.1} peak_rss_kib={:.0}",
            med(v, |s| s.marker_ms),
            med(v, |s| s.guest_ms),
            med(v, |s| s.exit_ms),
            med(v, |s| s.rss_kib as f64)
        );
    }
    let (ha, hi, qi) = (
        med(&samples[0], |s| s.marker_ms),
        med(&samples[1], |s| s.marker_ms),
        med(&samples[2], |s| s.marker_ms),
    );
    println!(
        "boot_ms hull_init={hi:.1} qemu_microvm_init={qi:.1} ratio={:.3}",
        hi / qi
    );
    println!(
        "boot_ms hull_agent_ready={ha:.1} qemu_microvm_init={qi:.1} ratio={:.3}",
        ha / qi
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
