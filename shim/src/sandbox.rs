//! One sandbox (pod): its directory under the state dir, the shared directory, virtiofsd, the
//! `hull-vmm` child process, its host cgroup, and the agent client; started once, torn down once.
//!
//! Layout of `<state_dir>/<sandbox id>/`:
//! - `shared/`: what virtiofsd serves as tag [`SHARED_TAG`]; a mount point of its own
//!   (a bind of itself, made shared) so that rootfs mounts made under it after virtiofsd started
//!   propagate into virtiofsd's mount namespace. The guest sees it at `/run/hull/shared`.
//!   Container `C` gets `shared/C/rootfs` and `shared/C/mounts/N`;
//! - `vsock.sock`: hull-vmm's hybrid-vsock socket (the agent is at port 1024 behind it);
//! - `virtiofsd.sock`, `vmm.pid`, `virtiofsd.pid`: for `delete` after the shim died.
//!
//! While the sandbox runs, its agent is checked for liveness ([`Sandbox::spawn_liveness_watch`]):
//! a guest that stops answering is killed like one that died, so no task waits on it forever.
//!
//! hull-vmm runs as a child process, not in the shim's address space: a VMM crash (or a
//! `kill -9` of it) is then something the shim sees and reports as the tasks' exit, the VMM can be
//! confined on its own, and its vCPU threads never share the shim's runtime.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hull_agent_api::client::{connect_watching, process_alive, thread_states, AgentClient, Target};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::{Config, SharedFsMode, Sizing};
use crate::hostcg::HostCgroup;
use crate::mount;

/// The virtio-fs tag of the sandbox's share.
pub const SHARED_TAG: &str = "hullshared";
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARED: &str = "/run/hull/shared";

