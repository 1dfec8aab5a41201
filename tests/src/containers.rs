//! The container suite: one set of cases, run against a host-mode agent (`tests/containers_host.rs`,
//! fast, in CI without a VM) and against the agent inside a guest (`guest/containers.rs`, in the
//! harness). A case gets a [`Ctx`]: a client of the agent, where the busybox rootfs is as the agent
//! sees it, the fixture's spec template, and how to look at the agent's machine ([`Ctx::probe`]).
//!
//! Every case asserts what came back: bytes, statuses, ttrpc codes, and what is left on the
//! machine after a removal, listed from a probe container that shares the agent's PID namespace.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hull_agent_api::agent;
use hull_agent_api::agent_ttrpc::AgentServiceClient;
use hull_agent_api::ttrpc;
use serde_json::{json, Value};

/// How long one RPC may take: it only bounds a hung call (a read waits for output, and 256 MiB
/// through virtio-fs takes minutes in the harness).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(600);

/// What a case needs.
#[derive(Clone)]
pub struct Ctx {
    /// The agent.
    pub client: AgentServiceClient,
    /// The busybox rootfs, as the agent sees it.
    pub rootfs: PathBuf,
    /// The fixture's `config.json`.
    pub template: Value,
    /// The agent's PID, in the PID namespace a probe container sees.
    pub agent_pid: i32,
    /// The agent's cgroup parent.
    pub cgroup_parent: String,
    /// A prefix for container ids (unique per agent user).
    pub prefix: String,
    /// Where the agent is (for a second connection).
    pub target: hull_agent_api::client::Target,
}

fn ctx_rpc() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos().try_into().unwrap_or(i64::MAX))
}

/// The fixtures (`tests/fixtures/build.sh`), built once per process.
pub fn fixtures() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let root = crate::workspace_root();
        let out = root.join("target/fixtures");
        let st = std::process::Command::new("bash")
            .arg(root.join("tests/fixtures/build.sh"))
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run tests/fixtures/build.sh");
        assert!(st.success(), "tests/fixtures/build.sh failed: {st}");
        out.join("busybox")
    })
    .clone()
}

/// The fixture's spec template.
pub fn template() -> Value {
    let text = std::fs::read_to_string(fixtures().join("config.json")).expect("config.json");
    serde_json::from_str(&text).expect("config.json is JSON")
}

