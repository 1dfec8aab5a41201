//! virtio-fs (device id 26) as a vhost-user frontend: the file system server is a separate
//! process (virtiofsd) that maps guest RAM itself and serves the queues directly; this device only
//! sets it up and announces the tag.
//!
//! - At build time ([`VhostUserFs::connect`]) it connects to the backend's Unix socket, takes
//!   ownership (`SET_OWNER`) and reads its virtio and protocol features. What the guest is offered
//!   is the backend's transport features we understand ([`GUEST_FEATURES`]).
//! - At activation (DRIVER_OK, on a vCPU thread) it hands the backend the acked features, the
//!   memory table (every region of the memfd that backs guest RAM, with its fd: the backend maps
//!   the same pages), and per queue: size, ring addresses (as this process's virtual addresses,
//!   which the backend translates through the memory table), base 0, the queue's KVM ioeventfd as
//!   the kick and the device's irqfd as the call, then enables the rings. From then on guest and
//!   backend talk without this process.
//! - Interrupts: the backend signals the irqfd directly and cannot set the transport's
//!   InterruptStatus, so the device makes the "used ring" bit sticky ([`Interrupt::set_sticky`]):
//!   the guest driver then checks its queues on every interrupt, as it must.
//! - If the backend goes away (its socket hangs up), [`BackendWatch`] on the event loop reports
//!   it through the VMM's exit channel: the VM is torn down with an error naming the backend,
//!   rather than left with a file system that hangs.

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;

use super::{
    device_type, ActivateArgs, ActivateError, InterruptType, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::vmm::{ExitNotifier, ExitReason};

/// `VIRTIO_RING_F_INDIRECT_DESC`.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// The transport features passed through from the backend to the guest.
pub const GUEST_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// The longest tag (the config space's `tag[36]`).
pub const MAX_TAG: usize = 36;

/// Queues: one high-priority queue and one request queue.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, too long or not printable ASCII.
    #[error("virtio-fs tag {0:?}: want 1 to 36 printable ASCII characters")]
    Tag(String),
    /// The backend socket could not be reached.
    #[error("cannot connect to the virtio-fs backend (virtiofsd) at {path}: {source}; is virtiofsd running with --socket-path={path}?")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: vhost::Error,
    },
    /// The backend refused the set-up.
    #[error("virtio-fs backend at {path}: {what}: {source}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// The request.
        what: &'static str,
        /// Why.
        source: vhost::Error,
    },
    /// The backend lacks a feature the device needs.
    #[error("virtio-fs backend at {0}: it does not offer VIRTIO_F_VERSION_1")]
    NotModern(PathBuf),
}

/// The virtio-fs device.
pub struct VhostUserFs {
    tag: String,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    config: [u8; MAX_TAG + 4],
}

