//! `cargo xtask run`: the main job on a fresh machine. Installs what is missing (Debian's
//! containerd and runc included), builds Hull (release: hull-vmm, the shim), the guest image and
//! the busybox fixtures (an OCI image), then — inside the nested-KVM harness when the host has no
//! hardware KVM — starts a private containerd (state under `/run/hull-run-<pid>`) unless
//! `--address` names one, imports the busybox image, and runs
//! `ctr run --rm --runtime io.containerd.kata.v2 hull.test/busybox:latest … uname -r`: the guest
//! kernel's release comes back, proof that the container ran in the microVM.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_tests::containerd::{Containerd, HullPaths, BUSYBOX_IMAGE, HULL_RUNTIME};

use crate::{cargo, guest_image, harness};

/// Arguments of `cargo xtask run`.
#[derive(clap::Args)]
pub struct Args {
    /// Use this containerd (its socket) instead of a private one. Its shims must find
    /// `containerd-shim-kata-v2` on their PATH and Hull's configuration (`/etc/hull/config.toml`
    /// or `$HULL_CONF_FILE`).
    #[arg(long)]
    pub address: Option<PathBuf>,
    /// The guest console and the agent's debug log go to containerd's log.
    #[arg(long)]
    pub debug: bool,
    /// The command to run in the container.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

/// Runs the main job.
pub fn run(args: Args) -> Result<()> {
    let img = guest_image::prepare_release()?;
    cargo::build_release(&["hull-shim"])?;
    hull_tests::containers::fixtures();
    let host = hull_harness::detect();
    if host.needs_l1() {
        println!("xtask run: this host has no hardware KVM ({host:?}): running containerd and the microVM inside the nested-KVM harness");
    }
    let mut cmd: Vec<String> = vec![
        std::env::current_exe()?.display().to_string(),
        "run-inner".into(),
        "--kernel".into(),
        img.vmlinux.display().to_string(),
        "--initrd".into(),
        img.initramfs.display().to_string(),
    ];
    if let Some(a) = &args.address {
        cmd.push("--address".into());
        cmd.push(a.display().to_string());
    }
    if args.debug {
        cmd.push("--debug".into());
    }
    if !args.cmd.is_empty() {
        cmd.push("--".into());
        cmd.extend(args.cmd.iter().cloned());
    }
    let status = harness::run_commands(&[cmd], &harness::options(Duration::from_secs(900)))?;
    if status != 0 {
        bail!("the container did not run (status {status})");
    }
    Ok(())
}

/// Arguments of the part that runs where guests boot.
#[derive(clap::Args)]
pub struct InnerArgs {
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs.
    #[arg(long)]
    initrd: PathBuf,
    /// An existing containerd.
    #[arg(long)]
    address: Option<PathBuf>,
    /// Debug console.
    #[arg(long)]
    debug: bool,
    /// The command.
    #[arg(last = true)]
    cmd: Vec<String>,
}

/// Starts (or uses) containerd, imports busybox, runs the container.
pub fn inner(a: InnerArgs) -> Result<()> {
    let paths = HullPaths {
        shim_dir: cargo::release_dir(),
        vmm: cargo::release_dir().join("hull-vmm"),
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        virtiofsd: hull_tests::virtiofsd::binary(),
        debug: a.debug,
    };
    let t = Instant::now();
    let ctd = match &a.address {
        Some(addr) => Containerd::attach(addr),
        None => {
            let dir = PathBuf::from(format!("/run/hull-run-{}", std::process::id()));
            let c = Containerd::start(&dir, &paths, true).map_err(anyhow::Error::msg)?;
            println!(
                "xtask run: private containerd {} up in {:.2} s (state in {})",
                containerd_version(),
                t.elapsed().as_secs_f64(),
                dir.display()
            );
            c
        }
    };
    let image = ctd.import_busybox().map_err(anyhow::Error::msg)?;
    println!("xtask run: imported {image} (built from Debian's busybox-static)");
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        HULL_RUNTIME,
        BUSYBOX_IMAGE,
        "hull-demo",
    ];
    let default = ["uname", "-r"];
    if a.cmd.is_empty() {
        args.extend(default);
    } else {
        args.extend(a.cmd.iter().map(String::as_str));
    }
    println!("xtask run: ctr {}", args.join(" "));
    let t = Instant::now();
    let out = ctd
        .ctr(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("run ctr")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        eprintln!("containerd's log (tail):\n{}", tail(&ctd.log(), 30));
        bail!("ctr run failed ({})", out.status);
    }
    let host = std::process::Command::new("uname").arg("-r").output()?;
    println!(
        "xtask run: done in {:.2} s (VM boot, container, teardown); the host kernel is {}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&host.stdout).trim()
    );
    Ok(())
}

fn containerd_version() -> String {
    std::process::Command::new("containerd")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .unwrap_or("?")
                .to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
