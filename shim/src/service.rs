//! The containerd Task service: containerd's calls, in terms of the sandbox VM and its agent.
//!
//! State: one optional sandbox (started by the first Create of a standalone or sandbox
//! container), and the containers in it, each with its processes (`""` is the init). A started
//! process has a waiter task: WaitProcess in the guest (or the VMM's death, which ends every
//! process with status 255), then the end of its output streams, then the exit is recorded and
//! TaskExit published. So an exit is never reported before the output is delivered.
//!
//! Every call's errors are ttrpc statuses whose message says what failed on which container;
//! containerd shows them to the user (`ctr: …`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::{self as api, Status};
use containerd_shim_protos::cgroups_v2::metrics as m2;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageField, MessageFull};
use containerd_shim_protos::shim_async::Task;
use hull_agent_api::agent;
use hull_agent_api::agent_ttrpc::AgentServiceClient;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError};

use crate::config::{self, Config};
use crate::events::{self, Event, Publisher};
use crate::io;
use crate::mount::{self, MountSpec};
use crate::sandbox::Sandbox;
use crate::spec::{self, Role};

/// How long output may keep flowing after a process ended before its exit is reported anyway
/// (a daemonized grandchild can hold an exec's stdout open forever).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Exit status of processes of a VM that died.
const VM_DIED_STATUS: u32 = 255;

fn status(code: Code, msg: impl Into<String>) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn agent_err(what: &str, id: &str, e: TtrpcError) -> TtrpcError {
    match e {
        TtrpcError::RpcStatus(s) => status(
            s.code(),
            format!("{what} {id} in the sandbox VM: {}", s.message()),
        ),
        other => status(
            Code::UNAVAILABLE,
            format!("{what} {id}: the sandbox VM's agent did not answer: {other}"),
        ),
    }
}

fn rpc() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

/// Output pumps by (container, exec).
type PumpMap = HashMap<(String, String), Vec<JoinHandle<u64>>>;

/// One exit.
#[derive(Debug, Clone)]
struct Exit {
    status: u32,
    at: Timestamp,
}

/// A process known to containerd.
struct Proc {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// An exec's OCI process JSON, until it is started.
    exec_spec: Option<String>,
    state: Status,
    exit: watch::Sender<Option<Exit>>,
    stdin_pump: Option<JoinHandle<()>>,
}

impl Proc {
    fn new(stdin: String, stdout: String, stderr: String, terminal: bool) -> Self {
        Self {
            stdin,
            stdout,
            stderr,
            terminal,
            exec_spec: None,
            state: Status::CREATED,
            exit: watch::channel(None).0,
            stdin_pump: None,
        }
    }

    fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }
}

struct Container {
    bundle: String,
    /// Its directory in the share (`<shared>/<id>`), if any.
    shared_dir: Option<PathBuf>,
    procs: HashMap<String, Proc>,
}

#[derive(Default)]
struct State {
    sandbox: Option<Arc<Sandbox>>,
    containers: HashMap<String, Container>,
    config: Option<Arc<Config>>,
}

/// The service; one per shim process.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    publisher: Publisher,
    state: Mutex<State>,
    /// Serializes sandbox start and stop.
    sandbox_lock: tokio::sync::Mutex<()>,
    shutdown: Arc<Notify>,
    /// Output pumps of processes created but not yet started, by (container, exec).
    pumps: Mutex<PumpMap>,
    /// A warm sandbox this shim was adopted with, and its key, until the first Create takes it.
    warm: Mutex<Option<(String, Sandbox)>>,
}