/// A sandbox could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A file system step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A helper process could not be started.
    #[error("cannot start {program} ({path}): {source}")]
    Spawn {
        /// virtiofsd or hull-vmm.
        program: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// virtiofsd did not come up.
    #[error("virtiofsd ({path}) did not start: {why}")]
    Virtiofsd {
        /// Its path.
        path: PathBuf,
        /// What happened (its log).
        why: String,
    },
    /// Another sandbox of the same id runs (the same id in another containerd namespace).
    #[error("a sandbox named {id} is already running on this host ({dir}): Hull keeps one sandbox per id across containerd namespaces; use another id")]
    InUse {
        /// The sandbox id.
        id: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// The VM never got to a working agent.
    #[error("the sandbox VM did not come up: {why}")]
    Boot {
        /// What the client and hull-vmm said.
        why: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SandboxError + 'a {
    move |source| SandboxError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A running sandbox.
pub struct Sandbox {
    /// Its id (the sandbox container's id, or a standalone container's).
    pub id: String,
    /// `<state_dir>/<id>`.
    pub dir: PathBuf,
    /// The host side of the share (`dir/shared`); `None` with shared_fs mode "none".
    pub shared: Option<PathBuf>,
    /// The VMM's pid.
    pub vmm_pid: u32,
    /// Set once hull-vmm has ended: its exit status as text.
    pub vmm_exit: watch::Receiver<Option<String>>,
    virtiofsd: std::sync::Mutex<Option<Child>>,
    /// The agent.
    pub agent: AgentClient,
    /// The sandbox's host cgroup (shim, hull-vmm, virtiofsd).
    cgroup: std::sync::Mutex<Option<HostCgroup>>,
    /// Set when [`Sandbox::stop`] begins: the guest going quiet is then expected.
    stopping: AtomicBool,
}

/// The smallest free block a guest reports to the host (a page order: 2^N pages of 4 KiB).
/// Linux's default is 2 MiB (order 9), the host's huge page, so a 2 MiB block the guest uses only
/// part of is never given back. Measured in the harness (one idle sandbox, settled PSS of shim,
/// hull-vmm and virtiofsd, medians): order 9: 49.9 MiB, 7: 42.3, 5: 36.5, 4: 38.2, 2: 36.4. Order 5
/// (128 KiB) is where it stops falling; the host then splits the huge pages those blocks are in.
pub const PAGE_REPORTING_ORDER: u32 = 5;

/// The guest's kernel command line for a sandbox.
fn cmdline(cfg: &Config, shared: bool) -> String {
    // As hull-vmm's default (`cryptomgr.notests`: the guest's crypto self-tests are 0.3 s of its
    // boot), with quiet or debug as configured.
    let mut c = String::from("console=ttyS0 reboot=k panic=-1 pci=off cryptomgr.notests");
    c.push_str(if cfg.hypervisor.debug_console {
        " hull.debug"
    } else {
        " quiet"
    });
    if shared {
        c.push_str(&format!(" agent.shared_fs={SHARED_TAG}"));
    }
    if cfg.hypervisor.free_page_reporting {
        c.push_str(&format!(
            " page_reporting.page_reporting_order={PAGE_REPORTING_ORDER}"
        ));
    }
    if !cfg.hypervisor.kernel_params.is_empty() {
        c.push(' ');
        c.push_str(&cfg.hypervisor.kernel_params);
    }
    c
}

/// How long a hung guest's hull-vmm gets to log its vCPUs' state (SIGUSR2) before it is killed.
const DUMP_GRACE: Duration = Duration::from_millis(500);

/// The directory of sandbox `id`.
pub fn sandbox_dir(cfg: &Config, id: &str) -> PathBuf {
    cfg.runtime.state_dir.join(id)
}

impl Sandbox {
    /// Starts sandbox `id` sized `size`: directories, virtiofsd, hull-vmm, then waits for the
    /// agent. On failure everything started is stopped again.
    pub async fn start(
        cfg: &Config,
        namespace: &str,
        id: &str,
        size: Sizing,
    ) -> Result<Self, SandboxError> {
        let dir = sandbox_dir(cfg, id);
        claim_dir(id, namespace, &dir)?;
        // The shim joins the sandbox's cgroup first: what it spawns starts in there.
        let cgroup = HostCgroup::create(id, &[]);
        let mut fsd = None;
        let mut shared = None;
        let result = Self::start_in(cfg, id, size, &dir, &mut fsd, &mut shared).await;
        match result {
            Ok(sb) => {
                *sb.cgroup.lock().unwrap_or_else(|e| e.into_inner()) = cgroup;
                Ok(sb)
            }
            Err(e) => {
                if let Some(mut f) = fsd {
                    let _ = f.start_kill();
                    let _ = f.wait().await;
                }
                cleanup_dir(&dir);
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                Err(e)
            }
        }
    }

    async fn start_in(
        cfg: &Config,
        id: &str,
        size: Sizing,
        dir: &Path,
        fsd_slot: &mut Option<Child>,
        shared_slot: &mut Option<PathBuf>,
    ) -> Result<Self, SandboxError> {
        let use_fs = cfg.shared_fs.mode == SharedFsMode::VirtioFs;
        let fs_socket = dir.join("virtiofsd.sock");
        if use_fs {
            let shared = dir.join("shared");
            std::fs::create_dir_all(&shared).map_err(io("create the shared directory", &shared))?;
            mount::make_shared_mountpoint(&shared)
                .map_err(io("make a shared mount point of", &shared))?;
            *shared_slot = Some(shared.clone());
            *fsd_slot = Some(spawn_virtiofsd(cfg, dir, &shared, &fs_socket)?);
        }
        let uds = dir.join("vsock.sock");
        let vmm_bin = &cfg.hypervisor.path;
        // A warm sandbox's shim changes its log when a pod adopts it: hull-vmm's output then
        // goes through a pipe the shim copies to its log of the moment.
        let forward = id.starts_with(crate::warm::BOOTING);
        let mut cmd = Command::new(vmm_bin);
        cmd.arg("--kernel")
            .arg(&cfg.hypervisor.kernel)
            .arg("--initrd")
            .arg(&cfg.hypervisor.initrd)
            .args(["--vcpus", &size.vcpus.to_string()])
            .args(["--memory", &size.memory_mib.to_string()])
            .args(["--cmdline", &cmdline(cfg, use_fs)])
            .arg("--vsock-uds")
            .arg(&uds)
            .stdin(Stdio::null())
            // The shim's stderr is containerd's shim log: the VMM's complaints go there, and
            // the console too when debugging.
            .stderr(if forward {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        if cfg.hypervisor.debug_console {
            cmd.args(["--console", "stdout"]);
            if forward {
                cmd.stdout(Stdio::piped());
            } else {
                cmd.stdout(Stdio::from(
                    std::io::stderr()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(io("duplicate stderr for", vmm_bin))?,
                ));
            }
        } else {
            cmd.args(["--console", "off"]).stdout(Stdio::null());
        }
        if cfg.hypervisor.free_page_reporting {
            cmd.arg("--free-page-reporting");
        }
        if use_fs {
            cmd.arg("--fs")
                .arg(format!("tag={SHARED_TAG},socket={}", fs_socket.display()));
        }
        die_with_the_shim(&mut cmd);
        let mut vmm = cmd.spawn().map_err(|source| SandboxError::Spawn {
            program: "hull-vmm",
            path: vmm_bin.clone(),
            source,
        })?;
        if let Some(out) = vmm.stdout.take() {
            tokio::spawn(forward_to_log(out));
        }
        if let Some(err) = vmm.stderr.take() {
            tokio::spawn(forward_to_log(err));
        }
        let pid = vmm.id().unwrap_or(0);
        let _ = std::fs::write(dir.join("vmm.pid"), pid.to_string());
        let target = Target::HybridVsock {
            uds,
            port: hull_agent_api::DEFAULT_AGENT_PORT,
        };
        let deadline = Instant::now() + Duration::from_secs(cfg.runtime.agent_timeout);
        let agent = match connect_watching(&target, deadline, process_alive(pid)).await {
            Ok(a) => a,
            Err(e) => {
                // Whether the VM is still up (the agent did not answer in time) or ended. When we
                // stop a VM that is up, virtiofsd then exits 0 because its frontend went away:
                // that is a consequence, not the cause, and must not be reported as one.
                let vmm_was_up = matches!(vmm.try_wait(), Ok(None));
                let fsd_ended_first = vmm_was_up && virtiofsd_ended(fsd_slot);
                let _ = vmm.start_kill();
                let status = vmm.wait().await.ok();
                if !vmm_was_up || fsd_ended_first {
                    if let Some(e) = virtiofsd_failure(cfg, dir, fsd_slot).await {
                        return Err(e);
                    }
                }
                return Err(SandboxError::Boot {
                    why: format!(
                        "{e}{}",
                        status
                            .map(|s| format!(
                                "; hull-vmm ended: {s} (its words are in the shim log)"
                            ))
                            .unwrap_or_default()
                    ),
                });
            }
        };
        if cfg.hypervisor.debug_console {
            // Not on the start path: only for the log.
            let a = agent.clone();
            tokio::spawn(async move {
                if let Ok(d) = a.guest_details().await {
                    tracing::info!(kernel = %d.kernel_release, "guest details");
                }
            });
        }
        // One task owns the child and reports its end to whoever watches.
        let (tx, vmm_exit) = watch::channel(None);
        tokio::spawn(async move {
            let st = vmm.wait().await;
            let text = match st {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            tracing::info!(pid, status = %text, "hull-vmm ended");
            let _ = tx.send(Some(text));
        });
        Ok(Self {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            shared: shared_slot.take(),
            vmm_pid: pid,
            vmm_exit,
            virtiofsd: std::sync::Mutex::new(fsd_slot.take()),
            agent,
            cgroup: std::sync::Mutex::new(None),
            stopping: AtomicBool::new(false),
        })
    }

    /// Ends the guest and waits for hull-vmm to be gone, stops virtiofsd, and removes the sandbox
    /// directory. The agent answers DestroySandbox once the guest's file systems are synced;
    /// hull-vmm is then killed at once, as Kata stops its hypervisor: the guest's own unmounting
    /// and power-off would only add to the container's delete (about 150 ms of it in the
    /// harness). A guest that does not answer within `grace` gets `grace` more to power off
    /// before it is killed.
    pub async fn stop(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        if self.vmm_exit.borrow().is_none() {
            let synced = matches!(
                tokio::time::timeout(grace, self.agent.destroy_sandbox()).await,
                Ok(Ok(()))
            );
            let mut exit = self.vmm_exit.clone();
            if synced {
                self.kill_vmm();
            }
            if tokio::time::timeout(grace, exit.wait_for(Option::is_some))
                .await
                .is_err()
            {
                self.kill_vmm();
                let _ = exit.wait_for(Option::is_some).await;
            }
        }
        let fsd = self
            .virtiofsd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut f) = fsd {
            let _ = f.start_kill();
            let _ = f.wait().await;
        }
        cleanup_dir(&self.dir);
        let cg = self.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(cg) = cg {
            cg.remove();
        }
    }
}

impl Sandbox {
    /// Renames the sandbox's directory to that of `id` (a warm sandbox that finished booting:
    /// `.boot-…` to `.warm-…`). Its sockets and mounts move with it; the VM's connections are
    /// made already.
    pub fn rename(&mut self, cfg: &Config, id: &str) -> Result<(), SandboxError> {
        let to = sandbox_dir(cfg, id);
        std::fs::rename(&self.dir, &to).map_err(io("rename the sandbox directory", &self.dir))?;
        self.moved(cfg, id);
        self.rehome_cgroup(id);
        Ok(())
    }

    fn moved(&mut self, cfg: &Config, id: &str) {
        self.id = id.to_string();
        self.dir = sandbox_dir(cfg, id);
        if self.shared.is_some() {
            self.shared = Some(self.dir.join("shared"));
        }
    }

    /// A warm sandbox becomes pod `id`'s in `namespace`: its directory (which the claimer
    /// renamed to `id`'s already), its owner mark, its host cgroup (`hull/<id>`: hull-vmm,
    /// virtiofsd and the shim move there; what was charged to the warm cgroup stays with
    /// `hull/`).
    pub fn adopt(&mut self, cfg: &Config, id: &str, namespace: &str) -> Result<(), SandboxError> {
        self.moved(cfg, id);
        let owner = self.dir.join(OWNER_FILE);
        std::fs::write(&owner, namespace).map_err(io("write", &owner))?;
        self.rehome_cgroup(id);
        Ok(())
    }

    fn rehome_cgroup(&self, id: &str) {
        let mut cg = self.cgroup.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cg) = cg.as_mut() {
            cg.rehome(id);
        }
    }

    /// The sandbox's host processes: its cgroup's (the shim, hull-vmm, virtiofsd and its
    /// sandboxed child); without a cgroup, hull-vmm's and virtiofsd's.
    pub fn processes(&self) -> Vec<u32> {
        let cg = self.cgroup.lock().unwrap_or_else(|e| e.into_inner());
        match cg.as_ref() {
            Some(cg) => cg.procs(),
            None => {
                let fsd = self.virtiofsd.lock().unwrap_or_else(|e| e.into_inner());
                [Some(self.vmm_pid), fsd.as_ref().and_then(|c| c.id())]
                    .into_iter()
                    .flatten()
                    .collect()
            }
        }
    }

    /// Whether hull-vmm is still running.
    pub fn vmm_alive(&self) -> bool {
        self.vmm_exit.borrow().is_none()
    }

    /// Watches a running guest: every `interval` its agent must answer `Check` within `limit`.
    /// One that does not is hung (a wedged guest kernel or agent, a stopped VMM): hull-vmm is
    /// killed, and the VM's end is then reported as for a VM that died (every task ends with 255),
    /// instead of containerd waiting forever on a guest that will never answer. Kata's sandbox
    /// monitor does the same. Ends with the VM, or when the sandbox is being stopped.
    pub fn spawn_liveness_watch(self: &Arc<Self>, interval: Duration, limit: Duration) {
        let me = Arc::downgrade(self);
        let mut vmm_exit = self.vmm_exit.clone();
        // The client's own timeout is the limit: a Check that outlasts it is an error.
        let agent = self.agent.clone().with_timeout(limit);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = vmm_exit.wait_for(Option::is_some) => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let answer = agent.check().await;
                let Some(sb) = me.upgrade() else { return };
                if sb.stopping.load(Ordering::SeqCst) || !sb.vmm_alive() {
                    return;
                }
                let why = match answer {
                    Ok(_) => continue,
                    Err(e) => e.to_string(),
                };
                tracing::error!(
                    sandbox = %sb.id,
                    vmm_pid = sb.vmm_pid,
                    vmm_threads = %thread_states(sb.vmm_pid),
                    "the guest agent failed its liveness check ({why}): the guest is hung; killing hull-vmm, every task in it ends with 255"
                );
                // First hull-vmm logs where each vCPU is (into this log), then it dies.
                sb.signal_vmm(libc::SIGUSR2);
                tokio::time::sleep(DUMP_GRACE).await;
                sb.kill_vmm();
                return;
            }
        });
    }

    /// SIGKILLs hull-vmm (while it has not been reaped, its pid is still ours).
    pub fn kill_vmm(&self) {
        self.signal_vmm(libc::SIGKILL);
    }

    fn signal_vmm(&self, signal: libc::c_int) {
        if self.vmm_alive() && self.vmm_pid > 1 {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.vmm_pid as i32, signal) };
        }
    }
}

