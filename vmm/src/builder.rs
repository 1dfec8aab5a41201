//! Assembling a microVM from a [`VmConfig`]: host checks, memory, kernel, ACPI, devices, vCPUs.
//! A plain function over the config, as Firecracker's `build_microvm_for_boot`.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::load_cmdline;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiError, Com1};
use crate::arch::layout::{irq, pio, CMDLINE_MAX_SIZE, CMDLINE_START, MMIO_GAP_START};
use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::regs::BootEntry;
use crate::boot::{self, BootError, KernelFormat};
use crate::config::{ConfigError, ConsoleConfig, VmConfig};
use crate::device_manager::MmioDeviceManager;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{ConsoleSink, ConsoleTail, SerialDevice};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::power::PowerDevice;
use crate::event_loop::EventLoopBuilder;
use crate::host::{self, HostError};
use crate::kvm::bus::{Bus, BusOverlap};
use crate::kvm::vcpu::{self, Vcpu, VcpuError, VcpuSetup};
use crate::kvm::vm::{self, VmError};
use crate::memory::{self, MemoryError};
use crate::vmm::{ExitNotifier, Vmm};

/// Why the microVM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The host cannot run it.
    #[error(transparent)]
    Host(#[from] HostError),
    /// KVM VM set-up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Device placement.
    #[error("device layout: {0}")]
    Bus(#[from] BusOverlap),
    /// The console file.
    #[error("cannot open console file {0}: {1}")]
    Console(String, std::io::Error),
    /// An eventfd or irqfd.
    #[error("cannot set up the {0} interrupt: {1}")]
    Irq(&'static str, std::io::Error),
    /// A virtio device could not be placed.
    #[error(transparent)]
    Devices(#[from] crate::device_manager::DeviceManagerError),
    /// The device event loop.
    #[error(transparent)]
    EventLoop(#[from] crate::event_loop::EventLoopError),
    /// The vsock device.
    #[error("vsock device: {0}")]
    Vsock(String),
    /// The balloon device.
    #[error(transparent)]
    Balloon(#[from] crate::devices::virtio::balloon::BalloonError),
    /// The virtio-fs device.
    #[error(transparent)]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    /// A virtio-blk drive.
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    /// The kick signal handler.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
}

/// The console's sink, and with the console off, the tail of it that is still kept.
fn console_sink(cfg: &ConsoleConfig) -> Result<(ConsoleSink, Option<ConsoleTail>), BuildError> {
    let mut tail = None;
    let out: Box<dyn Write + Send> = match cfg {
        ConsoleConfig::Stdout => Box::new(std::io::stdout()),
        ConsoleConfig::Off => Box::new(tail.insert(ConsoleTail::default()).clone()),
        ConsoleConfig::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| BuildError::Console(p.display().to_string(), e))?,
        ),
    };
    Ok((ConsoleSink::new(out), tail))
}

fn load_cmdline_into(mem: &vm_memory::GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX_SIZE - 1)))?;
    load_cmdline(mem, vm_memory::GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() + 1)
}