/// A unique id for a container of this case.
pub fn unique(ctx: &Ctx, name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{name}-{}",
        ctx.prefix,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// What a process gave.
#[derive(Debug, Default, Clone)]
pub struct Output {
    /// WaitProcess's status.
    pub status: i32,
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// stdout as text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as text.
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Where the fixtures initramfs puts the busybox rootfs in a guest.
pub const GUEST_FIXTURE_ROOTFS: &str = "/fixtures/busybox/rootfs";

impl Ctx {
    /// A context for the agent of the guest whose VMM (`vmm_pid`) serves hybrid vsock on `uds`,
    /// with containers' rootfs at `rootfs` in the guest; waits (up to `boot_limit`) for the agent
    /// to answer, and fails at once if the VMM dies. Also returns the typed client.
    pub async fn guest(
        uds: PathBuf,
        vmm_pid: u32,
        rootfs: &str,
        prefix: &str,
        boot_limit: Duration,
    ) -> (Self, hull_agent_api::client::AgentClient) {
        use hull_agent_api::client::{connect_watching, process_alive, thread_states, Target};
        let target = Target::HybridVsock {
            uds,
            port: hull_agent_api::DEFAULT_AGENT_PORT,
        };
        let client = connect_watching(&target, Instant::now() + boot_limit, process_alive(vmm_pid))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the guest agent answers: {e:?}; hull-vmm's threads: {}",
                    thread_states(vmm_pid)
                )
            });
        let ctx = Self {
            client: client.raw().clone(),
            rootfs: PathBuf::from(rootfs),
            template: template(),
            agent_pid: 1,
            cgroup_parent: "/hull".into(),
            prefix: prefix
                .chars()
                .take(12)
                .collect::<String>()
                .replace('_', "-"),
            target,
        };
        (ctx, client)
    }

    /// A spec running `args` (a writable tmpfs on /tmp added).
    pub fn spec(&self, args: &[&str]) -> Value {
        let mut s = self.template.clone();
        s["process"]["args"] = json!(args);
        s["root"]["path"] = json!(self.rootfs);
        s["mounts"].as_array_mut().expect("mounts").push(
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                         "options": ["nosuid", "nodev", "mode=1777", "size=16m"]}),
        );
        s
    }

    /// CreateContainer.
    pub async fn create(&self, id: &str, spec: &Value, stdin: bool) -> ttrpc::Result<()> {
        let mut r = agent::CreateContainerRequest::new();
        r.container_id = id.into();
        r.spec_json = spec.to_string();
        r.stdin = stdin;
        self.client.create_container(ctx_rpc(), &r).await.map(drop)
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> ttrpc::Result<()> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = id.into();
        self.client.start_container(ctx_rpc(), &r).await.map(drop)
    }

    /// ExecProcess.
    pub async fn exec(
        &self,
        id: &str,
        exec: &str,
        process: &Value,
        stdin: bool,
    ) -> ttrpc::Result<()> {
        let mut r = agent::ExecProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec.into();
        r.process_json = process.to_string();
        r.stdin = stdin;
        self.client.exec_process(ctx_rpc(), &r).await.map(drop)
    }

    /// WaitProcess.
    pub async fn wait(&self, id: &str, exec: &str) -> ttrpc::Result<i32> {
        let mut r = agent::ProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec.into();
        self.client
            .wait_process(ctx_rpc(), &r)
            .await
            .map(|w| w.status)
    }

    /// SignalProcess.
    pub async fn signal(&self, id: &str, exec: &str, sig: u32, all: bool) -> ttrpc::Result<()> {
        let mut r = agent::SignalProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec.into();
        r.signal = sig;
        r.all = all;
        self.client.signal_process(ctx_rpc(), &r).await.map(drop)
    }

    /// Reads stdout (or stderr) to its end.
    pub async fn read_all(&self, id: &str, exec: &str, stderr: bool) -> ttrpc::Result<Vec<u8>> {
        let mut all = Vec::new();
        loop {
            let chunk = self.read(id, exec, stderr, 1 << 20).await?;
            if chunk.is_empty() {
                return Ok(all);
            }
            all.extend_from_slice(&chunk);
        }
    }

    /// One ReadStdout / ReadStderr.
    pub async fn read(
        &self,
        id: &str,
        exec: &str,
        stderr: bool,
        len: u32,
    ) -> ttrpc::Result<Vec<u8>> {
        let mut r = agent::ReadStreamRequest::new();
        r.container_id = id.into();
        r.exec_id = exec.into();
        r.len = len;
        let resp = if stderr {
            self.client.read_stderr(ctx_rpc(), &r).await?
        } else {
            self.client.read_stdout(ctx_rpc(), &r).await?
        };
        Ok(resp.data)
    }

    /// WriteStdin of all of `data`, in 1 MiB writes.
    pub async fn write(&self, id: &str, exec: &str, data: &[u8]) -> ttrpc::Result<()> {
        for chunk in data.chunks(1 << 20) {
            let mut r = agent::WriteStreamRequest::new();
            r.container_id = id.into();
            r.exec_id = exec.into();
            r.data = chunk.to_vec();
            let n = self.client.write_stdin(ctx_rpc(), &r).await?.len;
            assert_eq!(n as usize, chunk.len());
        }
        Ok(())
    }

    /// CloseStdin.
    pub async fn close_stdin(&self, id: &str, exec: &str) -> ttrpc::Result<()> {
        let mut r = agent::ProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec.into();
        self.client.close_stdin(ctx_rpc(), &r).await.map(drop)
    }

    /// RemoveContainer.
    pub async fn remove(&self, id: &str, force: bool) -> ttrpc::Result<()> {
        let mut r = agent::RemoveContainerRequest::new();
        r.container_id = id.into();
        r.force = force;
        self.client.remove_container(ctx_rpc(), &r).await.map(drop)
    }

    /// StatsContainer.
    pub async fn stats(&self, id: &str) -> ttrpc::Result<agent::StatsContainerResponse> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = id.into();
        self.client.stats_container(ctx_rpc(), &r).await
    }

    /// ListProcesses.
    pub async fn pids(&self, id: &str) -> ttrpc::Result<Vec<i32>> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = id.into();
        self.client
            .list_processes(ctx_rpc(), &r)
            .await
            .map(|l| l.pids)
    }

    /// Pause (`true`) or resume.
    pub async fn pause(&self, id: &str, pause: bool) -> ttrpc::Result<()> {
        let mut r = agent::ContainerRequest::new();
        r.container_id = id.into();
        if pause {
            self.client.pause_container(ctx_rpc(), &r).await.map(drop)
        } else {
            self.client.resume_container(ctx_rpc(), &r).await.map(drop)
        }
    }

    /// A new connection to the same agent.
    pub async fn reconnect(&self) -> AgentServiceClient {
        let deadline = Instant::now() + RPC_TIMEOUT;
        hull_agent_api::client::connect(&self.target, deadline)
            .await
            .expect("reconnect to the agent")
            .raw()
            .clone()
    }

    /// Creates, starts, feeds `stdin` (then closes it), reads both streams to their ends, waits
    /// and removes: the whole life of a one-shot container.
    pub async fn run(&self, id: &str, spec: &Value, stdin: Option<&[u8]>) -> ttrpc::Result<Output> {
        self.create(id, spec, stdin.is_some()).await?;
        self.start(id).await?;
        let feed = async {
            if let Some(data) = stdin {
                self.write(id, "", data).await?;
                self.close_stdin(id, "").await?;
            }
            Ok::<_, ttrpc::Error>(())
        };
        let (fed, stdout, stderr) = tokio::join!(
            feed,
            self.read_all(id, "", false),
            self.read_all(id, "", true)
        );
        fed?;
        let status = self.wait(id, "").await?;
        self.remove(id, false).await?;
        Ok(Output {
            status,
            stdout: stdout?,
            stderr: stderr?,
        })
    }

    /// Runs `script` (sh -c) in a probe container that shares the agent's PID namespace and sees
    /// its cgroups: what is left on the agent's machine. Returns stdout.
    pub async fn probe(&self, script: &str) -> String {
        let id = unique(self, "probe");
        let mut s = self.spec(&["sh", "-c", script]);
        s["linux"]["namespaces"] = json!([{"type": "mount"}]);
        s.as_object_mut().expect("spec").remove("hostname");
        s["linux"]["maskedPaths"] = json!([]);
        s["linux"]["readonlyPaths"] = json!([]);
        let mounts = s["mounts"].as_array_mut().expect("mounts");
        mounts.retain(|m| m["destination"] != "/sys");
        mounts.push(
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                           "options": ["nosuid", "noexec", "nodev", "ro"]}),
        );
        mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "bind",
                           "source": "/sys/fs/cgroup", "options": ["rbind", "ro"]}));
        let out = self.run(&id, &s, None).await.expect("probe container");
        assert_eq!(out.status, 0, "probe failed: {}", out.err());
        out.out()
    }
}

