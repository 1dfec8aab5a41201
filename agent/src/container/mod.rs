//! The containers of a sandbox: each built from its OCI runtime spec by youki's libcontainer, in a
//! single-threaded helper process ([`helper`], [`launch`]), with its processes' streams
//! ([`stdio`]), exit statuses (from the agent's reaper) and cgroup ([`cgroup`]).
//!
//! [`Containers`] is the registry the RPCs use. State on disk, under the agent's state directory:
//! `containers/` (libcontainer's state root), `bundles/<id>/` (the `config.json` libcontainer
//! reads, and the exec processes' JSON), `consoles/` (the sockets a terminal process's pty master
//! arrives on). Each container's cgroup is `<cgroup parent>/<id>` unless its spec says otherwise.

pub mod cgroup;
pub mod helper;
pub mod launch;
pub mod spec;
pub mod stdio;

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use libcontainer::container::{Container as LcContainer, ContainerStatus};
use nix::sys::signal::Signal;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use tokio::sync::watch;

use self::cgroup::{Cgroup, OomQueue, OomWatch, Stats};
use self::helper::Request;
use self::launch::{LaunchError, Launched};
use self::stdio::{Pipes, Stream};
use crate::error::AgentError;
use crate::reaper::Reaper;

/// Held while libcontainer starts a container in the agent's process. Its start connects to the
/// container's notify socket by changing the process's working directory to the container's state
/// directory and back (`NotifySocket`: socket paths are limited to 108 bytes). The working
/// directory is the whole process's: two starts at once on the agent's threads would connect to
/// each other's sockets and could leave the agent in a directory since removed (seen: "failed to
/// get cwd" under 50 concurrent starts). Creating runs in a helper process of its own.
static CWD: Mutex<()> = Mutex::new(());

/// The largest read or write of a stream.
pub const MAX_IO: usize = 1 << 20;

/// How long RemoveContainer waits for killed processes to be reaped.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

/// Where the registry keeps its state.
#[derive(Debug, Clone)]
pub struct Config {
    /// The agent's state directory (`/run/hull` in the guest).
    pub state_dir: PathBuf,
    /// The cgroup containers go under (`/hull` in the guest).
    pub cgroup_parent: String,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The shell's status: the code, or 128 + the signal.
    pub status: i32,
    /// When the agent saw it.
    pub at: SystemTime,
}

/// One process of a container (its init or an exec'd one).
#[derive(Debug)]
pub struct Process {
    pid: i32,
    exit: watch::Receiver<Option<ExitInfo>>,
    stdin: Mutex<Option<Arc<Stream>>>,
    stdout: Option<(Arc<Stream>, tokio::sync::Mutex<()>)>,
    stderr: Option<(Arc<Stream>, tokio::sync::Mutex<()>)>,
    /// The pty master, for a terminal process.
    tty: Option<Arc<Stream>>,
}

impl Process {
    fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }
}

/// One container.
#[derive(Debug)]
pub struct Container {
    id: String,
    cgroup: Cgroup,
    has_hooks: bool,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Option<Arc<Process>>>>,
    oom: Option<(Arc<OomWatch>, tokio::task::AbortHandle)>,
}

/// A registry slot: being created (the id is taken), or built.
#[derive(Debug)]
enum Slot {
    Creating,
    Ready(Arc<Container>),
}

/// The registry.
#[derive(Debug)]
pub struct Containers {
    cfg: Config,
    reaper: Reaper,
    map: Mutex<HashMap<String, Slot>>,
    oom: Arc<OomQueue>,
}

