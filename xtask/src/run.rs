//! `cargo xtask run`: the main job on a fresh machine. Installs what is missing, builds Hull and
//! the guest image, and boots the guest under `hull-vmm` — inside the nested-KVM harness when the
//! host has no hardware KVM — then talks to its agent over hybrid vsock exactly as the shim will
//! (`Check`, `GetGuestDetails`), prints what the guest reports, and ends it with `DestroySandbox`.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::{cargo, guest_image, harness};

/// Arguments of `cargo xtask run`.
#[derive(clap::Args)]
pub struct Args {
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// Show the guest's full kernel log.
    #[arg(long)]
    pub debug: bool,
}

/// Runs the main job.
pub fn run(args: Args) -> Result<()> {
    let img = guest_image::prepare_release()?;
    let host = hull_harness::detect();
    if host.needs_l1() {
        println!("xtask run: this host has no hardware KVM ({host:?}): booting the guest inside the nested-KVM harness");
    }
    let mut cmd: Vec<String> = vec![
        std::env::current_exe()?.display().to_string(),
        "run-inner".into(),
        "--vmm".into(),
        cargo::root()
            .join("target/release/hull-vmm")
            .display()
            .to_string(),
        "--kernel".into(),
        img.vmlinux.display().to_string(),
        "--initrd".into(),
        img.initramfs.display().to_string(),
        "--vcpus".into(),
        args.vcpus.to_string(),
        "--memory".into(),
        args.memory.to_string(),
    ];
    if args.debug {
        cmd.push("--debug".into());
    }
    let status = harness::run_commands(&[cmd], &harness::options(Duration::from_secs(900)))?;
    if status != 0 {
        bail!("hull-vmm failed (status {status})");
    }
    Ok(())
}

/// Arguments of the part that runs where guests boot.
#[derive(clap::Args)]
pub struct InnerArgs {
    /// hull-vmm binary.
    #[arg(long)]
    vmm: std::path::PathBuf,
    /// Kernel image.
    #[arg(long)]
    kernel: std::path::PathBuf,
    /// Initramfs.
    #[arg(long)]
    initrd: std::path::PathBuf,
    /// vCPUs.
    #[arg(long)]
    vcpus: u8,
    /// RAM, MiB.
    #[arg(long)]
    memory: u32,
    /// Full guest kernel log.
    #[arg(long)]
    debug: bool,
}

/// Boots, talks to the agent, destroys the sandbox.
pub fn inner(a: InnerArgs) -> Result<()> {
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 pci=off {}",
        if a.debug { "hull.debug" } else { "quiet" }
    );
    let start = std::time::Instant::now();
    let mut vm = crate::agent_vm::AgentVm::spawn(
        &a.vmm, &a.kernel, &a.initrd, a.vcpus, a.memory, &cmdline, true,
    )?;
    println!(
        "xtask run: hull-vmm started (pid {}), waiting for the agent over hybrid vsock",
        vm.pid()
    );
    let client = vm.wait_agent(Duration::from_secs(300))?;
    let ready = start.elapsed();
    let d = vm.block_on(client.guest_details())?;
    println!(
        "xtask run: agent ready after {:.2} s: kernel {}, {} vCPUs, {} KiB RAM, agent {}, guest uptime {} ms",
        ready.as_secs_f64(),
        d.kernel_release,
        d.online_cpus,
        d.mem_total_kib,
        d.agent_version,
        d.uptime_ms
    );
    let (ok, stderr) = vm.destroy(&client)?;
    print!("{stderr}");
    if !ok {
        bail!("hull-vmm did not exit cleanly after DestroySandbox");
    }
    Ok(())
}