/// Copies `from` line by line to the shim's stderr, whatever that is when the line comes.
async fn forward_to_log(from: impl tokio::io::AsyncRead + Unpin) {
    use std::io::Write as _;
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

/// Starts virtiofsd on `shared` without waiting for it: the shim binds `socket` itself and hands
/// virtiofsd the listener (`--fd=3`), so hull-vmm can connect at once and its vhost-user
/// handshake simply waits in the backlog while virtiofsd sets up its sandbox. The shim keeps no
/// copy of the listener: if virtiofsd dies, the pending connection is reset and hull-vmm fails
/// instead of waiting forever ([`virtiofsd_failure`] then names virtiofsd as the cause).
fn spawn_virtiofsd(
    cfg: &Config,
    dir: &Path,
    shared: &Path,
    socket: &Path,
) -> Result<Child, SandboxError> {
    let bin = &cfg.shared_fs.virtiofsd;
    let log_path = dir.join("virtiofsd.log");
    let log = std::fs::File::create(&log_path).map_err(io("create", &log_path))?;
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .map_err(io("bind virtiofsd's socket", socket))?;
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--fd={VIRTIOFSD_FD}"))
        .arg(format!("--shared-dir={}", shared.display()))
        .arg(format!("--cache={}", cfg.shared_fs.cache))
        .args(["--sandbox=namespace", "--log-level=error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    let fd = listener.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe; `fd` stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if fd == VIRTIOFSD_FD {
                // Already in place: only the close-on-exec flag must go.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, VIRTIOFSD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    die_with_the_shim(&mut cmd);
    let child = cmd.spawn().map_err(|source| SandboxError::Spawn {
        program: "virtiofsd",
        path: bin.clone(),
        source,
    })?;
    drop(listener);
    let _ = std::fs::write(
        dir.join("virtiofsd.pid"),
        child.id().unwrap_or(0).to_string(),
    );
    Ok(child)
}

/// The descriptor virtiofsd gets its listening socket on.
const VIRTIOFSD_FD: i32 = 3;

/// Whether virtiofsd has exited already (without waiting).
fn virtiofsd_ended(fsd: &mut Option<Child>) -> bool {
    fsd.as_mut()
        .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
}

/// After a failed boot: if virtiofsd died, why (its status and log), as the error to report (a VM
/// that failed to come up because its file server did is virtiofsd's failure). It is given a
/// moment to be reaped: hull-vmm may see its socket close just before virtiofsd's exit is final.
async fn virtiofsd_failure(
    cfg: &Config,
    dir: &Path,
    fsd: &mut Option<Child>,
) -> Option<SandboxError> {
    let status = tokio::time::timeout(Duration::from_millis(500), fsd.as_mut()?.wait())
        .await
        .ok()?
        .ok()?;
    Some(SandboxError::Virtiofsd {
        path: cfg.shared_fs.virtiofsd.clone(),
        why: format!(
            "it exited ({status}): {}",
            std::fs::read_to_string(dir.join("virtiofsd.log"))
                .unwrap_or_default()
                .trim()
        ),
    })
}

/// The child gets SIGKILL when the shim dies (PR_SET_PDEATHSIG; the shim runs one thread, the
/// one that spawns, so "the parent thread died" is "the shim died"). A `kill -9` of the shim
/// then leaves no VM behind, and `delete` only has mounts and directories to clean.
fn die_with_the_shim(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Unmounts whatever is left under the sandbox directory and removes it.
pub fn cleanup_dir(dir: &Path) {
    mount::unmount_all_under(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), "cannot remove the sandbox directory: {e}");
        }
    }
}

/// The processes a sandbox directory's pid files name that still run and still are what a
/// sandbox started (hull-vmm, virtiofsd: checked by their executable's name).
fn live_pids(dir: &Path) -> Vec<i32> {
    [("vmm.pid", "hull-vmm"), ("virtiofsd.pid", "virtiofsd")]
        .into_iter()
        .filter_map(|(file, name)| {
            let pid = std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .filter(|&p| p > 1)?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            exe.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(name))
                .then_some(pid)
        })
        .collect()
}

