//! A running microVM: its vCPU threads, devices and memory, how it ends, and the state dump of its
//! vCPUs on request ([`DumpTrigger`]). With the console off, the guest's last console lines are
//! logged when it dies (a reset, a triple fault, a failed vCPU) and with every state dump.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use crate::devices::legacy::serial::{ConsoleTail, SerialDevice};
use crate::kvm::vcpu::{kick_signal, request_state_dump, VcpuError};

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 (or KVM's shutdown event): the guest powered off.
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042, KVM reset event).
    Reboot,
    /// The guest triple-faulted (a reset on real hardware).
    TripleFault,
    /// A device's backend process (virtiofsd) went away: the VM cannot go on.
    BackendGone,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PowerOff => "guest powered off",
            Self::Reboot => "guest requested a reboot",
            Self::TripleFault => "guest triple-faulted (reset)",
            Self::BackendGone => "the virtio-fs backend (virtiofsd) went away: VM stopped",
        })
    }
}

/// What vCPUs and devices report to the VMM: an ending, or a failure.
pub type VmEvent = Result<ExitReason, VcpuError>;

/// What the VMM's main thread hears while the VM runs.
pub enum Report {
    /// The VM ended (the first one wins).
    Ended(VmEvent),
    /// Someone asked for the vCPUs' state ([`DumpTrigger`]).
    DumpRequested,
}

impl Report {
    /// The ending this reports, if it is one.
    pub fn ended(self) -> Option<VmEvent> {
        match self {
            Self::Ended(e) => Some(e),
            Self::DumpRequested => None,
        }
    }
}

/// A handle through which devices and vCPUs end the VM. The first report wins.
#[derive(Clone)]
pub struct ExitNotifier(Sender<Report>);

impl ExitNotifier {
    /// A notifier and the receiver the VMM waits on.
    pub fn new() -> (Self, Receiver<Report>) {
        let (tx, rx) = channel();
        (Self(tx), rx)
    }

    /// The guest ended for `reason`.
    pub fn exit(&self, reason: ExitReason) {
        // The receiver is gone only when the VMM is already tearing down.
        let _ = self.0.send(Report::Ended(Ok(reason)));
    }

    /// A vCPU failed.
    pub fn fail(&self, err: VcpuError) {
        let _ = self.0.send(Report::Ended(Err(err)));
    }

    /// A dump trigger reporting to the same VMM.
    pub fn dump_trigger(&self) -> DumpTrigger {
        DumpTrigger(self.0.clone())
    }
}

/// Asks a running VM to log each vCPU's state (registers, halted or not) once; the VM goes on.
/// Safe to use at any time: after the VM ended it does nothing.
#[derive(Clone)]
pub struct DumpTrigger(Sender<Report>);

impl DumpTrigger {
    /// Requests the dump.
    pub fn request(&self) {
        let _ = self.0.send(Report::DumpRequested);
    }
}

/// The signal that asks hull-vmm for a dump of its vCPUs' state.
pub const DUMP_SIGNAL: libc::c_int = libc::SIGUSR2;

fn dump_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set they are given, a local here.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, DUMP_SIGNAL);
        set
    }
}

/// Blocks [`DUMP_SIGNAL`] in the calling thread and so in every thread it starts afterwards: call
/// it first thing in `main`, before any thread exists, so that the signal (whose default action
/// would end the process) waits for [`serve_dump_signal`].
pub fn block_dump_signal() -> std::io::Result<()> {
    let set = dump_sigset();
    // SAFETY: changes only this thread's signal mask, from a valid set.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// Serves [`DUMP_SIGNAL`] (blocked by [`block_dump_signal`]) on a thread of its own: each one
/// asks the VM for a dump of its vCPUs' state, in the log.
pub fn serve_dump_signal(trigger: DumpTrigger) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("dump-signal".into())
        .spawn(move || loop {
            let set = dump_sigset();
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait reads a valid set and writes the signal number into a local.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!("SIGUSR2: dumping the vCPUs' state");
                trigger.request();
            }
        })
        .map(drop)
}

/// A booted microVM.
pub struct Vmm {
    pub(crate) vcpus: Vec<JoinHandle<()>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) events: Receiver<Report>,
    pub(crate) dump: DumpTrigger,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    /// The console's last lines when it is off (`--console off`).
    pub(crate) console_tail: Option<ConsoleTail>,
    pub(crate) event_loop: crate::event_loop::EventLoop,
    // Kept alive for as long as the vCPUs run: KVM maps this memory.
    pub(crate) _vm: VmFd,
    pub(crate) _mem: GuestMemoryMmap,
    pub(crate) _memfd: std::fs::File,
    /// When the VMM started building this VM.
    pub started: Instant,
}

impl Vmm {
    /// A handle that asks this VM for a dump of its vCPUs' state (served while [`Vmm::wait`] runs).
    pub fn dump_trigger(&self) -> DumpTrigger {
        self.dump.clone()
    }

    /// Blocks until the guest ends, then stops every vCPU thread and flushes the console. Dump
    /// requests that come meanwhile are served: every vCPU is kicked out of `KVM_RUN` to log its
    /// state.
    pub fn wait(mut self) -> VmEvent {
        let event = loop {
            match self
                .events
                .recv()
                .expect("the VMM holds a sender for as long as vCPUs run")
            {
                Report::Ended(event) => break event,
                Report::DumpRequested => {
                    self.kick_for_dump();
                    self.log_console_tail("on request (SIGUSR2)");
                }
            }
        };
        self.stop_vcpus();
        self.event_loop.stop();
        self.serial.lock().expect("serial lock").drain();
        match &event {
            Ok(ExitReason::PowerOff | ExitReason::BackendGone) => {}
            Ok(ExitReason::Reboot | ExitReason::TripleFault) | Err(_) => {
                self.log_console_tail("at the guest's end")
            }
        }
        tracing::debug!(
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            ?event,
            "VM ended"
        );
        event
    }

    /// Logs the kept console lines (with the console off: otherwise they are already out).
    fn log_console_tail(&self, when: &str) {
        let Some(tail) = &self.console_tail else {
            return;
        };
        let lines = tail.lines();
        if lines.is_empty() {
            return;
        }
        tracing::warn!(
            "the guest console's last {} lines {when} (the console is off; `--console stdout` \
             or `file:PATH` keeps all of it):\n{}",
            lines.len(),
            lines.join("\n")
        );
    }

    fn kick_for_dump(&self) {
        request_state_dump();
        // A kick that lands just before a vCPU enters KVM_RUN is lost (as in stop_vcpus): kick a
        // few times. A vCPU logs once per request, however often it is kicked.
        for _ in 0..3 {
            for handle in &self.vcpus {
                let _ = handle.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop_vcpus(&mut self) {
        self.stop.store(true, Ordering::Release);
        for handle in self.vcpus.drain(..) {
            // A kick can land just before the thread re-enters KVM_RUN: repeat until it ends.
            while !handle.is_finished() {
                let _ = handle.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = handle.join();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