/// The ttrpc status code of an error.
pub fn code(e: &ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not a status: {other:?}"),
    }
}

/// The message of an error.
pub fn message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message.clone(),
        other => format!("{other:?}"),
    }
}

/// Waits (polling every 20 ms, up to `limit`) until `f` returns `Some`.
pub async fn until<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if t.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The cases. Each is `async fn(Ctx)`; `container_cases!` makes a test of each.
pub mod cases {
    use sha2::{Digest, Sha256};

    use super::*;

    /// Signal dispositions are the defaults, as runc leaves them: `yes | head` ends (SIGPIPE
    /// kills `yes`; the agent is a Rust program, which ignores SIGPIPE, and an ignored signal
    /// would be inherited across exec).
    pub async fn default_signal_dispositions(ctx: Ctx) {
        let id = unique(&ctx, "sigpipe");
        let out = ctx
            .run(&id, &ctx.spec(&["sh", "-c", "yes | head -c 5"]), None)
            .await
            .unwrap();
        assert_eq!(
            (out.status, out.out()),
            (0, "y\ny\ny".to_owned()),
            "{}",
            out.err()
        );
        let id = unique(&ctx, "sigign");
        let grep = ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"];
        let out = ctx.run(&id, &ctx.spec(&grep), None).await.unwrap();
        assert_eq!(
            out.out(),
            "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
        );
    }

    /// `echo` output comes back byte-exact; status 0.
    pub async fn echo_output(ctx: Ctx) {
        let id = unique(&ctx, "echo");
        let out = ctx
            .run(&id, &ctx.spec(&["echo", "hello from a container"]), None)
            .await
            .unwrap();
        assert_eq!(out.status, 0);
        assert_eq!(out.stdout, b"hello from a container\n");
        assert_eq!(out.stderr, b"");
    }

    /// Exit codes 0, 1, 137 (SIGKILL), 127 (a shell's missing command), and a missing binary is
    /// a clear error at create.
    pub async fn exit_codes(ctx: Ctx) {
        for (script, want) in [
            ("exit 0", 0),
            ("echo oops >&2; exit 1", 1),
            // A namespace's init ignores signals it has no handler for: kill a child shell.
            ("sh -c 'kill -9 $$'; exit $?", 137),
            ("no-such-command", 127),
        ] {
            let id = unique(&ctx, "exit");
            let out = ctx
                .run(&id, &ctx.spec(&["sh", "-c", script]), None)
                .await
                .unwrap();
            assert_eq!(out.status, want, "{script}: {out:?}");
        }
        let id = unique(&ctx, "missing");
        let e = ctx
            .create(&id, &ctx.spec(&["/bin/no-such-binary"]), false)
            .await
            .unwrap_err();
        assert!(message(&e).contains("no-such-binary"), "{e:?}");
        // Nothing left of it: the id is free again, no cgroup, no process.
        let e = ctx.start(&id).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
        let cg = format!("{}/{id}", ctx.cgroup_parent.trim_start_matches('/'));
        let left = ctx
            .probe(&format!(
                "for d in /sys/fs/cgroup/{cg} /sys/fs/cgroup/*/{cg}; do [ -d $d ] && echo $d; done; \
                 grep -l no-such-bin[a]ry /proc/[0-9]*/cmdline 2>/dev/null; true"
            ))
            .await;
        assert_eq!(left, "", "left by a failed create");
    }

