//! `hull-vmm`: boots one microVM and exits when the guest powers off or reboots.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hull_vmm::config::DEFAULT_CMDLINE;
use hull_vmm::{build_microvm, ConsoleConfig, VmConfig, VsockConfig};

/// Hull's minimal KVM VMM: boots a Linux kernel (bzImage, or ELF vmlinux via PVH) with ACPI.
#[derive(Parser)]
#[command(name = "hull-vmm", version)]
struct Cli {
    /// Guest kernel: a bzImage or an ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Serial console: stdout, off, or file:PATH.
    #[arg(long, default_value = "stdout")]
    console: ConsoleConfig,
    /// Declare the kernel PVM-capable (built with CONFIG_PVM_GUEST), so it may boot on a PVM host.
    #[arg(long)]
    pvm_guest: bool,
    /// Give the guest a virtio-vsock device whose hybrid-vsock host socket is this path.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    #[arg(long, default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u32,
    /// A virtio-fs device served by a running virtiofsd: tag=TAG,socket=PATH.
    #[arg(long)]
    fs: Option<hull_vmm::config::FsConfig>,
    /// A virtio-blk drive (repeatable): path=PATH[,ro][,serial=ID]; a raw image or block device.
    #[arg(long = "drive", value_name = "path=PATH[,ro][,serial=ID]")]
    drives: Vec<String>,
    /// Give the guest a virtio-balloon device for free page reporting: RAM the guest frees is
    /// given back to the host (the guest needs the virtio_balloon driver).
    #[arg(long)]
    free_page_reporting: bool,
    /// KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm: PathBuf,
    /// Where the host lists loaded modules (for PVM detection); for tests.
    #[arg(long, default_value = "/sys/module", hide = true)]
    sysfs_module: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HULL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: under the shim, stderr is containerd's shim log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before any thread exists: every thread inherits the blocked signal.
    if let Err(e) = hull_vmm::vmm::block_dump_signal() {
        eprintln!("hull-vmm: error: cannot block SIGUSR2 (the state dump signal): {e}");
        return ExitCode::from(1);
    }
    let cli = Cli::parse();
    // Parsed here rather than by clap, so that a bad drive is one `error:` line and exit 1.
    let drives: Result<Vec<_>, String> = cli.drives.iter().map(|d| d.parse()).collect();
    let drives = match drives {
        Ok(d) => d,
        Err(e) => {
            eprintln!("hull-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    let config = VmConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        vcpus: cli.vcpus,
        memory_mib: cli.memory,
        console: cli.console,
        pvm_guest: cli.pvm_guest,
        kvm_path: cli.kvm,
        sysfs_module: cli.sysfs_module,
        vsock: cli.vsock_uds.map(|uds| VsockConfig {
            guest_cid: cli.vsock_cid,
            uds,
        }),
        fs: cli.fs,
        drives,
        free_page_reporting: cli.free_page_reporting,
    };
    let vmm = match build_microvm(&config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("hull-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = hull_vmm::vmm::serve_dump_signal(vmm.dump_trigger()) {
        tracing::warn!("cannot serve SIGUSR2 (vCPU state dumps): {e}");
    }
    match vmm.wait() {
        Ok(reason @ hull_vmm::vmm::ExitReason::BackendGone) => {
            eprintln!("hull-vmm: error: {reason}");
            ExitCode::from(1)
        }
        Ok(reason) => {
            eprintln!("hull-vmm: {reason}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hull-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}