impl VhostUserFs {
    /// Connects to the backend at `socket` and negotiates what can be before the guest boots.
    pub fn connect(tag: &str, socket: &Path) -> Result<Self, FsError> {
        check_tag(tag)?;
        let err = |what| {
            let path = socket.to_path_buf();
            move |source| FsError::Protocol { path, what, source }
        };
        let mut frontend =
            Frontend::connect(socket, QUEUE_SIZES.len() as u64).map_err(|source| {
                FsError::Connect {
                    path: socket.to_path_buf(),
                    source,
                }
            })?;
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NotModern(socket.to_path_buf()));
        }
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(offered & wanted)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
        }
        Ok(Self {
            tag: tag.to_owned(),
            socket: socket.to_path_buf(),
            frontend,
            backend_features,
            protocol,
            config: config_space(tag, (QUEUE_SIZES.len() - 1) as u32),
        })
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// A watcher of the backend's socket for the event loop.
    pub fn watch(&self, exit: ExitNotifier) -> BackendWatch {
        BackendWatch {
            fd: self.frontend.as_raw_fd(),
            exit,
            socket: self.socket.clone(),
        }
    }

    fn setup(&mut self, args: &ActivateArgs) -> Result<(), String> {
        let e = |what: &'static str| move |err: vhost::Error| format!("{what}: {err}");
        let mut features = args.acked_features & self.backend_features;
        if self.protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(e("SET_FEATURES"))?;
        let regions = args
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(e("guest memory is not file-backed"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;
        let host = |a: GuestAddress| -> Result<u64, String> {
            args.mem
                .get_host_address(a)
                .map(|p| p as u64)
                .map_err(|err| format!("ring address {:#x}: {err}", a.0))
        };
        let irqfd = args.interrupt.irqfd();
        for (i, (q, kick)) in args.queues.iter().zip(&args.queue_evts).enumerate() {
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(GuestAddress(q.desc_table()))?,
                used_ring_addr: host(GuestAddress(q.used_ring()))?,
                avail_ring_addr: host(GuestAddress(q.avail_ring()))?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(e("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &ring)
                .map_err(e("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(e("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, irqfd)
                .map_err(e("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, kick)
                .map_err(e("SET_VRING_KICK"))?;
        }
        if self.protocol {
            for i in 0..args.queues.len() {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(e("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

/// Checks a tag: 1 to 36 printable ASCII characters.
pub fn check_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > MAX_TAG || !tag.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FsError::Tag(tag.to_owned()));
    }
    Ok(())
}

/// The config space: `tag[36]` (NUL-padded), then `num_request_queues` (le32).
fn config_space(tag: &str, request_queues: u32) -> [u8; MAX_TAG + 4] {
    let mut c = [0u8; MAX_TAG + 4];
    c[..tag.len()].copy_from_slice(tag.as_bytes());
    c[MAX_TAG..].copy_from_slice(&request_queues.to_le_bytes());
    c
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.backend_features & GUEST_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        if args.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: args.queues.len(),
            });
        }
        args.interrupt.set_sticky(InterruptType::Queue);
        self.setup(&args).map_err(|m| {
            ActivateError::Device(format!(
                "virtio-fs backend at {}: {m}",
                self.socket.display()
            ))
        })
    }

    fn reset(&mut self) {
        // A driver reset: stop the rings (the backend keeps its state until the next activation
        // sets everything again).
        if self.protocol {
            for i in 0..QUEUE_SIZES.len() {
                let _ = self.frontend.set_vring_enable(i, false);
            }
        }
        for i in 0..QUEUE_SIZES.len() {
            let _ = self.frontend.get_vring_base(i);
        }
    }
}

/// Watches the backend's socket on the event loop; a hang-up ends the VM.
pub struct BackendWatch {
    fd: RawFd,
    exit: ExitNotifier,
    socket: PathBuf,
}

impl MutEventSubscriber for BackendWatch {
    fn init(&mut self, ops: &mut EventOps) {
        // Only the hang-up: replies on this socket are read by the frontend itself.
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::READ_HANG_UP)) {
            tracing::error!(error = ?e, "cannot watch the virtio-fs backend's socket");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        if set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
            tracing::error!(socket = %self.socket.display(), "the virtio-fs backend went away");
            let _ = ops.remove(events);
            self.exit.exit(ExitReason::BackendGone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert!(check_tag("hull").is_ok());
        assert!(check_tag(&"a".repeat(36)).is_ok());
        assert!(check_tag("").is_err());
        assert!(check_tag(&"a".repeat(37)).is_err());
        assert!(check_tag("with space").is_err());
        assert!(check_tag("tab\t").is_err());
    }

    #[test]
    fn config_space_layout() {
        let c = config_space("shared", 1);
        assert_eq!(&c[..6], b"shared");
        assert!(c[6..MAX_TAG].iter().all(|&b| b == 0));
        assert_eq!(&c[MAX_TAG..], &1u32.to_le_bytes());
    }

    #[test]
    fn connect_errors_name_the_socket() {
        let e = VhostUserFs::connect("t", Path::new("/nonexistent/virtiofsd.sock"))
            .err()
            .unwrap();
        let m = e.to_string();
        assert!(
            m.contains("/nonexistent/virtiofsd.sock") && m.contains("virtiofsd"),
            "{m}"
        );
        assert!(matches!(
            VhostUserFs::connect("bad tag", Path::new("/x"))
                .err()
                .unwrap(),
            FsError::Tag(_)
        ));
    }
}