fn internal(e: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it aborts the process (panic = "abort"): no poisoned state to see.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl From<LaunchError> for AgentError {
    fn from(e: LaunchError) -> Self {
        AgentError::Internal(e.to_string())
    }
}

/// What a new process gets for stdio.
struct NewStdio {
    /// The helper's stdio (the process's, unless it has a terminal).
    child: [Option<OwnedFd>; 3],
    ours: [Option<Stream>; 3],
    /// The console socket the pty master arrives on.
    console: Option<(tokio::net::UnixListener, PathBuf)>,
}

impl Containers {
    /// An empty registry; makes the state directories.
    pub fn new(cfg: Config, reaper: Reaper) -> Result<Arc<Self>, crate::error::ServeError> {
        for d in ["containers", "bundles", "consoles"] {
            let dir = cfg.state_dir.join(d);
            std::fs::create_dir_all(&dir).map_err(|source| {
                crate::error::ServeError::Containers {
                    what: format!("state directory {}", dir.display()),
                    source,
                }
            })?;
        }
        Ok(Arc::new(Self {
            cfg,
            reaper,
            map: Mutex::new(HashMap::new()),
            oom: Arc::new(OomQueue::default()),
        }))
    }

    fn root(&self) -> PathBuf {
        self.cfg.state_dir.join("containers")
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("bundles").join(id)
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        spec::check_id("container_id", id).map_err(AgentError::InvalidArgument)?;
        match lock(&self.map).get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Creating) => Err(AgentError::FailedPrecondition(format!(
                "container {id} is being created"
            ))),
            None => Err(AgentError::NotFound(format!("no container {id}"))),
        }
    }

    fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>), AgentError> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            let p = c.init.clone();
            return Ok((c, p));
        }
        let p = match lock(&c.execs).get(exec_id) {
            Some(Some(p)) => p.clone(),
            Some(None) => {
                return Err(AgentError::FailedPrecondition(format!(
                    "process {exec_id} of container {id} is being started"
                )))
            }
            None => {
                return Err(AgentError::NotFound(format!(
                    "no process {exec_id} in container {id}"
                )))
            }
        };
        Ok((c, p))
    }

    fn stdio(&self, name: &str, terminal: bool, stdin: bool) -> Result<NewStdio, AgentError> {
        if terminal {
            let path = self
                .cfg
                .state_dir
                .join("consoles")
                .join(format!("{name}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|e| internal(format!("console socket {}: {e}", path.display())))?;
            return Ok(NewStdio {
                child: [None, None, None],
                ours: [None, None, None],
                console: Some((listener, path)),
            });
        }
        let p = Pipes::new(stdin).map_err(|e| internal(format!("stdio pipes: {e}")))?;
        Ok(NewStdio {
            child: p.child,
            ours: p.ours,
            console: None,
        })
    }

    /// Runs `request` in a helper; for a process-making request, builds its [`Process`].
    async fn launch(&self, request: Request, io: NewStdio) -> Result<Arc<Process>, AgentError> {
        let NewStdio {
            child,
            ours,
            console,
        } = io;
        let result = launch::run(&self.reaper, &request, child).await;
        let launched = match result {
            Ok(Some(l)) => l,
            Ok(None) => return Err(internal("the helper made no process")),
            Err(e) => {
                if let Some((_, path)) = &console {
                    let _ = std::fs::remove_file(path);
                }
                return Err(match e {
                    LaunchError::Failed(m) => AgentError::Failed(m),
                    other => other.into(),
                });
            }
        };
        let tty = match console {
            Some((listener, path)) => {
                let master = receive_pty(&listener).await;
                let _ = std::fs::remove_file(&path);
                Some(Arc::new(
                    Stream::new(master.map_err(|e| internal(format!("pty master: {e}")))?)
                        .map_err(internal)?,
                ))
            }
            None => None,
        };
        Ok(self.watch(launched, ours, tty))
    }

    fn watch(
        &self,
        launched: Launched,
        ours: [Option<Stream>; 3],
        tty: Option<Arc<Stream>>,
    ) -> Arc<Process> {
        let [stdin, stdout, stderr] = ours;
        let (tx, rx) = watch::channel(None);
        let proc = Arc::new(Process {
            pid: launched.pid,
            exit: rx,
            stdin: Mutex::new(match &tty {
                Some(t) => Some(t.clone()),
                None => stdin.map(Arc::new),
            }),
            stdout: match &tty {
                Some(t) => Some((t.clone(), tokio::sync::Mutex::new(()))),
                None => stdout.map(|s| (Arc::new(s), tokio::sync::Mutex::new(()))),
            },
            stderr: stderr.map(|s| (Arc::new(s), tokio::sync::Mutex::new(()))),
            tty,
        });
        let exit = launched.exit;
        tokio::spawn(async move {
            let status = match exit.await {
                Ok(e) => e.as_shell_status(),
                Err(_) => 255,
            };
            tx.send_replace(Some(ExitInfo {
                status,
                at: SystemTime::now(),
            }));
        });
        proc
    }

    /// CreateContainer.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &str,
        rootfs: &str,
        stdin: bool,
    ) -> Result<(), AgentError> {
        spec::check_id("container_id", id).map_err(AgentError::InvalidArgument)?;
        let mut spec = spec::parse_spec(spec_json, rootfs).map_err(AgentError::InvalidArgument)?;
        {
            let mut map = lock(&self.map);
            if map.contains_key(id) {
                return Err(AgentError::AlreadyExists(format!(
                    "container {id} exists already"
                )));
            }
            map.insert(id.to_owned(), Slot::Creating);
        }
        let result = self.build(id, &mut spec, stdin).await;
        let mut map = lock(&self.map);
        match result {
            Ok(c) => {
                map.insert(id.to_owned(), Slot::Ready(c));
                Ok(())
            }
            Err(e) => {
                map.remove(id);
                let _ = std::fs::remove_dir_all(self.bundle(id));
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        id: &str,
        spec: &mut oci_spec::runtime::Spec,
        stdin: bool,
    ) -> Result<Arc<Container>, AgentError> {
        let cgroup_path = spec::cgroups_path(spec, &self.cfg.cgroup_parent, id);
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let has_hooks = spec.hooks().is_some();
        let bundle = self.bundle(id);
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| internal(format!("bundle {}: {e}", bundle.display())))?;
        spec.save(bundle.join("config.json"))
            .map_err(|e| internal(format!("write {}/config.json: {e}", bundle.display())))?;

        cgroup::prepare_ancestors(&cgroup_path).map_err(|e| {
            internal(format!(
                "create the parent cgroup of {}: {e}",
                cgroup_path.display()
            ))
        })?;
        let io = self.stdio(id, terminal, stdin)?;
        let console_socket = io.console.as_ref().map(|(_, p)| p.clone());
        let init = self
            .launch(
                Request::Create {
                    id: id.to_owned(),
                    root: self.root(),
                    bundle: bundle.clone(),
                    console_socket,
                },
                io,
            )
            .await?;
        let cgroup = Cgroup::new(cgroup_path, id);
        let oom = match OomWatch::start(&cgroup, self.oom.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(container = id, error = %e, "no OOM events for this container");
                None
            }
        };
        let c = Arc::new(Container {
            id: id.to_owned(),
            cgroup,
            has_hooks,
            init,
            execs: Mutex::new(HashMap::new()),
            oom,
        });
        tracing::info!(container = id, pid = c.init.pid, "created");
        Ok(c)
    }

    fn load(&self, id: &str) -> Result<LcContainer, AgentError> {
        LcContainer::load(self.root().join(id))
            .map_err(|e| internal(format!("load container {id}'s state: {e}")))
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<(), AgentError> {
        let c = self.get(id)?;
        if c.init.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} has stopped"
            )));
        }
        if c.has_hooks {
            launch::run(
                &self.reaper,
                &Request::Start {
                    id: id.to_owned(),
                    root: self.root(),
                },
                [None, None, None],
            )
            .await
            .map_err(|e| match e {
                LaunchError::Failed(m) => AgentError::FailedPrecondition(m),
                other => other.into(),
            })?;
            return Ok(());
        }
        let mut lc = self.load(id)?;
        if !lc.can_start() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is {:?}, not created: it starts once",
                lc.status()
            )));
        }
        // Blocking (a socket connect and state file writes), and serialised: see [`CWD`].
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let _cwd = CWD
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            lc.start()
                .map_err(|e| AgentError::Failed(format!("start container {id}: {e}")))
        })
        .await
        .map_err(|e| internal(format!("the start task failed: {e}")))?
    }

    /// ExecProcess.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &str,
        stdin: bool,
    ) -> Result<(), AgentError> {
        let c = self.get(id)?;
        spec::check_id("exec_id", exec_id).map_err(AgentError::InvalidArgument)?;
        let process = spec::parse_process(process_json).map_err(AgentError::InvalidArgument)?;
        if c.init.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} has stopped"
            )));
        }
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(exec_id) {
                return Err(AgentError::AlreadyExists(format!(
                    "process {exec_id} exists already in container {id}"
                )));
            }
            execs.insert(exec_id.to_owned(), None);
        }
        let result = self.exec_inner(id, exec_id, &process, stdin).await;
        let mut execs = lock(&c.execs);
        match result {
            Ok(p) => {
                execs.insert(exec_id.to_owned(), Some(p));
                Ok(())
            }
            Err(e) => {
                execs.remove(exec_id);
                Err(e)
            }
        }
    }

    async fn exec_inner(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        stdin: bool,
    ) -> Result<Arc<Process>, AgentError> {
        let path = self.bundle(id).join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(process).map_err(internal)?;
        std::fs::write(&path, json)
            .map_err(|e| internal(format!("write {}: {e}", path.display())))?;
        let terminal = process.terminal().unwrap_or(false);
        let io = self.stdio(&format!("{id}.{exec_id}"), terminal, stdin)?;
        let console_socket = io.console.as_ref().map(|(_, p)| p.clone());
        let p = self
            .launch(
                Request::Exec {
                    id: id.to_owned(),
                    root: self.root(),
                    process: path.clone(),
                    console_socket,
                },
                io,
            )
            .await;
        let _ = std::fs::remove_file(&path);
        p
    }

    /// SignalProcess.
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("signal {signal}: no such signal"))
            })?;
        if all {
            let c = self.get(id)?;
            let paused = matches!(
                self.load(id).map(|l| l.status()),
                Ok(ContainerStatus::Paused)
            );
            return c.cgroup.signal_all(sig, paused).map_err(internal);
        }
        let (_, p) = self.process(id, exec_id)?;
        if p.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "process {} of container {id} has ended",
                display_exec(exec_id)
            )));
        }
        nix::sys::signal::kill(Pid::from_raw(p.pid), sig).map_err(|errno| AgentError::Sys {
            what: "kill",
            errno,
        })
    }

    /// WaitProcess.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo, AgentError> {
        let (c, p) = self.process(id, exec_id)?;
        let mut rx = p.exit.clone();
        let info = match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => (*e).unwrap_or(ExitInfo {
                status: 255,
                at: SystemTime::now(),
            }),
            Err(_) => return Err(internal("the process's watcher is gone")),
        };
        if let Some((oom, _)) = &c.oom {
            oom.check();
        }
        Ok(info)
    }

    /// ReadStdout (`stderr` false) / ReadStderr.
    pub async fn read(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        len: u32,
    ) -> Result<Vec<u8>, AgentError> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len == 0 || len > MAX_IO {
            return Err(AgentError::InvalidArgument(format!(
                "len {len}: want 1..={MAX_IO}"
            )));
        }
        let (_, p) = self.process(id, exec_id)?;
        let which = if stderr { &p.stderr } else { &p.stdout };
        let Some((stream, order)) = which else {
            // A terminal process has no separate stderr: the pty carries both.
            return Ok(Vec::new());
        };
        let _turn = order.lock().await;
        stream
            .read(len)
            .await
            .map_err(|e| internal(format!("read the process's output: {e}")))
    }

    /// WriteStdin.
    pub async fn write(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<u32, AgentError> {
        if data.len() > MAX_IO {
            return Err(AgentError::InvalidArgument(format!(
                "{} bytes: at most {MAX_IO} per write",
                data.len()
            )));
        }
        let (_, p) = self.process(id, exec_id)?;
        let stream = lock(&p.stdin).clone().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "process {} of container {id} has no open stdin",
                display_exec(exec_id)
            ))
        })?;
        stream
            .write_all(data)
            .await
            .map_err(|e| AgentError::Failed(format!("write the process's stdin: {e}")))?;
        Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
    }

    /// CloseStdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let (_, p) = self.process(id, exec_id)?;
        let stream = lock(&p.stdin).take();
        if let (Some(s), Some(_)) = (stream, &p.tty) {
            // A pty has no end of file of its own: the line discipline's EOF character.
            s.write_all(&[0x04])
                .await
                .map_err(|e| AgentError::Failed(format!("write ^D to the pty: {e}")))?;
        }
        Ok(())
    }

    /// TtyWinResize.
    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        let (rows, columns) = match (u16::try_from(rows), u16::try_from(columns)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => {
                return Err(AgentError::InvalidArgument(format!(
                    "{rows}x{columns}: at most 65535x65535"
                )))
            }
        };
        let (_, p) = self.process(id, exec_id)?;
        let tty = p.tty.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "process {} of container {id} has no terminal",
                display_exec(exec_id)
            ))
        })?;
        stdio::set_winsize(tty.raw_fd(), rows, columns)
            .map_err(|e| internal(format!("TIOCSWINSZ: {e}")))
    }

    /// RemoveContainer.
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let c = self.get(id)?;
        let live = c.cgroup.pids().unwrap_or_default();
        let started = !matches!(
            self.load(id).map(|l| l.status()),
            Ok(ContainerStatus::Created)
        );
        if !force && !live.is_empty() && started {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} has {} live process(es): stop them, or remove with force",
                live.len()
            )));
        }
        {
            let mut map = lock(&self.map);
            match map.get(id) {
                Some(Slot::Ready(_)) => {
                    map.insert(id.to_owned(), Slot::Creating);
                }
                _ => return Err(AgentError::NotFound(format!("no container {id}"))),
            }
        }
        let result = self.remove_inner(&c).await;
        let mut map = lock(&self.map);
        match result {
            Ok(()) => {
                map.remove(id);
                tracing::info!(container = id, "removed");
                Ok(())
            }
            Err(e) => {
                map.insert(id.to_owned(), Slot::Ready(c));
                Err(e)
            }
        }
    }

    async fn remove_inner(&self, c: &Arc<Container>) -> Result<(), AgentError> {
        let id = &c.id;
        if c.has_hooks {
            launch::run(
                &self.reaper,
                &Request::Delete {
                    id: id.clone(),
                    root: self.root(),
                    force: true,
                },
                [None, None, None],
            )
            .await?;
        } else {
            let mut lc = self.load(id)?;
            lc.delete(true)
                .map_err(|e| internal(format!("delete container {id}: {e}")))?;
        }
        // Every process of the container is dead or dying: wait until the reaper has them all
        // (the init last in its PID namespace), so nothing is left when this returns.
        let mut procs: Vec<Arc<Process>> = vec![c.init.clone()];
        procs.extend(lock(&c.execs).values().flatten().cloned());
        for p in procs {
            let mut rx = p.exit.clone();
            if tokio::time::timeout(REMOVE_WAIT, rx.wait_for(|e| e.is_some()))
                .await
                .is_err()
            {
                return Err(internal(format!(
                    "process {} of container {id} did not end within {REMOVE_WAIT:?} of SIGKILL",
                    p.pid
                )));
            }
        }
        if let Some((_, task)) = &c.oom {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(self.bundle(id));
        Ok(())
    }

    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<Stats, AgentError> {
        self.get(id)?.cgroup.stats().map_err(internal)
    }

    /// PauseContainer (`true`) / ResumeContainer.
    pub fn pause(&self, id: &str, pause: bool) -> Result<(), AgentError> {
        self.get(id)?;
        let mut lc = self.load(id)?;
        let r = if pause { lc.pause() } else { lc.resume() };
        r.map_err(|e| {
            AgentError::FailedPrecondition(format!(
                "{} container {id}: {e}",
                if pause { "pause" } else { "resume" }
            ))
        })
    }

    /// UpdateContainer.
    pub fn update(&self, id: &str, resources_json: &str) -> Result<(), AgentError> {
        let c = self.get(id)?;
        if resources_json.len() > spec::MAX_JSON {
            return Err(AgentError::InvalidArgument(format!(
                "resources_json is {} bytes (at most {})",
                resources_json.len(),
                spec::MAX_JSON
            )));
        }
        let r: LinuxResources = serde_json::from_str(resources_json).map_err(|e| {
            AgentError::InvalidArgument(format!("resources_json is not OCI LinuxResources: {e}"))
        })?;
        c.cgroup.update(&r).map_err(AgentError::Failed)
    }

    /// ListProcesses.
    pub fn pids(&self, id: &str) -> Result<Vec<i32>, AgentError> {
        self.get(id)?.cgroup.pids().map_err(internal)
    }

    /// GetOOMEvent.
    pub async fn next_oom(&self) -> String {
        self.oom.next().await
    }

    /// Kills and removes every container (a host-mode agent's shutdown), then its cgroup parent.
    pub async fn remove_all(&self) {
        let ids: Vec<String> = lock(&self.map).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove(&id, true).await {
                tracing::warn!(container = %id, error = %e, "not removed at shutdown");
            }
        }
    }
}