/// Kills the processes the pid files of `dir` name, if they still are hull-vmm and virtiofsd.
pub fn kill_recorded(dir: &Path) {
    for pid in live_pids(dir) {
        // SAFETY: kill(2) with a pid we checked is the process a sandbox started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The file in a sandbox directory naming the containerd namespace that owns it.
const OWNER_FILE: &str = "namespace";

/// Whether sandbox `id`'s directory is `namespace`'s (or there is none): a `delete` from another
/// namespace, for a container of the same id whose create was refused, must not touch it.
pub fn owned_by(cfg: &Config, id: &str, namespace: &str) -> bool {
    match std::fs::read_to_string(sandbox_dir(cfg, id).join(OWNER_FILE)) {
        Ok(owner) => owner == namespace,
        Err(_) => true,
    }
}

/// Creates the sandbox's directory, which must be this sandbox's alone, and marks it as
/// `namespace`'s. A directory left by a dead sandbox of the same id is cleaned and taken; one
/// whose hull-vmm or virtiofsd still runs (the same id in another containerd namespace) is
/// refused and left untouched.
fn claim_dir(id: &str, namespace: &str, dir: &Path) -> Result<(), SandboxError> {
    claim_empty_dir(id, dir)?;
    let owner = dir.join(OWNER_FILE);
    std::fs::write(&owner, namespace).map_err(io("write", &owner))
}

fn claim_empty_dir(id: &str, dir: &Path) -> Result<(), SandboxError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io("create the state directory", parent))?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !live_pids(dir).is_empty() {
                return Err(SandboxError::InUse {
                    id: id.to_string(),
                    dir: dir.to_path_buf(),
                });
            }
            tracing::info!(dir = %dir.display(), "taking over the directory of a dead sandbox");
            cleanup_dir(dir);
            std::fs::create_dir(dir).map_err(io("create the sandbox directory", dir))
        }
        other => other.map_err(io("create the sandbox directory", dir)),
    }
}

