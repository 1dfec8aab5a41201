//! The containerd shim end to end: Debian's containerd (a private instance under `/run`),
//! `ctr` with `--runtime io.containerd.kata.v2`, Hull's shim from this workspace, and a VM per
//! sandbox. Every case asserts what `ctr` printed and returned, and what is left on the machine.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hull_tests::containerd::{Containerd, HullPaths, BUSYBOX_IMAGE, HULL_RUNTIME};

/// One containerd for the suite (the cases run one at a time).
fn ctd() -> &'static Containerd {
    static CTD: OnceLock<Containerd> = OnceLock::new();
    CTD.get_or_init(|| {
        let dir = PathBuf::from(format!("/run/hull-shim-test-{}", std::process::id()));
        let paths = HullPaths {
            vmm: hull_tests::vmm_bin(),
            ..HullPaths::workspace("debug")
        };
        let c = Containerd::start(&dir, &paths, true).expect("containerd starts");
        c.import_busybox().expect("the busybox image imports");
        c
    })
}

/// Serializes cases that look at the whole machine.
fn machine() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ctr run --rm --runtime io.containerd.kata.v2 <busybox> <id> ARGS`, stdin from `input`.
fn ctr_run(id: &str, extra: &[&str], args: &[&str], input: Option<&[u8]>) -> Output {
    let c = ctd();
    let mut v = vec!["run", "--rm", "--runtime", HULL_RUNTIME];
    v.extend_from_slice(extra);
    v.extend_from_slice(&[BUSYBOX_IMAGE, id]);
    v.extend_from_slice(args);
    let mut cmd = c.ctr(&v);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ctr");
    // A guest that hangs must fail this test, not stall the whole harness run: ctr is killed
    // after CTR_TIMEOUT (a normal run here takes seconds).
    // The pid stays ours until wait_with_output reaps it, after which the deadline is disarmed.
    let deadline = KillAfter::arm(child.id() as i32, CTR_TIMEOUT);
    if let Some(data) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let killed = deadline.disarm();
    assert!(
        !killed,
        "ctr run {id} did not end within {CTR_TIMEOUT:?} and was killed\nstdout: {}\ncontainerd: {}",
        text(&out.stdout),
        tail(&ctd().log(), 60)
    );
    out
}

/// The longest one `ctr run` may take in this suite before it counts as hung.
const CTR_TIMEOUT: Duration = Duration::from_secs(240);

/// A deadline for a process that may hang: unless disarmed first, it SIGKILLs `pid` when `limit`
/// has passed, so that a hung guest fails one test instead of stalling the whole harness run.
struct KillAfter {
    done: std::sync::mpsc::Sender<()>,
    watchdog: std::thread::JoinHandle<bool>,
}

impl KillAfter {
    /// Arms it. `pid` must stay the caller's process until [`KillAfter::disarm`].
    fn arm(pid: i32, limit: Duration) -> Self {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let timed_out = matches!(
                finished.recv_timeout(limit),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if timed_out {
                // SAFETY: kill(2) on a process the caller still owns (not disarmed, so not reaped).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            timed_out
        });
        Self { done, watchdog }
    }

    /// Disarms it; whether it had fired.
    fn disarm(self) -> bool {
        let _ = self.done.send(());
        self.watchdog.join().unwrap()
    }
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}\ncontainerd: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        tail(&ctd().log(), 40)
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn run_prints_the_guest_kernel_and_echo_is_byte_exact() {
    let _m = machine();
    let out = ctr_run("echo1", &[], &["uname", "-r"], None);
    assert_ok(&out, "ctr run uname -r");
    assert_eq!(
        text(&out.stdout),
        format!("{}\n", hull_tests::guest_image().release)
    );
    let host = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_ne!(
        text(&out.stdout),
        host,
        "uname ran on the host, not in the VM"
    );

    // The other name, io.containerd.hull.v2, is the same shim.
    let c = ctd();
    let out = c
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.hull.v2",
            BUSYBOX_IMAGE,
            "echo0",
            "echo",
            "hull-v2",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&out, "ctr run --runtime io.containerd.hull.v2");
    assert_eq!(text(&out.stdout), "hull-v2\n");

    let payload = "tabs\there, spaces  and ünïcödé\\n no newline at the end";
    let out = ctr_run("echo2", &[], &["printf", "%s", payload], None);
    assert_ok(&out, "ctr run printf");
    assert_eq!(text(&out.stdout), payload);
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));

    // A file:// log URI: both streams end up in the file.
    let log = c.dir.join("echo3.log");
    let uri = format!("file://{}", log.display());
    let out = ctr_run(
        "echo3",
        &["--log-uri", &uri],
        &["sh", "-c", "echo out; echo err >&2"],
        None,
    );
    assert_ok(&out, "ctr run --log-uri file://");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("out\n") && logged.contains("err\n"),
        "{logged:?}"
    );
}

#[test]
fn volumes_reach_the_container_read_only_or_read_write() {
    let _m = machine();
    let c = ctd();
    let ro = c.dir.join("vol-ro");
    let rw = c.dir.join("vol-rw");
    for d in [&ro, &rw] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(ro.join("in.txt"), "from the host\n").unwrap();
    let ro_mount = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
    let rw_mount = format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display());
    let out = ctr_run(
        "volumes",
        &["--mount", &ro_mount, "--mount", &rw_mount],
        &[
            "sh",
            "-c",
            "cat /ro/in.txt; touch /ro/new 2>/dev/null && echo ro-written || echo ro-refused; \
             echo from the guest > /rw/out.txt && echo rw-written",
        ],
        None,
    );
    assert_ok(&out, "ctr run --mount");
    assert_eq!(text(&out.stdout), "from the host\nro-refused\nrw-written\n");
    assert!(!ro.join("new").exists(), "the read-only volume was written");
    assert_eq!(
        std::fs::read_to_string(rw.join("out.txt")).unwrap(),
        "from the guest\n",
        "what the container wrote is on the host"
    );
    wait_clean();
}

#[test]
fn exit_codes_come_back() {
    let _m = machine();
    for (code, script) in [
        (0, "exit 0"),
        (3, "exit 3"),
        (137, "sh -c 'kill -9 $$'; exit $?"),
        (127, "no-such-cmd"),
    ] {
        let out = ctr_run(&format!("exit{code}"), &[], &["sh", "-c", script], None);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{script}: stderr {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn stdin_reaches_the_container_and_its_end_too() {
    let _m = machine();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = ctr_run(
        "stdin1",
        &[],
        &["sh", "-c", "cat | wc -c; echo done"],
        Some(&data),
    );
    assert_ok(&out, "ctr run with stdin");
    assert_eq!(text(&out.stdout), "200000\ndone\n");
}

/// What Hull leaves on the machine: its processes, mounts, sockets, state.
fn leftovers(c: &Containerd) -> Vec<String> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read_to_string(entry.path().join("cmdline")) else {
            continue;
        };
        let first = cmd.split('\0').next().unwrap_or_default();
        let name = Path::new(first)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        if ["hull-vmm", "virtiofsd", "containerd-shim-kata-v2"].contains(&name.as_ref()) {
            v.push(format!(
                "process {}: {}",
                entry.file_name().to_string_lossy(),
                cmd.replace('\0', " ")
            ));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mounts.lines() {
        let point = l.split(' ').nth(4).unwrap_or_default();
        if point.starts_with(&c.hull_state.display().to_string()) {
            v.push(format!("mount {point}"));
        }
    }
    if let Ok(d) = std::fs::read_dir(&c.hull_state) {
        v.extend(d.flatten().map(|e| format!("state {}", e.path().display())));
    }
    if let Ok(d) = std::fs::read_dir("/sys/fs/cgroup/hull") {
        v.extend(
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| format!("cgroup {}", e.path().display())),
        );
    }
    if let Ok(d) = std::fs::read_dir(c.dir.join("s")) {
        v.extend(
            d.flatten()
                .map(|e| format!("socket {}", e.path().display())),
        );
    }
    v
}

#[test]
fn run_delete_cycles_leave_nothing_behind() {
    let _m = machine();
    let c = ctd();
    let t = Instant::now();
    for i in 0..20 {
        let out = ctr_run(&format!("cycle{i}"), &[], &["true"], None);
        assert_ok(&out, "ctr run true");
    }
    eprintln!("20 cycles in {:?}", t.elapsed());
    let _ = c;
    wait_clean();
}

/// A `ctr run --rm` in the background whose container printed `ready`.
struct Running {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    id: String,
}

impl Running {
    /// Starts `ctr run --rm … ID sh -c SCRIPT` and waits for its `ready` line.
    fn start(id: &str, extra: &[&str], script: &str) -> Self {
        use std::io::BufRead as _;
        let c = ctd();
        let mut v = vec!["run", "--rm", "--runtime", HULL_RUNTIME];
        v.extend_from_slice(extra);
        v.extend_from_slice(&[BUSYBOX_IMAGE, id, "sh", "-c", script]);
        let mut child = c
            .ctr(&v)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if line != "ready\n" {
            let _ = child.kill();
            let end = child.wait_with_output();
            panic!(
                "{id} did not start: stdout began {line:?}; ctr: {:?}\ncontainerd: {}",
                end.map(|o| (o.status, text(&o.stderr))),
                tail(&c.log(), 40)
            );
        }
        Self {
            child,
            out,
            id: id.to_string(),
        }
    }

    /// Waits for ctr; its exit code and the rest of stdout.
    fn finish(mut self) -> (Option<i32>, String) {
        use std::io::Read as _;
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let st = self.child.wait().unwrap();
        (st.code(), rest)
    }
}

fn ctr_ok(args: &[&str]) -> String {
    let out = ctd().ctr_output(args);
    assert_ok(&out, &format!("ctr {}", args.join(" ")));
    text(&out.stdout)
}

/// A container that handles SIGTERM and keeps running until told.
const SERVICE: &str = "trap 'echo term; exit 143' TERM; echo $$ > /pid; echo ready; \
                       while true; do sleep 1; done";

#[test]
fn kill_term_and_kill_9_end_the_container_with_their_codes() {
    let _m = machine();
    let r = Running::start("kill-term", &[], SERVICE);
    ctr_ok(&["task", "kill", "-s", "SIGTERM", &r.id]);
    let (code, rest) = r.finish();
    assert_eq!((code, rest.as_str()), (Some(143), "term\n"));

    let r = Running::start("kill-9", &[], SERVICE);
    ctr_ok(&["task", "kill", "-s", "SIGKILL", &r.id]);
    assert_eq!(r.finish().0, Some(137));
}

#[test]
fn exec_ps_metrics_pause_and_resume_work_on_a_running_task() {
    let _m = machine();
    let r = Running::start(
        "busy",
        &[],
        "echo shared > /marker; echo ready; while true; do sleep 1; done",
    );
    // exec: same filesystem, same PID namespace (the init is PID 1 there).
    let out = ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "look",
        &r.id,
        "sh",
        "-c",
        "cat /marker; tr '\\0' ' ' < /proc/1/cmdline; echo",
    ]);
    assert!(out.starts_with("shared\nsh -c echo shared"), "{out}");
    let out = ctd()
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "fail",
            &r.id,
            "sh",
            "-c",
            "exit 7",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));

    // ps: the init and its sleep, at least.
    let ps = ctr_ok(&["task", "ps", &r.id]);
    assert!(ps.lines().count() >= 3, "{ps}");

    // metrics: the cgroup v2 numbers from the guest.
    let m = ctr_ok(&["task", "metrics", &r.id]);
    assert!(
        m.contains("pids.current") && m.contains("memory.usage"),
        "{m}"
    );

    // pause / resume, as containerd sees them.
    ctr_ok(&["task", "pause", &r.id]);
    let ls = ctr_ok(&["task", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("busy ") && l.contains("PAUSED")),
        "{ls}"
    );
    ctr_ok(&["task", "resume", &r.id]);
    let ls = ctr_ok(&["task", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("busy ") && l.contains("RUNNING")),
        "{ls}"
    );
    // …and it still runs: an exec answers.
    assert_eq!(
        ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "again",
            &r.id,
            "cat",
            "/marker"
        ]),
        "shared\n"
    );

    ctr_ok(&["task", "kill", "-s", "SIGKILL", &r.id]);
    assert_eq!(r.finish().0, Some(137));
}

#[test]
fn a_terminal_is_a_terminal() {
    let _m = machine();
    let c = ctd();
    // ctr -t needs a terminal of its own: script(1) gives it one.
    let ctr = format!(
        "ctr --address {} -n default run --rm -t --runtime {HULL_RUNTIME} {BUSYBOX_IMAGE} tty1 \
         sh -c 'test -t 0 && test -t 1 && echo on-a-tty; tty'",
        c.address.display()
    );
    let out = Command::new("script")
        .args(["-qefc", &ctr, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&out, "ctr run -t under script");
    let t = text(&out.stdout).replace('\r', "");
    assert!(t.contains("on-a-tty\n/dev/pts/"), "{t:?}");
}

#[test]
fn two_containers_of_a_pod_share_the_vm_but_not_their_files() {
    let _m = machine();
    let loop_ = "echo ready; while true; do sleep 1; done";
    let sandbox = Running::start(
        "pod1",
        &["--annotation", "io.kubernetes.cri.container-type=sandbox"],
        loop_,
    );
    let app = Running::start(
        "pod1-app",
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod1",
        ],
        loop_,
    );
    let boot = |id: &str, e: &str| {
        ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            e,
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
    };
    assert_eq!(
        boot("pod1", "b1"),
        boot("pod1-app", "b2"),
        "not the same VM"
    );
    ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "w",
        "pod1",
        "touch",
        "/only-in-the-sandbox",
    ]);
    let seen = ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "r",
        "pod1-app",
        "sh",
        "-c",
        "test -e /only-in-the-sandbox && echo shared || echo separate",
    ]);
    assert_eq!(seen, "separate\n");
    // One VM: one hull-vmm for both.
    let vmms = std::fs::read_dir(&ctd().hull_state).unwrap().count();
    assert_eq!(vmms, 1, "sandbox directories");
    ctr_ok(&["task", "kill", "-s", "SIGKILL", "pod1-app"]);
    assert_eq!(app.finish().0, Some(137));
    ctr_ok(&["task", "kill", "-s", "SIGKILL", "pod1"]);
    assert_eq!(sandbox.finish().0, Some(137));
    wait_clean();
}

/// Waits (bounded) until Hull left nothing behind, and asserts it.
fn wait_clean() {
    wait_clean_of(ctd());
}

/// [`wait_clean`] for containerd `c`.
fn wait_clean_of(c: &Containerd) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut left = leftovers(c);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = leftovers(c);
    }
    assert!(left.is_empty(), "left behind: {left:#?}");
}

fn pid_in(file: &Path) -> i32 {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_killed_vmm_ends_the_task_with_255() {
    let _m = machine();
    let r = Running::start("vmm-dies", &[], SERVICE);
    let vmm = pid_in(&ctd().hull_state.join("vmm-dies/vmm.pid"));
    // SAFETY: kill(2) with a pid read from the sandbox's pid file.
    unsafe { libc::kill(vmm, libc::SIGKILL) };
    assert_eq!(r.finish().0, Some(255));
    wait_clean();
}

#[test]
fn a_hung_guest_is_caught_and_ends_the_task_with_255() {
    let _m = machine();
    let c = ctd();
    // Liveness checks every second, 10 s to answer (the defaults are 5 s and 30 s).
    let good = std::fs::read_to_string(&c.hull_config).unwrap();
    let toml = good.replace(
        "agent_timeout = 300\n",
        "agent_timeout = 300\nagent_check_interval = 1\nagent_check_timeout = 10\n",
    );
    assert_ne!(toml, good, "the test configuration changed: {good}");
    let path = c.dir.join("liveness.toml");
    std::fs::write(&path, toml).unwrap();
    let p = path.display().to_string();
    let r = Running::start("hung", &["--runtime-config-path", &p], SERVICE);
    let vmm = pid_in(&c.hull_state.join("hung/vmm.pid"));
    // SIGSTOP: the VM is still there, but nothing in it runs any more, as with a wedged guest.
    // SAFETY: kill(2) with a pid read from the sandbox's pid file.
    unsafe { libc::kill(vmm, libc::SIGSTOP) };
    // Should the shim never notice, the VMM is killed after CTR_TIMEOUT so that the suite goes on
    // (while ctr waits, the shim has not reaped it: the pid is still the VMM's).
    let deadline = KillAfter::arm(vmm, CTR_TIMEOUT);
    let code = r.finish().0;
    assert!(
        !deadline.disarm(),
        "the shim did not notice a stopped VMM within {CTR_TIMEOUT:?}"
    );
    assert_eq!(code, Some(255));
    let log = c.log();
    let line = log
        .lines()
        .find(|l| l.contains("failed its liveness check"))
        .unwrap_or_else(|| {
            panic!(
                "the shim log does not say why the task ended: {}",
                tail(&log, 40)
            )
        });
    // What hull-vmm's threads were doing: here every one is stopped (T), vCPU 0 among them.
    assert!(line.contains("vcpu0 T cpu="), "{line}");
    wait_clean();
}

/// hull-vmm's resident memory, KiB (guest RAM it holds included).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Polls `rss_kib(pid)` (bounded) until `done` holds for it; returns the last value.
fn rss_until(pid: i32, done: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = rss_kib(pid);
    while !done(now) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        now = rss_kib(pid);
    }
    now
}

#[test]
fn memory_the_guest_frees_goes_back_to_the_host() {
    let _m = machine();
    let r = Running::start("balloon", &[], SERVICE);
    let vmm = pid_in(&ctd().hull_state.join("balloon/vmm.pid"));
    let exec = |eid: &str, cmd: &[&str]| {
        let mut v = vec!["task", "exec", "--exec-id", eid, "balloon"];
        v.extend_from_slice(cmd);
        ctr_ok(&v)
    };
    let bound = exec("drv", &["ls", "/sys/bus/virtio/drivers/virtio_balloon"]);
    // The shim asks for free blocks smaller than the kernel's 2 MiB default on the guest's command
    // line; Linux 6.1's balloon driver overwrites that when it registers, and the agent sets it
    // again: what the kernel uses must be what the command line says.
    let cmdline = exec("cmdline", &["cat", "/proc/cmdline"]);
    let asked = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("page_reporting.page_reporting_order="))
        .map(str::to_owned);
    let order = exec(
        "order",
        &[
            "cat",
            "/sys/module/page_reporting/parameters/page_reporting_order",
        ],
    );
    // The guest fills 48 MiB of tmpfs (the container's /dev/shm, in guest RAM): the host holds
    // it (some of it may land on guest pages the host already held, hence the margin).
    let before = rss_kib(vmm);
    exec(
        "fill",
        &["dd", "if=/dev/zero", "of=/dev/shm/f", "bs=1M", "count=48"],
    );
    let held = rss_until(vmm, |kib| kib >= before + 24 * 1024);
    // The guest frees it: page reporting (2 s later) gives it back to the host.
    exec("free", &["rm", "/dev/shm/f"]);
    let after = rss_until(vmm, |kib| kib + 24 * 1024 <= held);
    // Stop the container before asserting: a failure must not leave it to the next cases.
    ctr_ok(&["task", "kill", "-s", "SIGKILL", "balloon"]);
    assert_eq!(r.finish().0, Some(137));
    wait_clean();
    assert!(
        bound.contains("virtio"),
        "no device bound to virtio_balloon: {bound:?}"
    );
    let asked = asked.unwrap_or_else(|| panic!("no page reporting order in {cmdline:?}"));
    assert_eq!(
        order.trim(),
        asked,
        "the guest reports free pages in blocks of order {order:?}, its command line says {asked}"
    );
    assert!(
        held >= before + 24 * 1024,
        "hull-vmm RSS {before} -> {held} KiB after the fill"
    );
    assert!(
        after + 24 * 1024 <= held,
        "hull-vmm RSS {held} KiB with the file, {after} KiB a minute after it was removed"
    );
}

#[test]
fn the_same_id_in_another_namespace_is_refused_and_harms_nothing() {
    let _m = machine();
    let c = ctd();
    let r = Running::start("same-id", &[], SERVICE);
    // `ctr -n hull-other`: the image, then a container of the same id.
    let other = |args: &[&str]| {
        Command::new("ctr")
            .arg("--address")
            .arg(&c.address)
            .args(["-n", "hull-other"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let tar = hull_tests::containers::fixtures().join("oci.tar");
    let import = other(&["images", "import", &tar.display().to_string()]);
    let out = other(&[
        "run",
        "--rm",
        "--runtime",
        HULL_RUNTIME,
        BUSYBOX_IMAGE,
        "same-id",
        "true",
    ]);
    let _ = other(&["container", "delete", "same-id"]);
    // The first sandbox still serves.
    let alive = c.ctr_output(&["task", "exec", "--exec-id", "e", "same-id", "echo", "alive"]);
    ctr_ok(&["task", "kill", "-s", "SIGKILL", "same-id"]);
    assert_eq!(r.finish().0, Some(137));
    let _ = other(&["images", "rm", BUSYBOX_IMAGE]);
    wait_clean();
    assert!(import.status.success(), "import: {import:?}");
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already running") && err.contains("use another id"),
        "{:?} {err}",
        out.status
    );
    assert_eq!(text(&alive.stdout), "alive\n", "{alive:?}");
}

#[test]
fn a_killed_shim_is_cleaned_up_by_task_delete() {
    let _m = machine();
    let c = ctd();
    let out = c.ctr_output(&[
        "run",
        "-d",
        "--runtime",
        HULL_RUNTIME,
        BUSYBOX_IMAGE,
        "shim-dies",
        "sleep",
        "1000",
    ]);
    assert_ok(&out, "ctr run -d");
    let shim = pid_in(
        &c.dir
            .join("state/io.containerd.runtime.v2.task/default/shim-dies/shim.pid"),
    );
    // SAFETY: kill(2) with the pid the shim's start wrote.
    unsafe { libc::kill(shim, libc::SIGKILL) };
    // containerd notices and cleans up (the shim's `delete`); a task delete after that finds
    // nothing or finishes the job.
    let del = c.ctr_output(&["task", "delete", "shim-dies"]);
    let msg = text(&del.stderr);
    assert!(del.status.success() || msg.contains("not found"), "{msg}");
    ctr_ok(&["container", "delete", "shim-dies"]);
    wait_clean();
}

#[test]
fn bad_configuration_and_annotations_fail_the_create_with_a_message() {
    let _m = machine();
    let c = ctd();
    let good = std::fs::read_to_string(&c.hull_config).unwrap();
    // A virtiofsd that dies at once: the create names it and gives its last words.
    let failing_virtiofsd = c.dir.join("failing-virtiofsd");
    std::fs::write(
        &failing_virtiofsd,
        "#!/bin/sh\necho 'hull-test: this virtiofsd refuses to serve' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &failing_virtiofsd,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cases = [
        (
            "missing-kernel",
            good.replace(
                &format!(
                    "kernel = {:?}",
                    hull_tests::guest_image().vmlinux.display().to_string()
                ),
                "kernel = \"/no/such/vmlinux\"",
            ),
            &[][..],
            "/no/such/vmlinux",
        ),
        (
            "bad-value",
            format!("{good}\n[other]\nx = 1\n"),
            &[][..],
            "other",
        ),
        (
            "virtiofsd-fails",
            good.replace(
                &format!(
                    "virtiofsd = {:?}",
                    hull_tests::virtiofsd::binary().display().to_string()
                ),
                &format!("virtiofsd = {:?}", failing_virtiofsd.display().to_string()),
            ),
            &[][..],
            "hull-test: this virtiofsd refuses to serve",
        ),
        (
            "bad-annotation",
            good.clone(),
            &[
                "--annotation",
                "io.katacontainers.config.hypervisor.default_vcpus=lots",
            ][..],
            "default_vcpus",
        ),
    ];
    for (name, toml, extra, needle) in cases {
        let path = c.dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        let p = path.display().to_string();
        let mut args = vec!["--runtime-config-path", p.as_str()];
        args.extend_from_slice(extra);
        let out = ctr_run(name, &args, &["true"], None);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{name}: {:?} {err}",
            out.status
        );
        let _ = c.ctr_output(&["container", "delete", name]);
    }
    wait_clean();
}

/// `ctr events` of containerd `c`, its output piped (kill it, then read).
fn ctr_events(c: &Containerd) -> std::process::Child {
    c.ctr(&["events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn events_reach_containerd_and_an_oom_kill_is_one() {
    let _m = machine();
    let c = ctd();
    let mut events = ctr_events(c);
    // 64 MiB for the container; `tail` holds all of /dev/zero's one endless line.
    let out = ctr_run(
        "oom1",
        &["--memory-limit", "67108864"],
        &["sh", "-c", "echo start; exec tail /dev/zero"],
        None,
    );
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "start\n");
    let out = ctr_run("ev1", &[], &["true"], None);
    assert_ok(&out, "ctr run true");
    let _ = events.kill();
    let got = events.wait_with_output().unwrap();
    let log = text(&got.stdout);
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/oom",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(topic) && (l.contains("oom1") || l.contains("ev1"))),
            "no {topic} event: {log}"
        );
    }
    let ev1: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"ev1\"") || l.contains("ev1"))
        .collect();
    let pos = |t: &str| ev1.iter().position(|l| l.contains(t));
    assert!(
        pos("/tasks/start") < pos("/tasks/exit") && pos("/tasks/exit") < pos("/tasks/delete"),
        "{ev1:#?}"
    );
}

/// The ready warm sandbox directory (`.warm-…`) in the state directory, once there is one.
fn wait_for_warm(c: &Containerd) -> PathBuf {
    let ready = |p: &PathBuf| is_ready(p) && p.is_dir();
    wait_until_pool(c, |e| e.iter().any(ready))
        .into_iter()
        .find(ready)
        .unwrap()
}

/// Runs `containerd-shim-kata-v2 drain-warm` for configuration `config`.
fn drain_warm(c: &Containerd, config: &Path) -> String {
    let out = Command::new(c.shim_dir.join("containerd-shim-kata-v2"))
        .arg("drain-warm")
        .env("HULL_CONF_FILE", config)
        .output()
        .unwrap();
    assert_ok(&out, "drain-warm");
    text(&out.stdout)
}

/// Drains the warm pool even when the test fails half-way, so later cases start clean.
struct DrainOnDrop(PathBuf);

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let c = ctd();
        let _ = Command::new(c.shim_dir.join("containerd-shim-kata-v2"))
            .arg("drain-warm")
            .env("HULL_CONF_FILE", &self.0)
            .output();
    }
}

/// The scheduling policy of process `pid` (field 41 of its stat: 0 normal, 5 idle).
fn sched_policy(pid: i32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    // Field 3 (state) is the first after the name: policy (41) is the 39th from there.
    after.split_whitespace().nth(38).unwrap().parse().unwrap()
}

#[test]
fn a_warm_sandbox_serves_the_next_pod_and_the_pool_drains() {
    let _m = machine();
    let c = ctd();
    let config = c.dir.join("warm.toml");
    let good = std::fs::read_to_string(&c.hull_config).unwrap();
    std::fs::write(&config, format!("{good}\n[factory]\nwarm_vms = 1\n")).unwrap();
    let _drain = DrainOnDrop(config.clone());
    let p = config.display().to_string();
    let with_pool = ["--runtime-config-path", p.as_str()];

    // The first pod boots its own VM; its start launches a warm one at idle priority.
    let out = ctr_run("warm1", &with_pool, &["uname", "-r"], None);
    assert_ok(&out, "ctr run warm1");
    // The next start, while that one boots, counts it: a pool of one holds one. (That pod's
    // create fails on its annotation, so it boots no VM of its own: more L2 vCPUs at once than
    // L1 has make the harness unstable.)
    let out = ctr_run(
        "warm1x",
        &[
            "--runtime-config-path",
            p.as_str(),
            "--annotation",
            "io.katacontainers.config.hypervisor.default_vcpus=lots",
        ],
        &["true"],
        None,
    );
    assert!(!out.status.success(), "warm1x: {}", text(&out.stderr));
    let _ = c.ctr_output(&["container", "delete", "warm1x"]);
    let pool = wait_until_pool(c, |e| !e.is_empty() && e.iter().all(|p| is_ready(p)));
    assert_eq!(pool.len(), 1, "a pool of one: {pool:#?}");
    let warm = pool[0].clone();
    let vmm = pid_in(&warm.join("vmm.pid"));
    let shim = pid_in(&warm.join("shim.pid"));
    assert_eq!(sched_policy(vmm), 5, "a warm VM boots at SCHED_IDLE");

    // The next pod gets that VM and that shim.
    let r = Running::start("warm2", &with_pool, SERVICE);
    assert_eq!(pid_in(&c.hull_state.join("warm2/vmm.pid")), vmm);
    assert!(!warm.exists(), "the warm directory became the pod's");
    let bundle = c
        .dir
        .join("state/io.containerd.runtime.v2.task/default/warm2");
    assert_eq!(pid_in(&bundle.join("shim.pid")), shim);
    let cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    assert!(cgroup.trim_end().ends_with("/hull/warm2"), "{cgroup}");
    for pid in std::fs::read_to_string("/sys/fs/cgroup/hull/warm2/cgroup.procs")
        .unwrap()
        .lines()
    {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let tid = task.file_name().to_string_lossy().parse().unwrap();
            assert_eq!(
                sched_policy(tid),
                0,
                "thread {tid} of process {pid} of the adopted sandbox is not back to normal priority"
            );
        }
    }
    let echo = ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e",
        "warm2",
        "echo",
        "from the warm VM",
    ]);
    assert_eq!(echo, "from the warm VM\n");
    ctr_ok(&["task", "kill", "-s", "SIGTERM", "warm2"]);
    assert_eq!(r.finish(), (Some(143), "term\n".to_string()));

    // A pod of another size leaves the warm VM alone and boots its own.
    let warm = wait_for_warm(c);
    let out = ctr_run(
        "warm3",
        &[
            "--runtime-config-path",
            p.as_str(),
            "--annotation",
            "io.katacontainers.config.hypervisor.default_memory=320",
        ],
        &["true"],
        None,
    );
    assert_ok(&out, "ctr run warm3");
    assert!(
        warm.is_dir(),
        "the warm sandbox was taken by a pod it does not fit"
    );

    // The configuration changes (another default size): the next start retires the warm
    // sandbox booted for the old one and launches one of the new size.
    let resized = good.replacen("[hypervisor]\n", "[hypervisor]\ndefault_memory = 288\n", 1);
    assert_ne!(resized, good, "the test configuration changed: {good}");
    std::fs::write(&config, format!("{resized}\n[factory]\nwarm_vms = 1\n")).unwrap();
    let out = ctr_run("warm4", &with_pool, &["true"], None);
    assert_ok(&out, "ctr run warm4");
    let fresh = wait_until_pool(c, |e| e.len() == 1 && e[0] != warm && is_ready(&e[0]));
    let vmm = pid_in(&fresh[0].join("vmm.pid"));
    let args = std::fs::read_to_string(format!("/proc/{vmm}/cmdline")).unwrap();
    let args: Vec<&str> = args.split('\0').collect();
    assert!(
        args.windows(2).any(|w| w == ["--memory", "288"]),
        "{args:?}"
    );
    assert!(
        !warm.exists(),
        "the warm sandbox of the old configuration is still there"
    );

    // warm_vms = 0: the next start stops the pool.
    std::fs::write(&config, format!("{good}\n[factory]\nwarm_vms = 0\n")).unwrap();
    let out = ctr_run("warm5", &with_pool, &["true"], None);
    assert_ok(&out, "ctr run warm5");
    wait_until_pool(c, |e| e.is_empty());
    assert_eq!(drain_warm(c, &config), "stopped 0 warm sandbox(es)\n");
    wait_clean();
}

/// The warm pool's entries in the state directory (ready and booting directories, markers).
fn warm_entries(c: &Containerd) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(&c.hull_state)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy();
                    n.starts_with(".warm-") || n.starts_with(".boot-")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether warm pool entry `p` is a ready warm sandbox (`.warm-…`).
fn is_ready(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(".warm-"))
}

/// Waits (180 s at most) until the warm pool's entries satisfy `done`; returns them.
fn wait_until_pool(c: &Containerd, done: impl Fn(&[PathBuf]) -> bool) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let e = warm_entries(c);
        if done(&e) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "the warm pool did not settle within 180 s: {e:#?}; warm log: {}",
            std::fs::read_to_string(c.hull_state.join(".warm.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kata_annotations_size_the_vm() {
    let _m = machine();
    let out = ctr_run(
        "sized",
        &[
            "--annotation",
            "io.katacontainers.config.hypervisor.default_memory=640",
            "--annotation",
            "io.katacontainers.config.hypervisor.default_vcpus=2",
        ],
        &["sh", "-c", "grep MemTotal /proc/meminfo; nproc"],
        None,
    );
    assert_ok(&out, "ctr run sized");
    let t = text(&out.stdout);
    let kib: u64 = t.split_whitespace().nth(1).unwrap().parse().unwrap();
    // MemTotal is RAM less what the kernel keeps: between 512 and 640 MiB.
    assert!((512 * 1024..=640 * 1024).contains(&kib), "{t}");
    assert_eq!(t.lines().nth(1), Some("2"), "{t}");

    // A standalone container's own memory limit gets room in its VM (256 MiB default + 256).
    let out = ctr_run(
        "limited",
        &["--memory-limit", "268435456"],
        &["grep", "MemTotal", "/proc/meminfo"],
        None,
    );
    assert_ok(&out, "ctr run --memory-limit");
    let t = text(&out.stdout);
    let kib: u64 = t.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(kib > 400 * 1024, "{t}");
}

/// containerd 1.7 (Debian 13's package) and 2.x (Debian unstable's), unpacked by `cargo xtask
/// test`, drive the same shim as Debian 12's 1.6 does: the start handshake (2.x takes the plain
/// address as its version-2 fallback and speaks `containerd.task.v2.Task`), output and exit codes
/// through Wait, exec into a running container, SIGTERM, the task events, and nothing left after.
#[test]
fn containerd_1_7_and_2_x_drive_the_shim_as_1_6_does() {
    use std::io::{BufRead as _, Read as _};
    let _m = machine();
    for (var, want, short) in [
        ("HULL_CONTAINERD_1_7", " 1.7.", "c17"),
        ("HULL_CONTAINERD_2", " 2.", "c2"),
    ] {
        let bin = PathBuf::from(
            std::env::var(var)
                .unwrap_or_else(|_| panic!("{var} is unset (cargo xtask test sets it)")),
        );
        let version = Command::new(bin.join("containerd"))
            .arg("--version")
            .output()
            .unwrap();
        let version = text(&version.stdout);
        assert!(version.contains(want), "{var}: {version}");
        // Short: the shim's socket path under it must fit in a sockaddr_un.
        let dir = PathBuf::from(format!("/run/hull-{short}-{}", std::process::id()));
        let paths = HullPaths {
            vmm: hull_tests::vmm_bin(),
            ..HullPaths::workspace("debug")
        };
        let c = Containerd::start_release(&dir, &paths, true, Some(&bin))
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        c.import_busybox()
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        let ctr = |args: &[&str]| -> Output {
            let out = c.ctr_output(args);
            assert!(
                out.status.success(),
                "{version}: ctr {args:?}: {}\ncontainerd: {}",
                text(&out.stderr),
                tail(&c.log(), 40)
            );
            out
        };
        let mut events = ctr_events(&c);

        // Output and the exit code, through Wait.
        let out = c.ctr_output(&[
            "run",
            "--rm",
            "--runtime",
            HULL_RUNTIME,
            BUSYBOX_IMAGE,
            "rel-echo",
            "sh",
            "-c",
            "printf 'from the VM\\n'; exit 7",
        ]);
        assert_eq!(
            (out.status.code(), text(&out.stdout).as_str()),
            (Some(7), "from the VM\n"),
            "{version}: {}\ncontainerd: {}",
            text(&out.stderr),
            tail(&c.log(), 40)
        );

        // exec into a running container, then SIGTERM it.
        let mut run = c
            .ctr(&[
                "run",
                "--rm",
                "--runtime",
                HULL_RUNTIME,
                BUSYBOX_IMAGE,
                "rel-svc",
                "sh",
                "-c",
                SERVICE,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = KillAfter::arm(run.id() as i32, CTR_TIMEOUT);
        let mut stdout = std::io::BufReader::new(run.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            line,
            "ready\n",
            "{version}: containerd: {}",
            tail(&c.log(), 40)
        );
        let out = ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "rel-svc",
            "echo",
            "exec ok",
        ]);
        assert_eq!(text(&out.stdout), "exec ok\n", "{version}");
        ctr(&["task", "kill", "-s", "SIGTERM", "rel-svc"]);
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        let st = run.wait().unwrap();
        assert!(!deadline.disarm(), "{version}: ctr run rel-svc hung");
        assert_eq!(
            (st.code(), rest.as_str()),
            (Some(143), "term\n"),
            "{version}"
        );

        let _ = events.kill();
        let log = text(&events.wait_with_output().unwrap().stdout);
        for (id, topic) in [
            ("rel-echo", "/tasks/create"),
            ("rel-echo", "/tasks/start"),
            ("rel-echo", "/tasks/exit"),
            ("rel-echo", "/tasks/delete"),
            ("rel-svc", "/tasks/exec-added"),
            ("rel-svc", "/tasks/exec-started"),
            ("rel-svc", "/tasks/exit"),
        ] {
            assert!(
                log.lines().any(|l| l.contains(topic) && l.contains(id)),
                "{version}: no {topic} event for {id}: {log}"
            );
        }
        wait_clean_of(&c);
    }
}