fn display_exec(exec_id: &str) -> &str {
    if exec_id.is_empty() {
        "init"
    } else {
        exec_id
    }
}

/// Accepts the connection libcontainer made to `listener` and takes the pty master it sent.
async fn receive_pty(listener: &tokio::net::UnixListener) -> io::Result<OwnedFd> {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "no connection on the console socket",
            )
        })??;
    let std = stream.into_std()?;
    std.set_nonblocking(false)?;
    std.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    use std::os::fd::AsRawFd as _;
    let msg = recvmsg::<UnixAddr>(
        std.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                for &extra in &fds[1..] {
                    drop(take_fd(extra));
                }
                return Ok(take_fd(fd));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no fd in the console socket's message",
    ))
}

fn take_fd(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: the fd came to this process in an SCM_RIGHTS message just received: nothing else
    // owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Where the sandbox's shared directory (virtio-fs) is mounted in the guest: container rootfs
/// and volumes are under it.
pub const SHARED_DIR: &str = "/run/hull/shared";

/// Mounts the virtio-fs `tag` on [`SHARED_DIR`].
pub fn mount_shared(tag: &str) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    std::fs::create_dir_all(SHARED_DIR).map_err(|e| format!("mkdir {SHARED_DIR}: {e}"))?;
    mount(
        Some(tag),
        SHARED_DIR,
        Some("virtiofs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|errno| {
        format!(
            "mount virtio-fs {tag:?} on {SHARED_DIR}: {errno} (does the VM have a virtio-fs device \
             with this tag, and is its virtiofsd running?)"
        )
    })
}

/// The agent's default state directory and cgroup parent in each mode.
pub fn guest_config() -> Config {
    Config {
        state_dir: Path::new("/run/hull").to_path_buf(),
        cgroup_parent: "/hull".into(),
    }
}