    /// SIGTERM and SIGKILL to one process and to all. (A PID namespace's init gets only the
    /// signals it handles, SIGKILL aside, as with runc.)
    pub async fn signals(ctx: Ctx) {
        let sleeper = ctx.spec(&["sleep", "2000"])["process"].clone();
        // SIGTERM to one exec'd process, then to all (the init traps it).
        let id = unique(&ctx, "term");
        let init = "trap 'exit 3' TERM; echo ready; sleep 1000 & wait";
        ctx.create(&id, &ctx.spec(&["sh", "-c", init]), false)
            .await
            .unwrap();
        ctx.start(&id).await.unwrap();
        assert_eq!(ctx.read(&id, "", false, 64).await.unwrap(), b"ready\n");
        ctx.exec(&id, "e1", &sleeper, false).await.unwrap();
        ctx.signal(&id, "e1", 15, false).await.unwrap();
        assert_eq!(ctx.wait(&id, "e1").await.unwrap(), 143);
        assert_eq!(
            ctx.pids(&id).await.unwrap().len(),
            2,
            "init and its sleep still run"
        );
        ctx.exec(&id, "e2", &sleeper, false).await.unwrap();
        ctx.signal(&id, "", 15, true).await.unwrap();
        assert_eq!(ctx.wait(&id, "").await.unwrap(), 3);
        assert_eq!(ctx.wait(&id, "e2").await.unwrap(), 143);
        let e = ctx.signal(&id, "", 9, false).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e:?}");
        ctx.remove(&id, false).await.unwrap();

