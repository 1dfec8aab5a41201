//! vCPUs: per-vCPU set-up (CPUID, MSRs, FPU, LAPIC, boot registers) and the thread that runs each
//! one, routing its I/O exits to the buses.
//!
//! Stopping: the VMM sets the shared `stop` flag and sends [`kick_signal`] to each vCPU thread until
//! it ends; the signal makes `KVM_RUN` return `EINTR`, and the loop then sees the flag.
//!
//! State dumps: [`request_state_dump`] then a kick makes each vCPU log where it is (registers and
//! whether it is halted) once, and go on running: what a guest that stopped answering was doing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::bus::Bus;
use crate::arch::x86_64::regs::{boot_fpu, boot_regs, setup_sregs, BootEntry, RegsError};
use crate::arch::x86_64::{cpuid, interrupts, msr};
use crate::vmm::{ExitNotifier, ExitReason};

/// A vCPU failed to set up or to run.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("vCPU {0}: KVM {1} failed: {2}")]
    Ioctl(u8, &'static str, kvm_ioctls::Error),
    /// Boot structures could not be written.
    #[error("vCPU {0}: {1}")]
    Regs(u8, RegsError),
    /// The boot MSR list could not be built.
    #[error("vCPU {0}: {1}")]
    Msr(u8, msr::MsrError),
    /// KVM could not enter the guest.
    #[error("vCPU {0}: KVM could not enter the guest (hardware entry failure reason {1:#x})")]
    FailEntry(u8, u64),
    /// KVM reported an internal error (e.g. emulation failure).
    #[error("vCPU {0}: KVM internal error (suberror {1}): the guest executed something KVM cannot emulate")]
    Internal(u8, u32),
    /// The guest reported a crash through KVM.
    #[error("vCPU {0}: the guest crashed (KVM system event crash)")]
    GuestCrash(u8),
    /// An exit the VMM does not handle.
    #[error("vCPU {0}: unexpected KVM exit {1}")]
    UnexpectedExit(u8, String),
    /// The vCPU thread could not be spawned.
    #[error("vCPU {0}: cannot spawn its thread: {1}")]
    Spawn(u8, std::io::Error),
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for [`kick_signal`]; without one the signal would kill the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Bumped by [`request_state_dump`]; each vCPU logs its state when it sees a new value.
static DUMP_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Asks every vCPU to log its state once, the next time it leaves `KVM_RUN` (kick it to make that
/// now).
pub fn request_state_dump() {
    DUMP_GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitNotifier,
}

/// Everything every vCPU needs to be configured.
pub struct VcpuSetup<'a> {
    /// CPUID supported by KVM, fetched once.
    pub supported_cpuid: &'a CpuId,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory (for the GDT and page tables).
    pub mem: &'a GuestMemoryMmap,
    /// Boot entry of the boot vCPU.
    pub entry: BootEntry,
    /// Features KVM emulates but does not list in the supported CPUID.
    pub host_features: cpuid::HostFeatures,
}

/// Fetches the supported CPUID once for all vCPUs.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VcpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VcpuError::Ioctl(0, "GET_SUPPORTED_CPUID", e))
}

