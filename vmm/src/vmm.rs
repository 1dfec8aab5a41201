//! A running microVM: its vCPU threads, devices and memory, and how it ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use crate::devices::legacy::serial::SerialDevice;
use crate::kvm::vcpu::{kick_signal, VcpuError};

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

/// A handle through which devices and vCPUs end the VM. The first report wins.
#[derive(Clone)]
pub struct ExitNotifier(Sender<VmEvent>);

impl ExitNotifier {
    /// A notifier and the receiver the VMM waits on.
    pub fn new() -> (Self, Receiver<VmEvent>) {
        let (tx, rx) = channel();
        (Self(tx), rx)
    }

    /// The guest ended for `reason`.
    pub fn exit(&self, reason: ExitReason) {
        // The receiver is gone only when the VMM is already tearing down.
        let _ = self.0.send(Ok(reason));
    }

    /// A vCPU failed.
    pub fn fail(&self, err: VcpuError) {
        let _ = self.0.send(Err(err));
    }
}

/// A booted microVM.
pub struct Vmm {
    pub(crate) vcpus: Vec<JoinHandle<()>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) events: Receiver<VmEvent>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) event_loop: crate::event_loop::EventLoop,
    // Kept alive for as long as the vCPUs run: KVM maps this memory.
    pub(crate) _vm: VmFd,
    pub(crate) _mem: GuestMemoryMmap,
    pub(crate) _memfd: std::fs::File,
    /// When the VMM started building this VM.
    pub started: Instant,
}

impl Vmm {
    /// Blocks until the guest ends, then stops every vCPU thread and flushes the console.
    pub fn wait(mut self) -> VmEvent {
        let event = self
            .events
            .recv()
            .expect("the VMM holds a sender for as long as vCPUs run");
        self.stop_vcpus();
        self.event_loop.stop();
        self.serial.lock().expect("serial lock").drain();
        tracing::debug!(
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            ?event,
            "VM ended"
        );
        event
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
