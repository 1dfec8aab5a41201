//! `cargo xtask run`: the main job on a fresh machine. Installs what is missing, builds Hull, the
//! guest image and the busybox fixtures, and boots the guest under `hull-vmm` — inside the
//! nested-KVM harness when the host has no hardware KVM — with the busybox rootfs in its
//! initramfs; then talks to its agent over hybrid vsock exactly as the shim will (`Check`,
//! `GetGuestDetails`), runs a busybox container in the guest from an OCI runtime spec
//! (`CreateContainer`, `StartContainer`, `ReadStdout`, `WaitProcess`, `RemoveContainer`), prints
//! its output, and ends the VM with `DestroySandbox`. (The containerd shim will replace the
//! direct agent calls with `ctr run`.)

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
    let initrd = guest_image::fixtures_initramfs(&img)?;
    let spec = cargo::root().join("target/fixtures/busybox/config.json");
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
        initrd.display().to_string(),
        "--spec".into(),
        spec.display().to_string(),
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
    /// The fixture's OCI runtime spec (its rootfs is at /fixtures/busybox/rootfs in the guest).
    #[arg(long)]
    spec: std::path::PathBuf,
}

/// Where the initramfs puts the busybox rootfs.
const GUEST_ROOTFS: &str = "/fixtures/busybox/rootfs";

/// Runs one container through the agent: its output and exit status.
async fn run_container(
    client: &hull_agent_api::client::AgentClient,
    spec_path: &std::path::Path,
) -> Result<(String, i32)> {
    use hull_agent_api::agent;
    let mut spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(spec_path)?)?;
    spec["process"]["args"] = serde_json::json!([
        "sh",
        "-c",
        "echo \"hello from a container in a Hull microVM: $(hostname), kernel $(uname -r), \
         pid $$, uid $(id -u)\""
    ]);
    let raw = client.raw();
    let ctx = || hull_agent_api::ttrpc::context::with_timeout(120_000_000_000);
    let id = "hello".to_owned();
    let mut create = agent::CreateContainerRequest::new();
    create.container_id = id.clone();
    create.spec_json = spec.to_string();
    create.rootfs = GUEST_ROOTFS.into();
    raw.create_container(ctx(), &create).await?;
    let mut c = agent::ContainerRequest::new();
    c.container_id = id.clone();
    raw.start_container(ctx(), &c).await?;
    let mut read = agent::ReadStreamRequest::new();
    read.container_id = id.clone();
    read.len = 65536;
    let mut out = Vec::new();
    loop {
        let chunk = raw.read_stdout(ctx(), &read).await?.data;
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    let mut p = agent::ProcessRequest::new();
    p.container_id = id.clone();
    let status = raw.wait_process(ctx(), &p).await?.status;
    let mut rm = agent::RemoveContainerRequest::new();
    rm.container_id = id;
    raw.remove_container(ctx(), &rm).await?;
    Ok((String::from_utf8_lossy(&out).into_owned(), status))
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
    let t = std::time::Instant::now();
    let (output, status) = vm.block_on(run_container(&client, &a.spec))?;
    print!("container> {output}");
    println!(
        "xtask run: container exited with status {status} ({:.2} s for create, start, run, wait, remove)",
        t.elapsed().as_secs_f64()
    );
    if status != 0 {
        bail!("the container failed (status {status})");
    }
    let (ok, stderr) = vm.destroy(&client)?;
    print!("{stderr}");
    if !ok {
        bail!("hull-vmm did not exit cleanly after DestroySandbox");
    }
    Ok(())
}