        // SIGKILL to one exec'd process leaves the init running; SIGKILL to all ends both.
        let id = unique(&ctx, "kill");
        ctx.create(&id, &ctx.spec(&["sleep", "1000"]), false)
            .await
            .unwrap();
        ctx.start(&id).await.unwrap();
        ctx.exec(&id, "e1", &sleeper, false).await.unwrap();
        ctx.signal(&id, "e1", 9, false).await.unwrap();
        assert_eq!(ctx.wait(&id, "e1").await.unwrap(), 137);
        assert_eq!(ctx.pids(&id).await.unwrap().len(), 1);
        let e = ctx.remove(&id, false).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e:?}");
        ctx.exec(&id, "e2", &sleeper, false).await.unwrap();
        ctx.signal(&id, "", 9, true).await.unwrap();
        assert_eq!(ctx.wait(&id, "").await.unwrap(), 137);
        assert_eq!(ctx.wait(&id, "e2").await.unwrap(), 137);
        ctx.remove(&id, false).await.unwrap();

        // SIGKILL to the init alone ends the container (the kernel kills the rest of its PID
        // namespace).
        let id = unique(&ctx, "killinit");
        ctx.create(&id, &ctx.spec(&["sleep", "1000"]), false)
            .await
            .unwrap();
        ctx.start(&id).await.unwrap();
        ctx.exec(&id, "e1", &sleeper, false).await.unwrap();
        ctx.signal(&id, "", 9, false).await.unwrap();
        assert_eq!(ctx.wait(&id, "").await.unwrap(), 137);
        assert_eq!(ctx.wait(&id, "e1").await.unwrap(), 137);
        ctx.remove(&id, false).await.unwrap();
    }

    /// 16 MiB through stdin and back out of `cat`, checksummed.
    pub async fn stdin_round_trip(ctx: Ctx) {
        let data: Vec<u8> = (0..16u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let id = unique(&ctx, "cat");
        let out = ctx
            .run(&id, &ctx.spec(&["cat"]), Some(&data))
            .await
            .unwrap();
        assert_eq!(out.status, 0, "{}", out.err());
        assert_eq!(out.stdout.len(), data.len());
        assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&data));
        // And the container's own view of it.
        let id = unique(&ctx, "sha");
        let out = ctx
            .run(&id, &ctx.spec(&["sha256sum"]), Some(&data))
            .await
            .unwrap();
        let want = format!("{:x}  -\n", Sha256::digest(&data));
        assert_eq!(out.out(), want);
    }

    /// Terminal mode: a pty, and a resize seen by `stty size`.
    pub async fn terminal(ctx: Ctx) {
        let id = unique(&ctx, "tty");
        let mut s = ctx.spec(&["sh", "-c", "read line; stty size; echo got:$line"]);
        s["process"]["terminal"] = json!(true);
        ctx.create(&id, &s, true).await.unwrap();
        ctx.start(&id).await.unwrap();
        let mut r = agent::TtyWinResizeRequest::new();
        r.container_id = id.clone();
        r.rows = 42;
        r.columns = 123;
        ctx.client.tty_win_resize(ctx_rpc(), &r).await.unwrap();
        ctx.write(&id, "", b"hi\n").await.unwrap();
        let out =
            String::from_utf8_lossy(&ctx.read_all(&id, "", false).await.unwrap()).into_owned();
        assert_eq!(ctx.wait(&id, "").await.unwrap(), 0);
        assert!(out.contains("42 123\r\n"), "{out:?}");
        assert!(out.contains("got:hi\r\n"), "{out:?}");
        ctx.remove(&id, false).await.unwrap();
    }

    /// An exec'd process sees the init's filesystem and PID namespace.
    pub async fn exec_shares_namespaces(ctx: Ctx) {
        let id = unique(&ctx, "exec");
        ctx.create(
            &id,
            &ctx.spec(&["sh", "-c", "echo marker > /tmp/m; exec sleep 1000"]),
            false,
        )
        .await
        .unwrap();
        ctx.start(&id).await.unwrap();
        let p = ctx.spec(&[
            "sh",
            "-c",
            "until [ -e /tmp/m ]; do :; done; cat /tmp/m; cat /proc/1/comm; \
             [ $(readlink /proc/1/ns/pid) = $(readlink /proc/self/ns/pid) ] && echo same-pid; \
             [ $(readlink /proc/1/ns/mnt) = $(readlink /proc/self/ns/mnt) ] && echo same-mnt",
        ])["process"]
            .clone();
        ctx.exec(&id, "look", &p, false).await.unwrap();
        let out =
            String::from_utf8_lossy(&ctx.read_all(&id, "look", false).await.unwrap()).into_owned();
        assert_eq!(ctx.wait(&id, "look").await.unwrap(), 0);
        assert_eq!(out, "marker\nsleep\nsame-pid\nsame-mnt\n");
        let e = ctx.exec(&id, "look", &p, false).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::ALREADY_EXISTS);
        ctx.remove(&id, true).await.unwrap();
    }

    /// A memory limit exceeded: GetOOMEvent names the container, WaitProcess gives 137.
    pub async fn oom(ctx: Ctx) {
        let id = unique(&ctx, "oom");
        let mut s = ctx.spec(&["tail", "/dev/zero"]);
        s["linux"]["resources"]["memory"] = json!({"limit": 32 << 20});
        ctx.create(&id, &s, false).await.unwrap();
        let events = {
            let client = ctx.client.clone();
            tokio::spawn(async move {
                client
                    .get_oom_event(ctx_rpc(), &agent::GetOOMEventRequest::new())
                    .await
            })
        };
        ctx.start(&id).await.unwrap();
        assert_eq!(ctx.wait(&id, "").await.unwrap(), 137);
        let ev = events.await.unwrap().unwrap();
        assert_eq!(ev.container_id, id);
        let st = ctx.stats(&id).await.unwrap();
        assert!(st.memory.oom_kills >= 1, "{st:?}");
        assert_eq!(st.memory.limit_bytes, 32 << 20);
        ctx.remove(&id, false).await.unwrap();
    }

    /// A pids limit is enforced.
    pub async fn pids_limit(ctx: Ctx) {
        let id = unique(&ctx, "pids");
        let mut s = ctx.spec(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1000 & done; echo started",
        ]);
        s["linux"]["resources"]["pids"] = json!({"limit": 4});
        ctx.create(&id, &s, false).await.unwrap();
        ctx.start(&id).await.unwrap();
        let err = String::from_utf8_lossy(&ctx.read_all(&id, "", true).await.unwrap()).into_owned();
        assert!(err.contains("can't fork"), "{err:?}");
        let st = ctx.stats(&id).await.unwrap();
        assert_eq!(st.pids.limit, 4);
        assert!(st.pids.current <= 4, "{st:?}");
        ctx.remove(&id, true).await.unwrap();
    }

    /// A read-only rootfs refuses writes.
    pub async fn readonly_rootfs(ctx: Ctx) {
        let id = unique(&ctx, "ro");
        let out = ctx
            .run(&id, &ctx.spec(&["sh", "-c", "touch /newfile"]), None)
            .await
            .unwrap();
        assert_eq!(out.status, 1);
        assert!(out.err().contains("Read-only file system"), "{}", out.err());
    }

    /// User, groups, env, cwd, hostname, rlimits, no_new_privs.
    pub async fn process_settings(ctx: Ctx) {
        let id = unique(&ctx, "user");
        let mut s = ctx.spec(&[
            "sh",
            "-c",
            "id -u; id -g; id -G; echo $GREETING; pwd; hostname; ulimit -n; \
             grep NoNewPrivs /proc/self/status",
        ]);
        s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [1001, 1002]});
        s["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!("GREETING=hello"));
        s["process"]["cwd"] = json!("/home/hulltest");
        s["hostname"] = json!("box-7");
        s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 321}]);
        let out = ctx.run(&id, &s, None).await.unwrap();
        assert_eq!(out.status, 0, "{}", out.err());
        assert_eq!(
            out.out(),
            "1000\n1000\n1000 1001 1002\nhello\n/home/hulltest\nbox-7\n321\nNoNewPrivs:\t1\n"
        );
    }

    /// A capability not granted makes the call that needs it fail; granted, it works.
    pub async fn capabilities(ctx: Ctx) {
        let script = "touch /tmp/f && chown 1000 /tmp/f && echo chowned";
        let id = unique(&ctx, "nocap");
        let out = ctx
            .run(&id, &ctx.spec(&["sh", "-c", script]), None)
            .await
            .unwrap();
        assert_eq!(out.status, 1);
        assert!(
            out.err().contains("Operation not permitted"),
            "{}",
            out.err()
        );

        let id = unique(&ctx, "cap");
        let mut s = ctx.spec(&["sh", "-c", script]);
        for set in ["bounding", "effective", "permitted"] {
            s["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push(json!("CAP_CHOWN"));
        }
        let out = ctx.run(&id, &s, None).await.unwrap();
        assert_eq!(
            (out.status, out.out()),
            (0, "chowned\n".to_owned()),
            "{}",
            out.err()
        );
    }

    /// Pause stops progress, resume restores it; stats move under load.
    pub async fn pause_resume_and_stats(ctx: Ctx) {
        let id = unique(&ctx, "busy");
        ctx.create(&id, &ctx.spec(&["sh", "-c", "while :; do :; done"]), false)
            .await
            .unwrap();
        ctx.start(&id).await.unwrap();
        let cpu = |s: &agent::StatsContainerResponse| s.cpu.usage_usec;
        let first = cpu(&ctx.stats(&id).await.unwrap());
        let moved = until(Duration::from_secs(30), || async {
            let now = cpu(&ctx.stats(&id).await.unwrap());
            (now > first).then_some(now)
        })
        .await;
        assert!(moved.is_some(), "CPU usage did not move under load");
        let st = ctx.stats(&id).await.unwrap();
        assert!(st.memory.usage_bytes > 0 && st.pids.current == 1, "{st:?}");

        ctx.pause(&id, true).await.unwrap();
        let frozen = cpu(&ctx.stats(&id).await.unwrap());
        // Observe a window in which a running loop would certainly use CPU.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            cpu(&ctx.stats(&id).await.unwrap()),
            frozen,
            "a paused container ran"
        );
        let e = ctx.pause(&id, true).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e:?}");

        ctx.pause(&id, false).await.unwrap();
        let resumed = until(Duration::from_secs(30), || async {
            let now = cpu(&ctx.stats(&id).await.unwrap());
            (now > frozen).then_some(now)
        })
        .await;
        assert!(resumed.is_some(), "no progress after resume");
        ctx.remove(&id, true).await.unwrap();
    }

    /// 50 containers created, run and removed concurrently. The agent's working directory is the
    /// same after (libcontainer's start changes it for a moment: a start must not leave another
    /// in the wrong directory). On the host, where the test can read it.
    pub async fn fifty_concurrent(ctx: Ctx) {
        let agent_cwd = || match &ctx.target {
            hull_agent_api::client::Target::Unix(_) => Some(
                std::fs::read_link(format!("/proc/{}/cwd", ctx.agent_pid))
                    .expect("the host agent's working directory"),
            ),
            hull_agent_api::client::Target::HybridVsock { .. } => None,
        };
        let cwd = agent_cwd();
        let runs = (0..50).map(|i| {
            let ctx = ctx.clone();
            async move {
                let id = unique(&ctx, "many");
                let n = i.to_string();
                let out = ctx.run(&id, &ctx.spec(&["echo", &n]), None).await.unwrap();
                assert_eq!((out.status, out.out()), (0, format!("{i}\n")));
            }
        });
        futures_join_all(runs).await;
        assert_eq!(agent_cwd(), cwd);
    }

    /// After RemoveContainer no process, mount or cgroup of it is left.
    pub async fn nothing_left_after_remove(ctx: Ctx) {
        let id = unique(&ctx, "left");
        ctx.create(
            &id,
            &ctx.spec(&["sh", "-c", "sleep 1000 & sleep 1000; true"]),
            false,
        )
        .await
        .unwrap();
        ctx.start(&id).await.unwrap();
        let pids = until(Duration::from_secs(30), || async {
            let p = ctx.pids(&id).await.unwrap();
            (p.len() == 3).then_some(p)
        })
        .await
        .expect("three processes");
        let cg = format!("{}/{id}", ctx.cgroup_parent.trim_start_matches('/'));
        let look = format!(
            "for p in {}; do [ -e /proc/$p ] && echo proc:$p; done; \
             grep -F '{id}' /proc/{}/mountinfo | sed 's/^/mount:/'; \
             for d in /sys/fs/cgroup/{cg} /sys/fs/cgroup/*/{cg}; do [ -d $d ] && echo cgroup:$d; done; \
             true",
            pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" "),
            ctx.agent_pid,
        );
        let before = ctx.probe(&look).await;
        assert_eq!(before.matches("proc:").count(), 3, "{before}");
        assert!(before.contains("cgroup:"), "{before}");
        ctx.remove(&id, true).await.unwrap();
        let after = ctx.probe(&look).await;
        assert_eq!(after, "", "left after RemoveContainer");
        let e = ctx.pids(&id).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
    }

    /// The rest of the spec: masked and read-only paths, the standard mounts and device nodes,
    /// sysctl, seccomp, the OOM score.
    pub async fn spec_details(ctx: Ctx) {
        let id = unique(&ctx, "spec");
        let mut s = ctx.spec(&[
            "sh",
            "-c",
            "for p in /proc/kcore /proc/keys /proc/timer_list; do \
               [ -e $p ] && { wc -c < $p; break; }; done; \
             echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo ro-sys; \
             for m in /dev/pts /dev/shm /dev/mqueue /proc /sys; do \
               grep -q \" $m \" /proc/mounts && echo mount:$m; done; \
             for d in null zero full random urandom tty ptmx; do [ -e /dev/$d ] && echo dev:$d; done; \
             cat /proc/sys/net/ipv4/ip_forward; cat /proc/self/oom_score_adj; \
             mkdir /tmp/forbidden 2>&1 || echo seccomp-denied",
        ]);
        s["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
        s["process"]["oomScoreAdj"] = json!(345);
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
        let out = ctx.run(&id, &s, None).await.unwrap();
        assert_eq!(out.status, 0, "{}", out.err());
        let text = out.out();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "0", "masked paths read empty: {text}");
        assert_eq!(lines[1], "ro-sys", "{text}");
        for m in ["/dev/pts", "/dev/shm", "/dev/mqueue", "/proc", "/sys"] {
            assert!(
                text.contains(&format!("mount:{m}\n")),
                "{m} missing: {text}"
            );
        }
        for d in ["null", "zero", "full", "random", "urandom", "tty", "ptmx"] {
            assert!(
                text.contains(&format!("dev:{d}\n")),
                "/dev/{d} missing: {text}"
            );
        }
        assert!(text.contains("\n1\n345\n"), "sysctl, OOM score: {text}");
        assert!(
            text.contains("Operation not permitted") && text.ends_with("seccomp-denied\n"),
            "seccomp: {text}"
        );
    }

    /// CPU and memory limits land in the cgroup; UpdateContainer changes them.
    pub async fn cgroup_limits_and_update(ctx: Ctx) {
        let id = unique(&ctx, "limits");
        let mut s = ctx.spec(&["sleep", "1000"]);
        s["linux"]["resources"] = json!({
            "memory": {"limit": 64 << 20},
            "cpu": {"quota": 50000, "period": 100000, "shares": 512},
            "pids": {"limit": 10}
        });
        ctx.create(&id, &s, false).await.unwrap();
        ctx.start(&id).await.unwrap();
        let cg = format!("{}/{id}", ctx.cgroup_parent.trim_start_matches('/'));
        let look = format!(
            "cd /sys/fs/cgroup; \
             if [ -e cgroup.controllers ]; then cat {cg}/cpu.max {cg}/cpu.weight {cg}/memory.max; \
             else cat cpu/{cg}/cpu.cfs_quota_us cpu/{cg}/cpu.shares memory/{cg}/memory.limit_in_bytes; fi"
        );
        let before = ctx.probe(&look).await;
        let v2 = before.starts_with("50000 100000");
        if v2 {
            // shares 512 (half the default 1024) → a weight below the default 100; the exact
            // conversion is libcgroups' (runc's changed across versions).
            let lines: Vec<&str> = before.lines().collect();
            let weight: u32 = lines[1].parse().expect("cpu.weight");
            assert!((1..100).contains(&weight), "{before}");
            assert_eq!(
                (lines[0], lines[2]),
                ("50000 100000", "67108864"),
                "{before}"
            );
        } else {
            assert_eq!(before, "50000\n512\n67108864\n");
        }
        assert_eq!(ctx.stats(&id).await.unwrap().memory.limit_bytes, 64 << 20);

        let mut r = agent::UpdateContainerRequest::new();
        r.container_id = id.clone();
        r.resources_json =
            json!({"memory": {"limit": 96 << 20}, "cpu": {"quota": 20000, "period": 100000}})
                .to_string();
        ctx.client.update_container(ctx_rpc(), &r).await.unwrap();
        let after = ctx.probe(&look).await;
        let want_mem = "100663296";
        assert!(after.ends_with(&format!("{want_mem}\n")), "{after}");
        assert!(after.starts_with("20000"), "{after}");
        assert_eq!(ctx.stats(&id).await.unwrap().memory.limit_bytes, 96 << 20);

        r.resources_json = "{\"memory\": 5}".into();
        let e = ctx
            .client
            .update_container(ctx_rpc(), &r)
            .await
            .unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{e:?}");
        ctx.remove(&id, true).await.unwrap();
    }

    /// WaitProcess answers on a new connection after the first one dropped mid-wait, and again
    /// after the process ended; output not read yet is still there for the new connection.
    pub async fn wait_survives_reconnect(ctx: Ctx) {
        let id = unique(&ctx, "rewait");
        ctx.create(
            &id,
            &ctx.spec(&["sh", "-c", "read x; echo bye; exit 5"]),
            true,
        )
        .await
        .unwrap();
        ctx.start(&id).await.unwrap();
        // A waiter on its own connection, dropped while the process runs.
        let first = ctx.reconnect().await;
        let mut req = agent::ProcessRequest::new();
        req.container_id = id.clone();
        let waiter = {
            let (first, req) = (first.clone(), req.clone());
            tokio::spawn(async move { first.wait_process(ctx_rpc(), &req).await })
        };
        waiter.abort();
        drop(first);
        let second = ctx.reconnect().await;
        let mut w = agent::WriteStreamRequest::new();
        w.container_id = id.clone();
        w.data = b"go\n".to_vec();
        second.write_stdin(ctx_rpc(), &w).await.unwrap();
        assert_eq!(
            second.wait_process(ctx_rpc(), &req).await.unwrap().status,
            5
        );
        drop(second);
        let third = ctx.reconnect().await;
        assert_eq!(third.wait_process(ctx_rpc(), &req).await.unwrap().status, 5);
        let mut rd = agent::ReadStreamRequest::new();
        rd.container_id = id.clone();
        rd.len = 64;
        assert_eq!(
            third.read_stdout(ctx_rpc(), &rd).await.unwrap().data,
            b"bye\n"
        );
        ctx.remove(&id, false).await.unwrap();
    }

    /// Bad input gets a clear error and the agent keeps serving.
    pub async fn bad_input(ctx: Ctx) {
        let id = unique(&ctx, "bad");
        let e = ctx
            .create(&id, &json!({"nonsense": true}), false)
            .await
            .unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{e:?}");
        let mut r = agent::CreateContainerRequest::new();
        r.container_id = id.clone();
        r.spec_json = "{ not json".into();
        let e = ctx
            .client
            .create_container(ctx_rpc(), &r)
            .await
            .unwrap_err();
        assert!(message(&e).contains("not an OCI runtime spec"), "{e:?}");
        let e = ctx
            .create("../escape", &ctx.spec(&["true"]), false)
            .await
            .unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
        let mut bad_root = ctx.spec(&["true"]);
        bad_root["root"]["path"] = json!("/no/such/rootfs");
        let e = ctx.create(&id, &bad_root, false).await.unwrap_err();
        assert!(message(&e).contains("/no/such/rootfs"), "{e:?}");

        ctx.create(&id, &ctx.spec(&["sleep", "1000"]), false)
            .await
            .unwrap();
        let e = ctx
            .create(&id, &ctx.spec(&["true"]), false)
            .await
            .unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::ALREADY_EXISTS, "{e:?}");
        let e = ctx.read(&id, "", false, u32::MAX).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{e:?}");
        let e = ctx.read(&id, "", false, 0).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{e:?}");
        let e = ctx.signal(&id, "", 1000, false).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{e:?}");
        let e = ctx.write(&id, "", b"x").await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e:?}");
        let e = ctx.wait(&id, "no-such-exec").await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::NOT_FOUND, "{e:?}");
        let e = ctx.start("no-such-container").await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::NOT_FOUND, "{e:?}");
        let mut big = agent::WriteStreamRequest::new();
        big.container_id = id.clone();
        big.data = vec![0; (1 << 20) + 1];
        let e = ctx.client.write_stdin(ctx_rpc(), &big).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{e:?}");
        ctx.remove(&id, true).await.unwrap();

        // Still serving.
        let out = ctx
            .run(&unique(&ctx, "after"), &ctx.spec(&["echo", "ok"]), None)
            .await
            .unwrap();
        assert_eq!(out.out(), "ok\n");
    }

    async fn futures_join_all<F>(fs: impl Iterator<Item = F>)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        for f in fs {
            set.spawn(f);
        }
        while let Some(r) = set.join_next().await {
            r.expect("a concurrent run failed");
        }
    }
}

/// Makes a `#[tokio::test]` of each case, given `async fn ctx(name: &str) -> (Ctx, Guard)` in
/// scope (the guard keeps the agent alive for the case).
#[macro_export]
macro_rules! container_cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (ctx, _guard) = ctx(stringify!($case)).await;
                $crate::containers::cases::$case(ctx).await;
            }
        )*
    };
}

/// Every case, for `container_cases!`.
#[macro_export]
macro_rules! all_container_cases {
    () => {
        $crate::container_cases!(
            echo_output,
            default_signal_dispositions,
            exit_codes,
            signals,
            stdin_round_trip,
            terminal,
            exec_shares_namespaces,
            oom,
            pids_limit,
            readonly_rootfs,
            process_settings,
            capabilities,
            pause_resume_and_stats,
            fifty_concurrent,
            nothing_left_after_remove,
            spec_details,
            cgroup_limits_and_update,
            wait_survives_reconnect,
            bad_input,
        );
    };
}