/// What `delete` does when the shim is gone: kill the sandbox's processes (by their pid files,
/// checking they still are what we started) and remove its directory.
pub fn force_cleanup(cfg: &Config, id: &str, namespace: &str) {
    if !owned_by(cfg, id, namespace) {
        tracing::info!(
            sandbox = id,
            namespace,
            "the sandbox directory is another namespace's: left alone"
        );
        return;
    }
    let dir = sandbox_dir(cfg, id);
    kill_recorded(&dir);
    cleanup_dir(&dir);
    crate::hostcg::force_remove(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_or_dead_sandbox_directory_is_taken_a_live_one_refused() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("ns-a").join("sb1");
        claim_dir("sb1", "ns-a", &dir).unwrap();
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::read_to_string(dir.join(OWNER_FILE)).unwrap(),
            "ns-a"
        );

        // Left by a dead sandbox: its pid files name nothing that runs.
        std::fs::write(dir.join("vmm.pid"), "999999999").unwrap();
        std::fs::write(dir.join("left-over"), "x").unwrap();
        claim_dir("sb1", "ns-b", &dir).unwrap();
        assert!(
            !dir.join("left-over").exists(),
            "the dead sandbox's files were cleaned"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(OWNER_FILE)).unwrap(),
            "ns-b"
        );

        // A running "hull-vmm" (a copy of sleep under that name) owns it: refused, untouched.
        let exe = state.path().join("hull-vmm-stand-in");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let mut vmm = std::process::Command::new(&exe).arg("60").spawn().unwrap();
        std::fs::write(dir.join("vmm.pid"), vmm.id().to_string()).unwrap();
        std::fs::write(dir.join("theirs"), "x").unwrap();
        let e = claim_dir("sb1", "ns-c", &dir).unwrap_err();
        let _ = vmm.kill();
        let _ = vmm.wait();
        assert!(matches!(e, SandboxError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("use another id"), "{e}");
        assert!(
            dir.join("theirs").exists(),
            "a live sandbox's directory was touched"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(OWNER_FILE)).unwrap(),
            "ns-b"
        );
    }
}