impl Vcpu {
    /// Creates vCPU `index` in `vm` and configures it; vCPU 0 gets the boot registers.
    pub fn new(
        vm: &VmFd,
        index: u8,
        setup: &VcpuSetup<'_>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: ExitNotifier,
    ) -> Result<Self, VcpuError> {
        let io = |what| move |e| VcpuError::Ioctl(index, what, e);
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(io("CREATE_VCPU"))?;

        let mut cpuid = setup.supported_cpuid.clone();
        cpuid::patch(
            cpuid.as_mut_slice(),
            index,
            setup.vcpus,
            setup.host_features,
        );
        fd.set_cpuid2(&cpuid).map_err(io("SET_CPUID2"))?;

        let msrs = msr::boot_msrs().map_err(|e| VcpuError::Msr(index, e))?;
        let written = fd.set_msrs(&msrs).map_err(io("SET_MSRS"))?;
        if written != msrs.as_slice().len() {
            tracing::debug!(vcpu = index, written, "KVM accepted only some boot MSRs");
        }
        fd.set_fpu(&boot_fpu()).map_err(io("SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(io("GET_LAPIC"))?;
        interrupts::set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(io("SET_LAPIC"))?;

        if index == 0 {
            let mut sregs = fd.get_sregs().map_err(io("GET_SREGS"))?;
            setup_sregs(setup.mem, setup.entry, &mut sregs)
                .map_err(|e| VcpuError::Regs(index, e))?;
            fd.set_sregs(&sregs).map_err(io("SET_SREGS"))?;
            fd.set_regs(&boot_regs(setup.entry))
                .map_err(io("SET_REGS"))?;
        }
        Ok(Self {
            fd,
            index,
            pio,
            mmio,
            exit,
        })
    }

    /// Starts the vCPU's thread. It runs until `stop` is set (and the thread kicked) or the guest
    /// ends; every ending is reported through the exit notifier.
    pub fn start(mut self, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Err(e) = self.run(&stop) {
                    self.exit.fail(e);
                }
            })
            .map_err(|e| VcpuError::Spawn(index, e))
    }

    /// Logs where the vCPU is (`why`: the occasion), at error level so that it shows by default:
    /// after a triple fault, the one clue such a death leaves; on request, what a guest that
    /// stopped answering is doing (`mp_state` 3 is halted, waiting for an interrupt; `if` says
    /// whether interrupts are enabled).
    fn log_state(&self, why: &str) {
        let mp_state = self.fd.get_mp_state().map(|m| m.mp_state).ok();
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => tracing::error!(
                vcpu = self.index,
                rip = format_args!("{:#x}", r.rip),
                rsp = format_args!("{:#x}", r.rsp),
                rflags = format_args!("{:#x}", r.rflags),
                r#if = r.rflags & (1 << 9) != 0,
                mp_state,
                cr0 = format_args!("{:#x}", s.cr0),
                cr2 = format_args!("{:#x}", s.cr2),
                cr3 = format_args!("{:#x}", s.cr3),
                cr4 = format_args!("{:#x}", s.cr4),
                idt = format_args!("{:#x}/{:#x}", s.idt.base, s.idt.limit),
                "vCPU state {why}"
            ),
            (r, s) => tracing::error!(
                vcpu = self.index,
                regs_ok = r.is_ok(),
                sregs_ok = s.is_ok(),
                mp_state,
                "vCPU state {why}: its registers cannot be read"
            ),
        }
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<(), VcpuError> {
        let index = self.index;
        let mut dumped = DUMP_GENERATION.load(Ordering::Acquire);
        while !stop.load(Ordering::Acquire) {
            let wanted = DUMP_GENERATION.load(Ordering::Acquire);
            if wanted != dumped {
                dumped = wanted;
                self.log_state("on request (SIGUSR2)");
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff); // nothing there: the bus floats high
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel LAPIC KVM handles HLT itself; seeing it means the guest
                    // stopped for good.
                    self.exit.exit(ExitReason::PowerOff);
                    return Ok(());
                }
                Ok(VcpuExit::Shutdown) => {
                    self.log_state("at the guest's triple fault (shutdown exit)");
                    self.exit.exit(ExitReason::TripleFault);
                    return Ok(());
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => self.exit.exit(ExitReason::PowerOff),
                        KVM_SYSTEM_EVENT_RESET => self.exit.exit(ExitReason::Reboot),
                        KVM_SYSTEM_EVENT_CRASH => return Err(VcpuError::GuestCrash(index)),
                        other => {
                            return Err(VcpuError::UnexpectedExit(
                                index,
                                format!("system event {other}"),
                            ))
                        }
                    }
                    return Ok(());
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(VcpuError::FailEntry(index, reason))
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, `internal` is the union member KVM filled.
                    let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return Err(VcpuError::Internal(index, sub));
                }
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    return Err(VcpuError::UnexpectedExit(index, format!("{other:?}")));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(VcpuError::Ioctl(index, "RUN", e)),
            }
        }
        Ok(())
    }
}