/// Builds the microVM described by `config` and starts its vCPUs.
pub fn build_microvm(config: &VmConfig) -> Result<Vmm, BuildError> {
    let started = Instant::now();
    config.validate()?;
    boot::probe_kernel(&config.kernel)?;
    if let Some(initrd) = &config.initrd {
        boot::probe_initrd(initrd)?;
    }
    host::check(&config.kvm_path, &config.sysfs_module, config.pvm_guest)?;
    let kvm = vm::open_kvm(&config.kvm_path)?;

    let mem_size = u64::from(config.memory_mib) << 20;
    let (mem, memfd) = memory::create_guest_memory(mem_size)?;
    let vm = vm::create_vm(&kvm, &mem)?;
    tracing::debug!(
        us = started.elapsed().as_micros() as u64,
        "VM and memory ready"
    );

    // Kernel, command line, initrd, boot parameters.
    let low_end = mem_size.min(MMIO_GAP_START);
    let (kernel, initrd) =
        boot::load_kernel_and_initrd(&mem, &config.kernel, config.initrd.as_deref(), low_end)?;
    let cmdline_size = load_cmdline_into(&mem, &config.cmdline)?;
    let entry = match (kernel.format, kernel.pvh_entry) {
        (KernelFormat::Elf, Some(pvh)) => {
            boot::write_pvh_start_info(&mem, CMDLINE_START, initrd, mem_size)?;
            BootEntry::Pvh {
                entry: pvh,
                start_info: crate::arch::layout::PVH_INFO_START,
            }
        }
        _ => {
            boot::write_linux_boot_params(
                &mem,
                kernel.setup_header,
                CMDLINE_START,
                cmdline_size,
                initrd,
                mem_size,
            )?;
            BootEntry::Linux64 {
                entry: kernel.entry,
                zero_page: crate::arch::layout::ZERO_PAGE_START,
            }
        }
    };
    tracing::debug!(
        us = started.elapsed().as_micros() as u64,
        ?entry,
        "kernel loaded"
    );

    // Devices.
    let (exit, events) = ExitNotifier::new();
    let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::Irq("serial", e))?;
    vm.register_irqfd(&serial_evt, irq::SERIAL_COM1)
        .map_err(|e| BuildError::Irq("serial", std::io::Error::from_raw_os_error(e.errno())))?;
    let (console, console_tail) = console_sink(&config.console)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        EventFdTrigger::new(serial_evt),
        console,
    )));
    let mut pio_bus = Bus::new();
    pio_bus.insert(
        serial.clone(),
        pio::SERIAL_COM1.into(),
        pio::SERIAL_LEN.into(),
    )?;
    pio_bus.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        pio::I8042_START.into(),
        pio::I8042_LEN.into(),
    )?;
    pio_bus.insert(
        Arc::new(Mutex::new(PowerDevice::new(exit.clone()))),
        pio::ACPI_SLEEP_CONTROL.into(),
        pio::ACPI_PM_LEN.into(),
    )?;
    let pio_bus = Arc::new(pio_bus);

    // virtio devices on virtio-mmio, their I/O on the event loop thread.
    let mut mmio_bus = Bus::new();
    let mut devices = MmioDeviceManager::new();
    let mut io_loop = EventLoopBuilder::new()?;
    let mut place = Placement {
        vm: &vm,
        bus: &mut mmio_bus,
        mem: &mem,
        devices: &mut devices,
        events: &mut io_loop,
    };
    if let Some(v) = &config.vsock {
        add_vsock(v, &mut place)?;
    }
    for d in &config.drives {
        add_block(d, &mut place)?;
    }
    if config.free_page_reporting {
        add_balloon(&mut place)?;
    }
    if let Some(f) = &config.fs {
        add_fs(f, &mut place, &exit)?;
    }
    let mmio_bus = Arc::new(mmio_bus);
    let mut dsdt: Vec<&dyn acpi::DsdtEntry> = vec![&Com1];
    dsdt.extend(devices.slots().iter().map(|s| s as &dyn acpi::DsdtEntry));
    acpi::create_acpi_tables(&mem, config.vcpus, &dsdt)?;
    let event_loop = io_loop.spawn()?;

    // vCPUs.
    vcpu::install_kick_handler().map_err(BuildError::Signal)?;
    let supported = vcpu::supported_cpuid(&kvm)?;
    let setup = VcpuSetup {
        supported_cpuid: &supported,
        vcpus: config.vcpus,
        mem: &mem,
        entry,
        host_features: cpuid::HostFeatures {
            tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        },
    };
    let vcpus = (0..config.vcpus)
        .map(|i| {
            Vcpu::new(
                &vm,
                i,
                &setup,
                pio_bus.clone(),
                mmio_bus.clone(),
                exit.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(vcpus.len());
    let mut vmm = Vmm {
        vcpus: Vec::new(),
        stop: stop.clone(),
        events,
        dump: exit.dump_trigger(),
        serial,
        console_tail,
        event_loop,
        _vm: vm,
        _mem: mem,
        _memfd: memfd,
        started,
    };
    for v in vcpus {
        handles.push(v.start(stop.clone())?);
    }
    vmm.vcpus = handles;
    tracing::debug!(us = started.elapsed().as_micros() as u64, "vCPUs started");
    Ok(vmm)
}

/// Where a virtio device goes: the VM, the MMIO bus and its slots, guest memory, and the event
/// loop its I/O runs on.
struct Placement<'a> {
    vm: &'a kvm_ioctls::VmFd,
    bus: &'a mut Bus,
    mem: &'a vm_memory::GuestMemoryMmap,
    devices: &'a mut MmioDeviceManager,
    events: &'a mut EventLoopBuilder,
}

impl Placement<'_> {
    /// Puts `device` on virtio-mmio.
    fn add<D: crate::devices::virtio::VirtioDevice + 'static>(
        &mut self,
        device: Arc<Mutex<D>>,
    ) -> Result<(), BuildError> {
        self.devices
            .add_virtio(self.vm, self.bus, self.mem, device)?;
        Ok(())
    }
}

/// Connects the virtio-fs device to its backend, places it on virtio-mmio and watches the backend
/// from the event loop.
fn add_fs(
    f: &crate::config::FsConfig,
    place: &mut Placement<'_>,
    exit: &ExitNotifier,
) -> Result<(), BuildError> {
    use crate::devices::virtio::fs::VhostUserFs;
    let fs = VhostUserFs::connect(&f.tag, &f.socket)?;
    place
        .events
        .add(Arc::new(Mutex::new(fs.watch(exit.clone()))));
    place.add(Arc::new(Mutex::new(fs)))
}

/// Creates the virtio-vsock device, places it on virtio-mmio and subscribes it to the event loop.
fn add_vsock(v: &crate::config::VsockConfig, place: &mut Placement<'_>) -> Result<(), BuildError> {
    use crate::devices::virtio::vsock::Vsock;
    let vsock = Vsock::new(u64::from(v.guest_cid), v.uds.clone())
        .map_err(|e| BuildError::Vsock(e.to_string()))?;
    let vsock = Arc::new(Mutex::new(vsock));
    place.add(vsock.clone())?;
    place.events.add(vsock);
    Ok(())
}

/// Creates the free-page-reporting balloon, places it on virtio-mmio and subscribes it to the
/// event loop.
fn add_balloon(place: &mut Placement<'_>) -> Result<(), BuildError> {
    use crate::devices::virtio::balloon::Balloon;
    let balloon = Arc::new(Mutex::new(Balloon::new()?));
    place.add(balloon.clone())?;
    place.events.add(balloon);
    Ok(())
}

/// Opens a drive as a virtio-blk device, places it on virtio-mmio and subscribes it to the event
/// loop.
fn add_block(d: &crate::config::DriveConfig, place: &mut Placement<'_>) -> Result<(), BuildError> {
    use crate::devices::virtio::block::Block;
    let serial = d.serial.as_deref().unwrap_or_default().as_bytes();
    let block = Arc::new(Mutex::new(Block::new(&d.path, d.read_only, serial)?));
    place.add(block.clone())?;
    place.events.add(block);
    Ok(())
}
