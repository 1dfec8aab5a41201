//! `cargo xtask bench agent`: the life of a `true` container through Hull's agent (the release
//! `hull-agent` in host mode, on a Unix socket), beside `runc run` of the same bundle (Debian's
//! runc), on this machine, alternating the two, N runs each; prints every run, min/median/max and
//! `container_ms agent=… runc=… ratio=…` as the last line.
//!
//! One agent run: CreateContainer + StartContainer + WaitProcess + RemoveContainer, timed from the
//! client around the four calls (the connection is made once, before the runs). One runc run:
//! `runc run` (create + start + wait + delete in one process), from spawn to its exit. Both get the
//! fixture's spec with the absolute rootfs path and a cgroupsPath under `/hull-bench`; the spec is
//! written (runc) or serialised (agent) before the clock starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_agent_api::agent;
use hull_agent_api::agent_ttrpc::AgentServiceClient;
use hull_agent_api::client::{connect, Target};
use hull_agent_api::ttrpc;
use serde_json::{json, Value};

use crate::bench::median;
use crate::cargo;

/// Debian's runc.
const RUNC: &str = "/usr/sbin/runc";
/// The cgroup both put their containers under.
const CGROUP_PARENT: &str = "/hull-bench";
/// Unmeasured runs of each before the measured ones.
const WARMUP: usize = 3;
/// The ratio (agent / runc) the agent aims at.
const TARGET_RATIO: f64 = 1.5;
/// How long one RPC may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-phase times of one agent run, ms.
#[derive(Debug, Clone, Copy, Default)]
struct Phases {
    create: f64,
    start: f64,
    wait: f64,
    remove: f64,
}

impl Phases {
    fn total(&self) -> f64 {
        self.create + self.start + self.wait + self.remove
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rpc_ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos().try_into().unwrap_or(i64::MAX))
}

/// The target directory (CARGO_TARGET_DIR or `<root>/target`).
fn target_dir() -> PathBuf {
    let root = cargo::root();
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(p) if p.is_relative() => root.join(p),
        Some(p) => p,
        None => root.join("target"),
    }
}

/// What is left behind on drop: the agent (SIGTERM, then reaped: it removes its containers), runc
/// containers, the temp dir, and the `/hull-bench` cgroups if empty.
struct Cleanup {
    agent: Option<Child>,
    dir: PathBuf,
}