impl Service {
    /// A service for `namespace`, publishing through `publisher`; `shutdown` is notified when
    /// containerd asks the shim to go.
    pub fn new(namespace: String, publisher: Publisher, shutdown: Arc<Notify>) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace,
                publisher,
                state: Mutex::new(State::default()),
                sandbox_lock: tokio::sync::Mutex::new(()),
                shutdown,
                pumps: Mutex::new(HashMap::new()),
                warm: Mutex::new(None),
            }),
        }
    }

    /// Gives the service a booted sandbox (a warm one a pod's `start` claimed for this shim),
    /// booted with the configuration key `key`: the first Create uses it if its configuration
    /// and size give the same key.
    pub fn set_warm(&self, key: String, sb: Sandbox) {
        *self.inner.warm.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, sb));
    }

    fn take_warm(&self) -> Option<(String, Sandbox)> {
        self.inner
            .warm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Stops a warm sandbox no Create used (the shim is going).
    pub async fn drop_warm(&self) {
        if let Some((_, sb)) = self.take_warm() {
            sb.stop(Duration::from_secs(10)).await;
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox(&self) -> Result<Arc<Sandbox>, TtrpcError> {
        self.state()
            .sandbox
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "this shim has no sandbox VM"))
    }

    fn agent(&self) -> Result<AgentServiceClient, TtrpcError> {
        Ok(self.sandbox()?.agent.raw().clone())
    }

    fn vmm_pid(&self) -> u32 {
        self.state().sandbox.as_ref().map_or(0, |s| s.vmm_pid)
    }

    /// Runs `f` on process `exec` of container `id`.
    fn with_proc<T>(
        &self,
        id: &str,
        exec: &str,
        f: impl FnOnce(&mut Proc, &mut Container) -> Result<T, TtrpcError>,
    ) -> Result<T, TtrpcError> {
        let mut st = self.state();
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))?;
        // Split the borrow: take the process out, run, put it back.
        let mut p = c.procs.remove(exec).ok_or_else(|| {
            status(
                Code::NOT_FOUND,
                format!("process {exec:?} of container {id} not found"),
            )
        })?;
        let r = f(&mut p, c);
        c.procs.insert(exec.to_string(), p);
        r
    }

    /// The configuration: read at the first Create (containerd's options may name the file).
    fn config(&self, options: Option<&Any>) -> Result<Arc<Config>, TtrpcError> {
        if let Some(c) = self.state().config.clone() {
            return Ok(c);
        }
        let named = options.and_then(config_path_option);
        let (path, required) = config::locate(named.as_deref());
        let cfg = Config::load(&path, required)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let cfg = Arc::new(cfg);
        self.state().config = Some(cfg.clone());
        Ok(cfg)
    }

    async fn ensure_sandbox(
        &self,
        cfg: &Config,
        id: &str,
        role: &Role,
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> Result<Arc<Sandbox>, TtrpcError> {
        let _guard = self.inner.sandbox_lock.lock().await;
        if let Some(sb) = self.state().sandbox.clone() {
            return match role {
                Role::PodContainer { sandbox_id } if *sandbox_id == sb.id => Ok(sb),
                Role::PodContainer { sandbox_id } => Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {id} belongs to sandbox {sandbox_id}, but this shim runs sandbox {}", sb.id),
                )),
                _ => Err(status(
                    Code::ALREADY_EXISTS,
                    format!("this shim already runs sandbox {}; {id} cannot start another", sb.id),
                )),
            };
        }
        if let Role::PodContainer { sandbox_id } = role {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {id} joins sandbox {sandbox_id}, which this shim does not run"),
            ));
        }
        cfg.check_files()
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let size = cfg
            .sizing(annotations)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let t = std::time::Instant::now();
        let mut warm = None;
        if let Some((key, w)) = self.take_warm() {
            if key == crate::warm::key(cfg, size) && w.id == id {
                warm = Some(w);
            } else {
                tracing::info!(
                    sandbox = id,
                    vcpus = size.vcpus,
                    memory_mib = size.memory_mib,
                    "the warm sandbox does not fit this pod (configuration or size): booting one"
                );
                w.stop(Duration::from_secs(10)).await;
            }
        }
        let was_warm = warm.is_some();
        let started = match warm {
            Some(w) => Ok(w),
            None => Sandbox::start(cfg, &self.inner.namespace, id, size).await,
        };
        let sb = started.map_err(|e| {
            let code = match e {
                crate::sandbox::SandboxError::InUse { .. } => Code::ALREADY_EXISTS,
                _ => Code::INTERNAL,
            };
            status(code, e.to_string())
        })?;
        tracing::info!(
            sandbox = id,
            vcpus = size.vcpus,
            memory_mib = size.memory_mib,
            ms = t.elapsed().as_millis() as u64,
            warm = was_warm,
            "sandbox VM up"
        );
        let sb = Arc::new(sb);
        self.state().sandbox = Some(sb.clone());
        self.spawn_vm_watch(sb.clone());
        self.spawn_oom_watch(sb.clone());
        if cfg.runtime.agent_check_interval > 0 {
            sb.spawn_liveness_watch(
                Duration::from_secs(cfg.runtime.agent_check_interval),
                Duration::from_secs(cfg.runtime.agent_check_timeout),
            );
        }
        Ok(sb)
    }

    /// When hull-vmm ends, every process still running in it has ended too.
    fn spawn_vm_watch(&self, sb: Arc<Sandbox>) {
        let me = self.clone();
        let mut exit = sb.vmm_exit.clone();
        tokio::spawn(async move {
            let _ = exit.wait_for(Option::is_some).await;
            let at = events::now();
            let mut ended = Vec::new();
            {
                let mut st = me.state();
                for (cid, c) in st.containers.iter_mut() {
                    for (eid, p) in c.procs.iter_mut() {
                        if p.exited().is_none() {
                            p.state = Status::STOPPED;
                            p.exit.send_replace(Some(Exit {
                                status: VM_DIED_STATUS,
                                at: at.clone(),
                            }));
                            ended.push((cid.clone(), eid.clone()));
                        }
                    }
                }
            }
            for (cid, eid) in ended {
                tracing::warn!(container = %cid, exec = %eid, "the sandbox VM died: process ended with 255");
                me.publish_exit(&cid, &eid, VM_DIED_STATUS, at.clone());
            }
        });
    }

    /// Long-polls the agent's OOM events and publishes them.
    fn spawn_oom_watch(&self, sb: Arc<Sandbox>) {
        let publisher = self.inner.publisher.clone();
        let agent = sb.agent.raw().clone();
        tokio::spawn(async move {
            loop {
                let res = agent
                    .get_oom_event(
                        ttrpc::context::with_timeout(0),
                        &agent::GetOOMEventRequest::new(),
                    )
                    .await;
                match res {
                    Ok(e) => {
                        let mut o = ev::TaskOOM::new();
                        o.container_id = e.container_id;
                        publisher.publish(Event::Oom(o));
                    }
                    Err(_) if !sb.vmm_alive() => return,
                    Err(e) => {
                        tracing::debug!("GetOOMEvent: {e:?}");
                        if !sb.vmm_alive() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
    }

    fn publish_exit(&self, cid: &str, eid: &str, code: u32, at: Timestamp) {
        let mut e = ev::TaskExit::new();
        e.container_id = cid.to_string();
        e.id = if eid.is_empty() {
            cid.to_string()
        } else {
            eid.to_string()
        };
        e.pid = self.vmm_pid();
        e.exit_status = code;
        e.exited_at = MessageField::some(at);
        self.inner.publisher.publish(Event::Exit(e));
    }

    /// Starts the waiter of a process that just started in the guest; `pumps` are its output
    /// pumps, joined before the exit is recorded.
    fn spawn_waiter_with(&self, cid: &str, eid: &str, pumps: Vec<JoinHandle<u64>>) {
        let Ok(sb) = self.sandbox() else { return };
        let agent = sb.agent.raw().clone();
        let me = self.clone();
        let (cid, eid) = (cid.to_string(), eid.to_string());
        let mut vm_exit = sb.vmm_exit.clone();
        tokio::spawn(async move {
            let mut req = agent::ProcessRequest::new();
            req.container_id = cid.clone();
            req.exec_id = eid.clone();
            let waited = tokio::select! {
                r = agent.wait_process(ttrpc::context::with_timeout(0), &req) => Some(r),
                _ = vm_exit.wait_for(Option::is_some) => None,
            };
            let (code, at) = match waited {
                Some(Ok(w)) => (w.status as u32, events::from_unix_ms(w.exited_at_unix_ms)),
                Some(Err(e)) => {
                    tracing::warn!(container = %cid, exec = %eid, "WaitProcess failed: {e:?}");
                    (VM_DIED_STATUS, events::now())
                }
                // The VM watcher reports it.
                None => return,
            };
            // Deliver the output before the exit.
            let drain = futures_join_all(pumps);
            if tokio::time::timeout(DRAIN_LIMIT, drain).await.is_err() {
                tracing::warn!(container = %cid, exec = %eid, "output still open {DRAIN_LIMIT:?} after the exit; reporting the exit");
            }
            let first = me
                .with_proc(&cid, &eid, |p, _| {
                    if p.exited().is_some() {
                        return Ok(false);
                    }
                    p.state = Status::STOPPED;
                    p.exit.send_replace(Some(Exit {
                        status: code,
                        at: at.clone(),
                    }));
                    Ok(true)
                })
                .unwrap_or(false);
            if first {
                tracing::info!(container = %cid, exec = %eid, status = code, "exited");
                me.publish_exit(&cid, &eid, code, at);
            }
        });
    }

    /// Mounts the container's rootfs (containerd's mounts, or the bundle's rootfs directory)
    /// and its bind-mounted volumes into the share; returns `<shared>/<id>`.
    fn share_container(
        sb: &Sandbox,
        id: &str,
        bundle: &Path,
        spec: &serde_json::Value,
        rootfs: &[MountSpec],
        binds: &[spec::HostBind],
    ) -> Result<Option<PathBuf>, TtrpcError> {
        let Some(shared) = &sb.shared else {
            return Ok(None);
        };
        let dir = shared.join(id);
        let fail = |what: &str, p: &Path, e: std::io::Error| {
            status(
                Code::INTERNAL,
                format!("container {id}: {what} {}: {e}", p.display()),
            )
        };
        let target = dir.join("rootfs");
        std::fs::create_dir_all(&target).map_err(|e| fail("create", &target, e))?;
        let result = (|| {
            if rootfs.is_empty() {
                // No snapshot mounts: the spec's root.path, relative to the bundle.
                let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
                let src = bundle.join(root);
                let m = MountSpec {
                    fstype: "bind".into(),
                    source: src.to_string_lossy().into_owned(),
                    options: vec!["rbind".into()],
                };
                mount::mount(&m, &target).map_err(|e| fail("bind the rootfs", &src, e))?;
            } else {
                for m in rootfs {
                    mount::mount(m, &target).map_err(|e| {
                        fail(
                            &format!("mount the rootfs ({} {})", m.fstype, m.source),
                            &target,
                            e,
                        )
                    })?;
                }
            }
            for b in binds {
                let dest = shared.join(&b.shared_rel);
                let meta = std::fs::metadata(&b.source)
                    .map_err(|e| fail("find the bind mount source", &b.source, e))?;
                if meta.is_dir() {
                    std::fs::create_dir_all(&dest).map_err(|e| fail("create", &dest, e))?;
                } else {
                    if let Some(p) = dest.parent() {
                        std::fs::create_dir_all(p).map_err(|e| fail("create", p, e))?;
                    }
                    std::fs::File::create(&dest).map_err(|e| fail("create", &dest, e))?;
                }
                let mut opts = vec!["rbind".to_string()];
                if b.readonly {
                    opts.push("ro".into());
                }
                let m = MountSpec {
                    fstype: "bind".into(),
                    source: b.source.to_string_lossy().into_owned(),
                    options: opts,
                };
                mount::mount(&m, &dest).map_err(|e| fail("bind", &b.source, e))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            unshare_container(&dir);
            return Err(e);
        }
        Ok(Some(dir))
    }

    /// Removes a container from the guest and the host: the agent's RemoveContainer, its
    /// mounts in the share. The last container takes the sandbox VM with it.
    async fn remove_container(&self, id: &str) {
        if let Ok(agent) = self.agent() {
            let mut req = agent::RemoveContainerRequest::new();
            req.container_id = id.to_string();
            req.force = true;
            if let Err(e) = agent.remove_container(rpc(), &req).await {
                tracing::debug!(container = id, "RemoveContainer: {e:?}");
            }
        }
        let (dir, last) = {
            let mut st = self.state();
            let c = st.containers.remove(id);
            for p in c.iter().flat_map(|c| c.procs.values()) {
                if let Some(h) = &p.stdin_pump {
                    h.abort();
                }
            }
            (c.and_then(|c| c.shared_dir), st.containers.is_empty())
        };
        if let Some(d) = dir {
            unshare_container(&d);
        }
        if last {
            self.stop_sandbox().await;
        }
    }

    async fn stop_sandbox(&self) {
        let _guard = self.inner.sandbox_lock.lock().await;
        let sb = self.state().sandbox.take();
        if let Some(sb) = sb {
            let id = sb.id.clone();
            let t = std::time::Instant::now();
            sb.stop(Duration::from_secs(10)).await;
            tracing::info!(sandbox = %id, ms = t.elapsed().as_millis() as u64, "sandbox VM stopped");
        }
    }

    fn bundle_of(&self, id: &str) -> String {
        self.state()
            .containers
            .get(id)
            .map(|c| c.bundle.clone())
            .unwrap_or_default()
    }
}

/// Unmounts everything under `<shared>/<id>` and removes it.
fn unshare_container(dir: &Path) {
    mount::unmount_all_under(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), "cannot remove: {e}");
        }
    }
}

async fn futures_join_all(handles: Vec<JoinHandle<u64>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// The config file named by containerd's runtime options, if any: Kata's
/// `runtimeoptions.v1.Options` (`config_path`, field 2) or runc's `containerd.runc.v1.Options`
/// (`config_path`?), read without their schemas: the first string field that is an absolute
/// path ending in `.toml`.
pub(crate) fn config_path_option(any: &Any) -> Option<String> {
    if any.value.is_empty() {
        return None;
    }
    let mut is = containerd_shim_protos::protobuf::CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                is.read_raw_varint64().ok()?;
            }
            1 => {
                is.read_raw_bytes(8).ok()?;
            }
            5 => {
                is.read_raw_bytes(4).ok()?;
            }
            2 => {
                let s = is.read_bytes().ok()?;
                if let Ok(text) = String::from_utf8(s) {
                    if text.starts_with('/') && text.ends_with(".toml") {
                        tracing::debug!(field, "config path from the runtime options");
                        return Some(text);
                    }
                }
            }
            _ => return None,
        }
    }
    None
}

fn any<M: MessageFull>(m: &M) -> Any {
    let mut a = Any::new();
    a.type_url = M::descriptor().full_name().to_string();
    a.value = m.write_to_bytes().unwrap_or_default();
    a
}

fn metrics(s: &agent::StatsContainerResponse) -> m2::Metrics {
    let mut m = m2::Metrics::new();
    let mut cpu = m2::CPUStat::new();
    cpu.usage_usec = s.cpu.usage_usec;
    cpu.user_usec = s.cpu.user_usec;
    cpu.system_usec = s.cpu.system_usec;
    m.cpu = MessageField::some(cpu);
    let mut mem = m2::MemoryStat::new();
    mem.usage = s.memory.usage_bytes;
    mem.usage_limit = s.memory.limit_bytes;
    mem.max_usage = s.memory.max_usage_bytes;
    m.memory = MessageField::some(mem);
    let mut events = m2::MemoryEvents::new();
    events.oom_kill = s.memory.oom_kills;
    m.memory_events = MessageField::some(events);
    let mut pids = m2::PidsStat::new();
    pids.current = s.pids.current;
    pids.limit = s.pids.limit;
    m.pids = MessageField::some(pids);
    let mut io = m2::IOStat::new();
    let mut e = m2::IOEntry::new();
    e.rbytes = s.io.read_bytes;
    e.wbytes = s.io.write_bytes;
    io.usage.push(e);
    m.io = MessageField::some(io);
    m
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        let since_serve_ms = crate::serve::STARTED
            .get()
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        tracing::info!(container = %id, bundle = %req.bundle, terminal = req.terminal, since_serve_ms, "create");
        let t_create = std::time::Instant::now();
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "Hull does not restore checkpoints (checkpoint/restore is not supported)",
            ));
        }
        if self.state().containers.contains_key(&id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} exists already"),
            ));
        }
        let out_target =
            io::parse_target(&req.stdout).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let err_target =
            io::parse_target(&req.stderr).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let outputs = io::open_outputs(
            &out_target,
            &err_target,
            req.terminal,
            &self.inner.namespace,
            &id,
        )
        .await
        .map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!(
                    "container {id}: cannot open its stdout/stderr ({}, {}): {e}",
                    req.stdout, req.stderr
                ),
            )
        })?;
        let cfg = self.config(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        let mut spec =
            spec::load(&bundle).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let annotations = spec::annotations(&spec);
        let role = spec::role(&annotations);
        let mut sizing_annotations = annotations.clone();
        if role == Role::Standalone {
            spec::limits_as_pod_annotations(&spec, &mut sizing_annotations);
        }
        let sb = self
            .ensure_sandbox(&cfg, &id, &role, &sizing_annotations)
            .await?;
        let binds = spec::for_guest(&mut spec, &id, sb.shared.is_some())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let rootfs: Vec<MountSpec> = req
            .rootfs
            .iter()
            .map(|m| MountSpec {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let fail_early = |e: TtrpcError| async {
            if self.state().containers.is_empty() {
                self.stop_sandbox().await;
            }
            e
        };
        let shared_dir =
            match Self::share_container(&sb, &id, &bundle, &spec_orig(&bundle), &rootfs, &binds) {
                Ok(d) => d,
                Err(e) => return Err(fail_early(e).await),
            };
        let mut creq = agent::CreateContainerRequest::new();
        creq.container_id = id.clone();
        creq.spec_json = spec.to_string();
        creq.rootfs = spec::guest_rootfs(&id);
        creq.stdin = !req.stdin.is_empty();
        let t = std::time::Instant::now();
        let created = sb.agent.raw().create_container(rpc(), &creq).await;
        tracing::info!(container = %id, ms = t.elapsed().as_millis() as u64, ok = created.is_ok(), "CreateContainer in the guest");
        if let Err(e) = created {
            if let Some(d) = &shared_dir {
                unshare_container(d);
            }
            return Err(fail_early(agent_err("create container", &id, e)).await);
        }
        let mut init = Proc::new(
            req.stdin.clone(),
            req.stdout.clone(),
            req.stderr.clone(),
            req.terminal,
        );
        if !req.stdin.is_empty() {
            init.stdin_pump = Some(io::pump_stdin(
                sb.agent.raw().clone(),
                id.clone(),
                String::new(),
                PathBuf::from(&req.stdin),
            ));
        }
        let mut procs = HashMap::new();
        procs.insert(String::new(), init);
        self.state().containers.insert(
            id.clone(),
            Container {
                bundle: req.bundle.clone(),
                shared_dir,
                procs,
            },
        );
        // Output is read from creation on (a fast process may be done before Start returns).
        self.spawn_output_only(&id, "", outputs);
        let mut e = ev::TaskCreate::new();
        e.container_id = id.clone();
        e.bundle = req.bundle.clone();
        e.rootfs = req.rootfs.clone();
        e.io = MessageField::some({
            let mut t = ev::TaskIO::new();
            t.stdin = req.stdin.clone();
            t.stdout = req.stdout.clone();
            t.stderr = req.stderr.clone();
            t.terminal = req.terminal;
            t
        });
        e.pid = sb.vmm_pid;
        self.inner.publisher.publish(Event::Create(e));
        tracing::info!(container = %id, ms = t_create.elapsed().as_millis() as u64, "created");
        let mut resp = api::CreateTaskResponse::new();
        resp.pid = sb.vmm_pid;
        Ok(resp)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        let (id, eid) = (req.id.clone(), req.exec_id.clone());
        let agent = self.agent()?;
        let pid = self.vmm_pid();
        if eid.is_empty() {
            self.with_proc(&id, "", |p, _| match p.state {
                Status::CREATED => Ok(()),
                s => Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {id} is {s:?}, not created"),
                )),
            })?;
            let mut r = agent::ContainerRequest::new();
            r.container_id = id.clone();
            agent
                .start_container(rpc(), &r)
                .await
                .map_err(|e| agent_err("start container", &id, e))?;
            self.with_proc(&id, "", |p, _| {
                p.state = Status::RUNNING;
                Ok(())
            })?;
            self.spawn_exit_waiter(&id, "");
            tracing::info!(container = %id, "started");
            let mut e = ev::TaskStart::new();
            e.container_id = id.clone();
            e.pid = pid;
            self.inner.publisher.publish(Event::Start(e));
        } else {
            let (process_json, stdin, stdout, stderr, terminal) =
                self.with_proc(&id, &eid, |p, _| {
                    let spec = p.exec_spec.take().ok_or_else(|| {
                        status(
                            Code::FAILED_PRECONDITION,
                            format!("exec {eid} of {id} was started already"),
                        )
                    })?;
                    Ok((
                        spec,
                        p.stdin.clone(),
                        p.stdout.clone(),
                        p.stderr.clone(),
                        p.terminal,
                    ))
                })?;
            let out_target =
                io::parse_target(&stdout).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
            let err_target =
                io::parse_target(&stderr).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
            let outputs = io::open_outputs(
                &out_target,
                &err_target,
                terminal,
                &self.inner.namespace,
                &id,
            )
            .await
            .map_err(|e| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("exec {eid} in {id}: cannot open its stdout/stderr: {e}"),
                )
            })?;
            let mut r = agent::ExecProcessRequest::new();
            r.container_id = id.clone();
            r.exec_id = eid.clone();
            r.process_json = process_json;
            r.stdin = !stdin.is_empty();
            if let Err(e) = agent.exec_process(rpc(), &r).await {
                let _ = self.with_proc(&id, &eid, |p, _| {
                    p.state = Status::STOPPED;
                    p.exit.send_replace(Some(Exit {
                        status: 255,
                        at: events::now(),
                    }));
                    Ok(())
                });
                return Err(agent_err(&format!("exec {eid} in container"), &id, e));
            }
            let pump = (!stdin.is_empty()).then(|| {
                io::pump_stdin(
                    agent.clone(),
                    id.clone(),
                    eid.clone(),
                    PathBuf::from(&stdin),
                )
            });
            self.with_proc(&id, &eid, |p, _| {
                p.state = Status::RUNNING;
                p.stdin_pump = pump;
                Ok(())
            })?;
            self.spawn_output_only(&id, &eid, outputs);
            self.spawn_exit_waiter(&id, &eid);
            let mut e = ev::TaskExecStarted::new();
            e.container_id = id.clone();
            e.exec_id = eid.clone();
            e.pid = pid;
            self.inner.publisher.publish(Event::ExecStarted(e));
        }
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        let pid = self.vmm_pid();
        let bundle = self.bundle_of(&req.id);
        self.with_proc(&req.id, &req.exec_id, |p, _| {
            let mut r = api::StateResponse::new();
            r.id = if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            };
            r.exec_id = req.exec_id.clone();
            r.bundle = bundle;
            r.pid = pid;
            r.set_status(p.state);
            r.stdin = p.stdin.clone();
            r.stdout = p.stdout.clone();
            r.stderr = p.stderr.clone();
            r.terminal = p.terminal;
            if let Some(x) = p.exited() {
                r.exit_status = x.status;
                r.exited_at = MessageField::some(x.at);
            }
            Ok(r)
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        let (id, eid) = (req.id.clone(), req.exec_id.clone());
        let state = self.with_proc(&id, &eid, |p, _| Ok(p.state))?;
        if state == Status::STOPPED {
            return Err(status(
                Code::NOT_FOUND,
                format!("process {eid:?} of {id}: process already finished"),
            ));
        }
        if state == Status::CREATED && eid.is_empty() && req.signal == 9 {
            // Never started: nothing runs; the init counts as killed.
            self.with_proc(&id, &eid, |p, _| {
                p.state = Status::STOPPED;
                p.exit.send_replace(Some(Exit {
                    status: 137,
                    at: events::now(),
                }));
                Ok(())
            })?;
            self.publish_exit(&id, &eid, 137, events::now());
            return Ok(Empty::new());
        }
        let mut r = agent::SignalProcessRequest::new();
        r.container_id = id.clone();
        r.exec_id = eid.clone();
        r.signal = req.signal;
        r.all = req.all;
        self.agent()?
            .signal_process(rpc(), &r)
            .await
            .map_err(|e| agent_err("signal", &id, e))?;
        Ok(Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        let (id, eid) = (req.id.clone(), req.exec_id.clone());
        let pid = self.vmm_pid();
        let exit = self.with_proc(&id, &eid, |p, _| match p.state {
            Status::RUNNING | Status::PAUSED => Err(status(
                Code::FAILED_PRECONDITION,
                format!("process {eid:?} of {id} is still running: kill it first"),
            )),
            _ => Ok(p.exited()),
        })?;
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: events::now(),
        });
        if eid.is_empty() {
            let t = std::time::Instant::now();
            self.remove_container(&id).await;
            tracing::info!(container = %id, ms = t.elapsed().as_millis() as u64, "deleted");
            let mut e = ev::TaskDelete::new();
            e.container_id = id.clone();
            e.id = id.clone();
            e.pid = pid;
            e.exit_status = exit.status;
            e.exited_at = MessageField::some(exit.at.clone());
            self.inner.publisher.publish(Event::Delete(e));
        } else {
            let mut st = self.state();
            if let Some(c) = st.containers.get_mut(&id) {
                c.procs.remove(&eid);
            }
        }
        let mut resp = api::DeleteResponse::new();
        resp.pid = pid;
        resp.exit_status = exit.status;
        resp.exited_at = MessageField::some(exit.at);
        Ok(resp)
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let (id, eid) = (req.id.clone(), req.exec_id.clone());
        if eid.is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "an exec needs an exec id"));
        }
        let process_json = String::from_utf8(req.spec.value.clone()).map_err(|_| {
            status(
                Code::INVALID_ARGUMENT,
                format!("exec {eid}: the process spec is not JSON text"),
            )
        })?;
        {
            let mut st = self.state();
            let c = st
                .containers
                .get_mut(&id)
                .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))?;
            if c.procs.contains_key(&eid) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {eid} exists already in {id}"),
                ));
            }
            let mut p = Proc::new(
                req.stdin.clone(),
                req.stdout.clone(),
                req.stderr.clone(),
                req.terminal,
            );
            p.exec_spec = Some(process_json);
            c.procs.insert(eid.clone(), p);
        }
        let mut e = ev::TaskExecAdded::new();
        e.container_id = id;
        e.exec_id = eid;
        self.inner.publisher.publish(Event::ExecAdded(e));
        Ok(Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        let mut r = agent::TtyWinResizeRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.rows = req.height;
        r.columns = req.width;
        self.agent()?
            .tty_win_resize(rpc(), &r)
            .await
            .map_err(|e| agent_err("resize the terminal of", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let pump = self.with_proc(&req.id, &req.exec_id, |p, _| Ok(p.stdin_pump.take()))?;
        // containerd closed its end of the stdin FIFO before calling this: the pump drains what
        // is left, sees the end and closes the process's stdin. Only a pump still stuck (a FIFO
        // nobody ever opened) is cut short.
        if let Some(mut h) = pump {
            if tokio::time::timeout(Duration::from_secs(30), &mut h)
                .await
                .is_err()
            {
                h.abort();
                io::close_stdin(&self.agent()?, &req.id, &req.exec_id).await;
            }
        }
        Ok(Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = req.id.clone();
        let l = self
            .agent()?
            .list_processes(rpc(), &r)
            .await
            .map_err(|e| agent_err("list the processes of", &req.id, e))?;
        let mut resp = api::PidsResponse::new();
        for pid in l.pids {
            let mut info = api::ProcessInfo::new();
            info.pid = pid as u32;
            resp.processes.push(info);
        }
        Ok(resp)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<Empty> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = req.id.clone();
        self.agent()?
            .pause_container(rpc(), &r)
            .await
            .map_err(|e| agent_err("pause", &req.id, e))?;
        let _ = self.with_proc(&req.id, "", |p, _| {
            p.state = Status::PAUSED;
            Ok(())
        });
        let mut e = ev::TaskPaused::new();
        e.container_id = req.id.clone();
        self.inner.publisher.publish(Event::Paused(e));
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = req.id.clone();
        self.agent()?
            .resume_container(rpc(), &r)
            .await
            .map_err(|e| agent_err("resume", &req.id, e))?;
        let _ = self.with_proc(&req.id, "", |p, _| {
            if p.state == Status::PAUSED {
                p.state = Status::RUNNING;
            }
            Ok(())
        });
        let mut e = ev::TaskResumed::new();
        e.container_id = req.id.clone();
        self.inner.publisher.publish(Event::Resumed(e));
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            format!(
                "checkpoint of {}: not supported by Hull (the container runs in a VM)",
                req.id
            ),
        ))
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<Empty> {
        let json = String::from_utf8(req.resources.value.clone()).map_err(|_| {
            status(
                Code::INVALID_ARGUMENT,
                format!("update {}: resources are not JSON text", req.id),
            )
        })?;
        let mut r = agent::UpdateContainerRequest::new();
        r.container_id = req.id.clone();
        r.resources_json = json;
        self.agent()?
            .update_container(rpc(), &r)
            .await
            .map_err(|e| agent_err("update", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        let mut rx = self.with_proc(&req.id, &req.exec_id, |p, _| Ok(p.exit.subscribe()))?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| {
                status(
                    Code::NOT_FOUND,
                    format!("{} was deleted while waiting", req.id),
                )
            })?
            .clone()
            .unwrap_or(Exit {
                status: 255,
                at: events::now(),
            });
        let mut resp = api::WaitResponse::new();
        resp.exit_status = exit.status;
        resp.exited_at = MessageField::some(exit.at);
        Ok(resp)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = req.id.clone();
        let s = self
            .agent()?
            .stats_container(rpc(), &r)
            .await
            .map_err(|e| agent_err("stats of", &req.id, e))?;
        let mut resp = api::StatsResponse::new();
        resp.stats = MessageField::some(any(&metrics(&s)));
        Ok(resp)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let mut r = api::ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = self.vmm_pid();
        r.version = env!("CARGO_PKG_VERSION").into();
        Ok(r)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> ttrpc::Result<Empty> {
        let busy = !self.state().containers.is_empty();
        if busy && !req.now {
            return Ok(Empty::new());
        }
        let ids: Vec<String> = self.state().containers.keys().cloned().collect();
        for id in ids {
            self.remove_container(&id).await;
        }
        self.stop_sandbox().await;
        self.inner.shutdown.notify_one();
        Ok(Empty::new())
    }
}

impl Service {
    fn spawn_output_only(&self, cid: &str, eid: &str, outputs: io::Outputs) {
        // Pumps start now; the waiter that joins them starts with the process.
        let Ok(sb) = self.sandbox() else { return };
        let agent = sb.agent.raw().clone();
        let mut handles = vec![io::pump_output(
            agent.clone(),
            cid.into(),
            eid.into(),
            false,
            outputs.stdout,
        )];
        if let Some(e) = outputs.stderr {
            handles.push(io::pump_output(agent, cid.into(), eid.into(), true, e));
        }
        if let Some(l) = outputs.logger {
            // It ends once both pumps have closed its pipes.
            io::reap_logger(l);
        }
        self.pumps().insert((cid.into(), eid.into()), handles);
    }

    fn pumps(&self) -> std::sync::MutexGuard<'_, PumpMap> {
        self.inner.pumps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_exit_waiter(&self, cid: &str, eid: &str) {
        let pumps = self
            .pumps()
            .remove(&(cid.to_string(), eid.to_string()))
            .unwrap_or_default();
        self.spawn_waiter_with(cid, eid, pumps);
    }
}

/// The bundle's spec as containerd wrote it (for root.path when there are no rootfs mounts).
fn spec_orig(bundle: &Path) -> serde_json::Value {
    spec::load(bundle).unwrap_or_default()
}
