//! `cargo xtask run`: the main job on a fresh machine. Installs what is missing, builds Hull and
//! the guest image, and boots the guest under `hull-vmm` — inside the nested-KVM harness when the
//! host has no hardware KVM — printing the guest's ready marker.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::{cargo, deps, guest_image, harness};

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
    deps::ensure()?;
    let mut c = cargo::cargo();
    c.args(["build", "--release", "-p", "hull-vmm"]);
    cargo::run(c)?;
    let img = guest_image::ensure()?;
    let host = hull_harness::detect();
    if host.needs_l1() {
        println!("xtask run: this host has no hardware KVM ({host:?}): booting the guest inside the nested-KVM harness");
    }
    let mut cmdline = String::from("console=ttyS0 reboot=k panic=-1 pci=off");
    if args.debug {
        cmdline.push_str(" hull.debug");
    } else {
        cmdline.push_str(" quiet");
    }
    let cmd: Vec<String> = vec![
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
        "--cmdline".into(),
        cmdline,
    ];
    let status = harness::run_commands(&[cmd], &harness::options(Duration::from_secs(900)))?;
    if status != 0 {
        bail!("hull-vmm failed (status {status})");
    }
    Ok(())
}