impl Cleanup {
    fn runc_root(&self) -> PathBuf {
        self.dir.join("runc-state")
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            // SAFETY: kill(2) on the PID of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("bench agent: hull-agent ignored SIGTERM for 10 s: killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        // runc containers a failed run may have left (none normally).
        if let Ok(dir) = std::fs::read_dir(self.runc_root()) {
            for e in dir.flatten() {
                let _ = Command::new(RUNC)
                    .arg("--root")
                    .arg(self.runc_root())
                    .args(["delete", "--force"])
                    .arg(e.file_name())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        for d in cgroup_dirs("") {
            // Leftover children first (a failed run), then the parent: rmdir only removes empty
            // cgroups, so nothing still in use goes.
            if let Ok(children) = std::fs::read_dir(&d) {
                for c in children.flatten() {
                    if c.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir(c.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&d);
        }
    }
}

/// The directories of cgroup `/hull-bench/<child>` (or `/hull-bench` itself) that exist, in every
/// mounted hierarchy under /sys/fs/cgroup (v1 controllers, name=systemd, the unified v2 one).
fn cgroup_dirs(child: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut out = Vec::new();
    let mut consider = |hier: &Path| {
        let p = hier.join(CGROUP_PARENT.trim_start_matches('/')).join(child);
        if p.is_dir() {
            out.push(p);
        }
    };
    // A pure v2 host mounts the hierarchy at /sys/fs/cgroup itself.
    consider(base);
    if let Ok(dir) = std::fs::read_dir(base) {
        for e in dir.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                consider(&e.path());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The hierarchies (names under /sys/fs/cgroup) where `/hull-bench/<child>` exists.
fn cgroup_hierarchies(child: &str) -> Vec<String> {
    cgroup_dirs(child)
        .iter()
        .map(|p| {
            let rel = p.strip_prefix("/sys/fs/cgroup").unwrap_or(p);
            match rel.components().count() {
                n if n > 2 => rel
                    .components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .unwrap_or_default(),
                _ => "(v2 root)".into(),
            }
        })
        .collect()
}

/// The agent side: a client of the host-mode agent, and a runtime to drive it.
struct AgentSide {
    runtime: tokio::runtime::Runtime,
    client: AgentServiceClient,
    template: Value,
}

impl AgentSide {
    fn spec(&self, id: &str) -> String {
        let mut s = self.template.clone();
        s["linux"]["cgroupsPath"] = json!(format!("{CGROUP_PARENT}/{id}"));
        s.to_string()
    }

    fn create(&self, id: &str, spec_json: String) -> Result<()> {
        let mut r = agent::CreateContainerRequest::new();
        r.container_id = id.into();
        r.spec_json = spec_json;
        self.runtime
            .block_on(self.client.create_container(rpc_ctx(), &r))
            .with_context(|| format!("CreateContainer {id}"))?;
        Ok(())
    }

    fn start(&self, id: &str) -> Result<()> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = id.into();
        self.runtime
            .block_on(self.client.start_container(rpc_ctx(), &r))
            .with_context(|| format!("StartContainer {id}"))?;
        Ok(())
    }

    fn wait(&self, id: &str) -> Result<()> {
        let mut r = agent::ProcessRequest::new();
        r.container_id = id.into();
        let status = self
            .runtime
            .block_on(self.client.wait_process(rpc_ctx(), &r))
            .with_context(|| format!("WaitProcess {id}"))?
            .status;
        if status != 0 {
            bail!("container {id}: /bin/true exited with status {status}");
        }
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<()> {
        let mut r = agent::RemoveContainerRequest::new();
        r.container_id = id.into();
        self.runtime
            .block_on(self.client.remove_container(rpc_ctx(), &r))
            .with_context(|| format!("RemoveContainer {id}"))?;
        Ok(())
    }

    /// One timed life: create, start, wait, remove.
    fn once(&self, id: &str) -> Result<Phases> {
        let spec = self.spec(id);
        let t0 = Instant::now();
        self.create(id, spec)?;
        let t1 = Instant::now();
        self.start(id)?;
        let t2 = Instant::now();
        self.wait(id)?;
        let t3 = Instant::now();
        self.remove(id)?;
        let t4 = Instant::now();
        Ok(Phases {
            create: ms(t1 - t0),
            start: ms(t2 - t1),
            wait: ms(t3 - t2),
            remove: ms(t4 - t3),
        })
    }

    /// One life, looking at the container's cgroups between create and start.
    fn once_probing(&self, id: &str) -> Result<Vec<String>> {
        self.create(id, self.spec(id))?;
        let hier = cgroup_hierarchies(id);
        self.start(id)?;
        self.wait(id)?;
        self.remove(id)?;
        Ok(hier)
    }
}

/// The runc side: a bundle directory whose config.json is rewritten per run (before the clock).
struct RuncSide {
    root: PathBuf,
    bundle: PathBuf,
    template: Value,
}

impl RuncSide {
    fn write_spec(&self, id: &str) -> Result<()> {
        let mut s = self.template.clone();
        s["linux"]["cgroupsPath"] = json!(format!("{CGROUP_PARENT}/{id}"));
        let path = self.bundle.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&s)?)
            .with_context(|| format!("write {}", path.display()))
    }

    fn runc(&self) -> Command {
        let mut c = Command::new(RUNC);
        c.arg("--root").arg(&self.root);
        c
    }

    fn check(out: std::process::Output, what: &str) -> Result<()> {
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// One timed `runc run`.
    fn once(&self, id: &str) -> Result<f64> {
        self.write_spec(id)?;
        let mut cmd = self.runc();
        cmd.args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let t0 = Instant::now();
        let out = cmd
            .spawn()
            .with_context(|| format!("spawn {RUNC}"))?
            .wait_with_output()?;
        let elapsed = t0.elapsed();
        Self::check(out, &format!("runc run {id}"))?;
        Ok(ms(elapsed))
    }

    /// One life in steps (create, look at the cgroups, start, wait, delete).
    fn once_probing(&self, id: &str) -> Result<Vec<String>> {
        self.write_spec(id)?;
        // The container's init keeps runc create's stdio until it exits: a pipe would not see EOF
        // before `runc start`, so stderr goes to a file.
        let err_path = self.bundle.join("create.stderr");
        let status = self
            .runc()
            .args(["create", "--bundle"])
            .arg(&self.bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .status()?;
        if !status.success() {
            bail!(
                "runc create {id} failed ({status}): {}",
                std::fs::read_to_string(&err_path)
                    .unwrap_or_default()
                    .trim()
            );
        }
        let hier = cgroup_hierarchies(id);
        Self::check(
            self.runc().args(["start", id]).output()?,
            &format!("runc start {id}"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.runc().args(["state", id]).output()?;
            let state: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if state["status"] == "stopped" {
                break;
            }
            if Instant::now() > deadline {
                bail!("runc container {id} did not stop: {state}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Self::check(
            self.runc().args(["delete", id]).output()?,
            &format!("runc delete {id}"),
        )?;
        Ok(hier)
    }
}

fn host_line() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?", |(_, m)| m.trim())
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cgroups = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "cgroup v2"
    } else if Path::new("/sys/fs/cgroup/unified").is_dir() {
        "cgroup v1 hybrid"
    } else {
        "cgroup v1"
    };
    format!("linux {}, {cpus} CPUs ({model}), {cgroups}", kernel.trim())
}

fn runc_version() -> String {
    Command::new(RUNC)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().trim_start_matches("runc version ").to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, median(v.to_vec()), max)
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo xtask bench agent`.
pub fn run(runs: usize, verbose: bool) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "bench agent needs root (the agent and runc make namespaces, mounts and cgroups): \
             run it as root"
        );
    }
    if !Path::new(RUNC).is_file() {
        bail!("{RUNC} is missing: run 'cargo xtask deps' (or 'apt-get install runc')");
    }

    let mut c = cargo::cargo();
    c.args(["build", "--release", "-p", "hull-agent"]);
    cargo::run(c)?;
    let agent_bin = target_dir().join("release/hull-agent");
    let fixtures = target_dir().join("fixtures");
    let mut c = Command::new("bash");
    c.arg(cargo::root().join("tests/fixtures/build.sh"))
        .arg(&fixtures);
    cargo::run(c)?;
    let rootfs = fixtures.join("busybox/rootfs");
    let config = fixtures.join("busybox/config.json");
    let mut template: Value = serde_json::from_str(
        &std::fs::read_to_string(&config).with_context(|| format!("read {}", config.display()))?,
    )
    .with_context(|| format!("{} is not JSON", config.display()))?;
    template["root"]["path"] = json!(rootfs);
    template["process"]["args"] = json!(["/bin/true"]);

    let dir = std::env::temp_dir().join(format!("hull-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cleanup = Cleanup { agent: None, dir };
    let dir = cleanup.dir.clone();
    let socket = dir.join("agent.sock");
    let agent_log = dir.join("agent.log");
    let child = Command::new(&agent_bin)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(dir.join("agent-state"))
        .arg("--cgroup-parent")
        .arg(CGROUP_PARENT)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log)?)
        .spawn()
        .with_context(|| format!("spawn {}", agent_bin.display()))?;
    cleanup.agent = Some(child);
    let agent_log_text = || std::fs::read_to_string(&agent_log).unwrap_or_default();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = runtime
        .block_on(connect(
            &Target::Unix(socket.clone()),
            Instant::now() + Duration::from_secs(10),
        ))
        .map_err(|e| anyhow::anyhow!("hull-agent does not answer: {e}\n{}", agent_log_text()))?;
    let agent = AgentSide {
        client: client.raw().clone(),
        runtime,
        template: template.clone(),
    };
    let runc_side = RuncSide {
        root: cleanup.runc_root(),
        bundle: dir.join("bundle"),
        template,
    };
    std::fs::create_dir_all(&runc_side.bundle)?;

    println!(
        "bench agent: life of a `true` container (busybox fixture, read-only rootfs {}), {runs} runs \
         each after {WARMUP} warm-ups, alternating which goes first",
        rootfs.display()
    );
    println!(
        "  agent: release hull-agent in host mode on a Unix socket, CreateContainer + \
         StartContainer + WaitProcess + RemoveContainer timed at the client (one connection)"
    );
    println!(
        "  runc:  {RUNC} {} `run` of the same spec, spawn to exit (create + start + wait + delete)",
        runc_version()
    );
    println!("  cgroups under {CGROUP_PARENT}; on {}", host_line());

    let with_log =
        |e: anyhow::Error| anyhow::anyhow!("{e:#}\nhull-agent's log:\n{}", agent_log_text());
    // Warm-ups; the first of each also shows where each puts the container's cgroups.
    let agent_cg = agent.once_probing("warm-agent-0").map_err(with_log)?;
    let runc_cg = runc_side.once_probing("warm-runc-0")?;
    let only = |a: &[String], b: &[String]| -> String {
        let v: Vec<&str> = a
            .iter()
            .filter(|h| !b.contains(h))
            .map(String::as_str)
            .collect();
        v.join(" ")
    };
    let (agent_only, runc_only) = (only(&agent_cg, &runc_cg), only(&runc_cg, &agent_cg));
    println!(
        "  container cgroup in: agent [{}], runc [{}]",
        agent_cg.join(" "),
        runc_cg.join(" ")
    );
    if !agent_only.is_empty() || !runc_only.is_empty() {
        println!(
            "  (not the same hierarchies: only agent [{agent_only}], only runc [{runc_only}])"
        );
    }
    for w in 1..WARMUP {
        agent.once(&format!("warm-agent-{w}")).map_err(with_log)?;
        runc_side.once(&format!("warm-runc-{w}"))?;
    }

    let mut phases = Vec::with_capacity(runs);
    let mut runc_ms = Vec::with_capacity(runs);
    for i in 0..runs {
        let mut do_agent = || -> Result<()> {
            phases.push(agent.once(&format!("agent-{i}")).map_err(with_log)?);
            Ok(())
        };
        if i % 2 == 0 {
            do_agent()?;
            runc_ms.push(runc_side.once(&format!("runc-{i}"))?);
        } else {
            runc_ms.push(runc_side.once(&format!("runc-{i}"))?);
            do_agent()?;
        }
        let p = phases[i];
        if verbose {
            println!(
                "run {i:3} agent_ms={:7.1} (create {:6.1} start {:6.1} wait {:6.1} remove {:6.1}) \
                 runc_ms={:7.1}",
                p.total(),
                p.create,
                p.start,
                p.wait,
                p.remove,
                runc_ms[i]
            );
        } else {
            println!(
                "run {i:3} agent_ms={:7.1} runc_ms={:7.1}",
                p.total(),
                runc_ms[i]
            );
        }
    }
    // Stop the agent now, and make sure it exits cleanly (it removes what it made).
    drop(agent);
    let mut child = cleanup.agent.take().context("the agent is gone")?;
    // SAFETY: kill(2) on the PID of our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let st = child.wait()?;
    if !st.success() {
        bail!(
            "hull-agent exited with {st} after SIGTERM:\n{}",
            agent_log_text()
        );
    }

    let agent_ms: Vec<f64> = phases.iter().map(Phases::total).collect();
    println!("agent_ms raw: {}", list(&agent_ms));
    println!("runc_ms raw:  {}", list(&runc_ms));
    if verbose {
        let phase = |name: &str, f: fn(&Phases) -> f64| {
            let v: Vec<f64> = phases.iter().map(f).collect();
            let (lo, med, hi) = stats(&v);
            println!("agent phase {name:6} min={lo:.1} median={med:.1} max={hi:.1} ms");
        };
        phase("create", |p| p.create);
        phase("start", |p| p.start);
        phase("wait", |p| p.wait);
        phase("remove", |p| p.remove);
    }
    let (alo, amed, ahi) = stats(&agent_ms);
    let (rlo, rmed, rhi) = stats(&runc_ms);
    println!("agent min={alo:.1} median={amed:.1} max={ahi:.1} ms");
    println!("runc  min={rlo:.1} median={rmed:.1} max={rhi:.1} ms");
    let ratio = amed / rmed;
    println!(
        "target: ratio <= {TARGET_RATIO} ({})",
        if ratio <= TARGET_RATIO {
            "met"
        } else {
            "not met"
        }
    );
    drop(cleanup);
    println!("container_ms agent={amed:.1} runc={rmed:.1} ratio={ratio:.3}");
    Ok(())
}
