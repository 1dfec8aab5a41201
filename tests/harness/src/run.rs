//! Running a command: directly on a hardware-KVM host, otherwise inside one boot of the L1 VM.
//!
//! An L1 run: make sure the L1 image is built ([`crate::image`]), write the command script
//! ([`crate::script`]) under `target/harness/run/`, start QEMU ([`crate::qemu`]) with stdin from
//! `/dev/null`, and stream L1's console to our stdout line by line as it arrives ([`crate::console`]),
//! QEMU's stderr to our stderr (minus known noise). The command's exit status comes from L1's exit marker:
//! QEMU itself exits 0 either way, so a run without the marker is an error, never a pass.
//!
//! Limits ([`crate::watchdog`]): a wall-clock limit per attempt (an error naming the limit), and a silence
//! limit. A silent L1 is killed and the whole run retried (up to [`MAX_ATTEMPTS`] attempts), saying so (pitfall 6 of the harness
//! notes). QEMU never outlives the run: it is killed when the run fails or its guard is dropped, it gets
//! `SIGKILL` if this process dies (`PR_SET_PDEATHSIG`), and it shares our process group, so Ctrl-C in a
//! terminal reaches it too.
//!
//! The raw console of each attempt is logged to `target/harness/logs/`; the log is kept (and named in the
//! error) when the harness fails, and removed when the command's exit status arrived.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::console::{self, ConsoleEvent, Scanner};
use crate::host::{self, HostKind};
use crate::image::{self, ImageError};
use crate::qemu::{self, QemuConfig};
use crate::script;
use crate::watchdog::{Expiry, Watchdog};

/// Default wall-clock limit of one attempt.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default silence limit: L1 prints a heartbeat every 20 s while the command runs.
pub const DEFAULT_SILENCE_TIMEOUT: Duration = Duration::from_secs(90);
/// How many times a whole run is tried by default when L1 itself fails (goes silent, or its kernel reports a
/// lockup or panic): nested SVM under TCG hangs L1 now and then, more often under heavy nested
/// load, and that is not a test failure.
pub const MAX_ATTEMPTS: u32 = 3;
/// Environment variables always forwarded into L1 (plus every `HULL_*`).
pub const FORWARDED_ENV: &[&str] = &["PATH", "HOME", "RUST_BACKTRACE", "RUST_LOG"];
/// How many console lines an error quotes.
const TAIL_LINES: usize = 20;

/// How to run a command.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Wall-clock limit of one attempt (boot, command, power-off).
    pub timeout: Duration,
    /// How long L1 may print nothing (not even its heartbeat) before it counts as hung.
    pub silence_timeout: Duration,
    /// The command's environment inside L1 (on a hardware-KVM host: added to ours).
    pub env: Vec<(String, String)>,
    /// Where the command runs (the same path inside L1).
    pub workdir: PathBuf,
    /// The workspace `target/` directory: holds `harness/` and is shared read-write with L1.
    pub target_dir: PathBuf,
    /// Show the full L1 kernel log and the init's progress.
    pub verbose: bool,
    /// The host's kind; `None` detects it ([`host::detect`]).
    pub host: Option<HostKind>,
    /// How many times the whole run is tried when L1 itself fails (at least 1). A caller that can
    /// resume its own work (the test suite) sets 1 and retries what is left itself.
    pub max_attempts: u32,
}

impl Default for RunOptions {
    /// The defaults: 30 min, 120 s of silence, [`forwarded_env`], the current directory,
    /// [`default_target_dir`], verbose when `HULL_HARNESS_VERBOSE` is set.
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            silence_timeout: DEFAULT_SILENCE_TIMEOUT,
            env: forwarded_env(),
            workdir: std::env::current_dir().unwrap_or_else(|_| "/".into()),
            target_dir: default_target_dir(),
            verbose: std::env::var_os("HULL_HARNESS_VERBOSE")
                .is_some_and(|v| !v.is_empty() && v != "0"),
            host: None,
            max_attempts: MAX_ATTEMPTS,
        }
    }
}

/// The variables of our environment that go into L1: [`FORWARDED_ENV`] and every `HULL_*`.
pub fn forwarded_env() -> Vec<(String, String)> {
    select_env(std::env::vars())
}

fn select_env(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut env: Vec<_> = vars
        .filter(|(name, _)| FORWARDED_ENV.contains(&name.as_str()) || name.starts_with("HULL_"))
        .collect();
    env.sort();
    env
}

/// The workspace `target/` directory: `$CARGO_TARGET_DIR` if set, else `target/` at the workspace root.
pub fn default_target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return std::path::absolute(&dir).unwrap_or(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Nothing to run.
    #[error("no command given: pass the command to run after `--`")]
    EmptyCommand,
    /// QEMU is not installed.
    #[error("`{QEMU_BINARY}` not found: install it with `apt-get install qemu-system-x86`", QEMU_BINARY = qemu::QEMU_BINARY)]
    QemuMissing,
    /// A path cannot go on the L1 kernel command line.
    #[error("{0}: move the workspace (or set CARGO_TARGET_DIR) to a path without white space")]
    UnsafePath(String),
    /// A file or process operation failed.
    #[error("{action} {} failed: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or program.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The wall-clock limit passed.
    #[error("the run exceeded its wall-clock limit of {} s and was killed; raise it (--timeout) if the command needs longer; console log: {}", limit.as_secs(), log.display())]
    WallClock {
        /// The limit.
        limit: Duration,
        /// The console log.
        log: PathBuf,
    },
    /// L1 went silent in every attempt.
    #[error("L1 went silent (no console output for {} s, not even its heartbeat) in every attempt: L1 hangs, this is not a test failure; console log: {}", limit.as_secs(), log.display())]
    Silent {
        /// The silence limit.
        limit: Duration,
        /// The console log of the last attempt.
        log: PathBuf,
    },
    /// L1's kernel failed (soft lockup, RCU stall, panic) in every attempt.
    #[error("L1's kernel failed in every attempt ({line}): nested SVM under TCG is unstable, this is not a test failure; console log: {}", log.display())]
    L1Fault {
        /// The kernel line that showed it.
        line: String,
        /// The console log of the last attempt.
        log: PathBuf,
    },
    /// L1's init failed before it could run the command.
    #[error("L1 set-up failed before the command ran: {message}; console log: {}", log.display())]
    Setup {
        /// What the init reported.
        message: String,
        /// The console log.
        log: PathBuf,
    },
    /// QEMU exited without the exit marker.
    #[error("QEMU exited ({status}) without L1 reporting the command's exit status (L1 crashed, or its init failed early); last console lines:\n{tail}\nconsole log: {}", log.display())]
    NoExitStatus {
        /// QEMU's exit status.
        status: String,
        /// The last console lines.
        tail: String,
        /// The console log.
        log: PathBuf,
    },
    /// The command was killed on a hardware-KVM host after the wall-clock limit.
    #[error("the command exceeded its wall-clock limit of {} s and was killed; raise it (--timeout) if it needs longer", limit.as_secs())]
    HostTimeout {
        /// The limit.
        limit: Duration,
    },
}

impl RunError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| RunError::Io {
            action,
            path,
            source,
        }
    }
}

/// The crate's error: the image could not be built, or the run failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Building the L1 image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Running failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

impl HarnessError {
    /// Whether the run failed because L1 itself failed (went silent, or its kernel reported a lockup,
    /// stall or panic) rather than because of the command: worth another attempt.
    pub fn is_l1_failure(&self) -> bool {
        matches!(
            self,
            HarnessError::Run(RunError::Silent { .. } | RunError::L1Fault { .. })
        )
    }
}

/// Runs `cmd` (program and arguments) and returns its exit status (128 + N when killed by signal N).
pub fn run(cmd: &[String], opts: &RunOptions) -> Result<i32, HarnessError> {
    if cmd.is_empty() {
        return Err(RunError::EmptyCommand.into());
    }
    let host = opts.host.unwrap_or_else(host::detect);
    let target_dir = canonical_target_dir(&opts.target_dir)?;
    let harness_dir = target_dir.join("harness");
    let l1 = if host.needs_l1() {
        let image = image::ensure(&harness_dir)?;
        eprintln!(
            "hull-harness: {host:?} host: running in L1 (QEMU TCG, kernel {})",
            image.release
        );
        Some(image)
    } else {
        None
    };
    let script = ScriptFile::write(
        &harness_dir,
        &script::command_script(cmd, &opts.workdir, &opts.env),
    )?;
    match l1 {
        Some(image) => run_in_l1(&image, &script.path, &target_dir, opts),
        None => run_on_host(&script.path, opts),
    }
    .map_err(HarnessError::from)
}

/// Runs a POSIX shell script (`/bin/sh SCRIPT`, in `opts.workdir`): the way to run several commands in
/// ONE L1 boot. Put `set -e` first to stop at the first failure.
pub fn run_script(script_text: &str, opts: &RunOptions) -> Result<i32, HarnessError> {
    let dir = canonical_target_dir(&opts.target_dir)?.join("harness");
    let batch = ScriptFile::write(&dir, script_text)?;
    run(
        &[
            "/bin/sh".to_owned(),
            batch.path.to_string_lossy().into_owned(),
        ],
        opts,
    )
}

/// `target_dir` (created if missing) as an absolute path without symlinks or `..`: it is mounted at
/// that path inside L1.
fn canonical_target_dir(target_dir: &Path) -> Result<PathBuf, RunError> {
    fs::create_dir_all(target_dir).map_err(RunError::io("create", target_dir))?;
    fs::canonicalize(target_dir).map_err(RunError::io("resolve", target_dir))
}

/// A script under `target/harness/run/`, removed when dropped.
struct ScriptFile {
    path: PathBuf,
}

impl ScriptFile {
    fn write(harness_dir: &Path, text: &str) -> Result<Self, RunError> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = harness_dir.join("run");
        fs::create_dir_all(&dir).map_err(RunError::io("create", &dir))?;
        remove_orphans(&dir);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{}-{n}.sh", std::process::id()));
        fs::write(&path, text).map_err(RunError::io("write", &path))?;
        Ok(Self { path })
    }
}

/// Removes the scripts of processes that died without cleaning up (killed by a signal): the file names
/// start with the writer's process id.
fn remove_orphans(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl Drop for ScriptFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Runs the command script directly (hardware-KVM host), with our environment plus `opts.env`.
fn run_on_host(script: &Path, opts: &RunOptions) -> Result<i32, RunError> {
    let mut child = Command::new("/bin/sh")
        .arg(script)
        .stdin(Stdio::null())
        .spawn()
        .map_err(RunError::io("run", Path::new("/bin/sh")))?;
    let deadline = Instant::now() + opts.timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(RunError::io("wait for", script))? {
            return Ok(exit_code(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunError::HostTimeout {
                limit: opts.timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Runs the command script in L1, trying again (up to `opts.max_attempts` in all) if L1 itself fails.
fn run_in_l1(
    image: &image::L1Image,
    script: &Path,
    target_dir: &Path,
    opts: &RunOptions,
) -> Result<i32, RunError> {
    for path in [script, target_dir] {
        if let Some(problem) = qemu::cmdline_path_problem(path) {
            return Err(RunError::UnsafePath(problem));
        }
    }
    let logs = target_dir.join("harness/logs");
    fs::create_dir_all(&logs).map_err(RunError::io("create", &logs))?;
    let max_attempts = opts.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        let config = QemuConfig {
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            target_dir: target_dir.to_owned(),
            script: script.to_owned(),
            nonce: nonce(),
            verbose: opts.verbose,
            memory_mib: 4096,
            cpus: 2,
        };
        let log = logs.join(format!("{}.log", script_stem(script, attempt)));
        match boot(&config, opts, &log)? {
            Outcome::Exit(code) => {
                let _ = fs::remove_file(&log);
                return Ok(code);
            }
            Outcome::Silent if attempt < max_attempts => {
                eprintln!(
                    "hull-harness: L1 WENT SILENT: no console output for {} s, not even its heartbeat (a known \
                     L1 hang, harness-notes pitfall 6). QEMU killed; RETRYING THE WHOLE RUN (attempt {} of {max_attempts}). Log: {}",
                    opts.silence_timeout.as_secs(),
                    attempt + 1,
                    log.display()
                );
                attempt += 1;
            }
            Outcome::L1Fault(line) if attempt < max_attempts => {
                eprintln!(
                    "hull-harness: L1'S KERNEL FAILED ({line}): nested SVM under TCG is unstable under load. \
                     QEMU killed; RETRYING THE WHOLE RUN (attempt {} of {max_attempts}). Log: {}",
                    attempt + 1,
                    log.display()
                );
                attempt += 1;
            }
            Outcome::L1Fault(line) => return Err(RunError::L1Fault { line, log }),
            Outcome::Silent => {
                return Err(RunError::Silent {
                    limit: opts.silence_timeout,
                    log,
                })
            }
            Outcome::WallClock => {
                return Err(RunError::WallClock {
                    limit: opts.timeout,
                    log,
                })
            }
            Outcome::Setup(message) => return Err(RunError::Setup { message, log }),
            Outcome::NoExitStatus { status, tail } => {
                return Err(RunError::NoExitStatus { status, tail, log })
            }
        }
    }
}

fn script_stem(script: &Path, attempt: u32) -> String {
    let stem = script
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{stem}-attempt{attempt}")
}

/// A fresh marker nonce: 16 hex digits from the kernel's random source.
fn nonce() -> String {
    let mut bytes = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        bytes = (t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How one boot of L1 ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Exit(i32),
    Silent,
    L1Fault(String),
    WallClock,
    Setup(String),
    NoExitStatus { status: String, tail: String },
}

/// What the reader threads send.
enum Message {
    Console(Vec<u8>),
    ConsoleClosed,
    Stderr(String),
}

/// QEMU, killed when dropped.
struct Qemu {
    child: Child,
}

impl Qemu {
    fn spawn(config: &QemuConfig) -> Result<Self, RunError> {
        let mut command = Command::new(qemu::QEMU_BINARY);
        command
            .args(config.argv())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
        // async-signal-safe; it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match command.spawn() {
            Ok(child) => Ok(Self { child }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(RunError::QemuMissing),
            Err(e) => Err(RunError::io("start", Path::new(qemu::QEMU_BINARY))(e)),
        }
    }

    /// QEMU's exit status, waiting at most `limit` before killing it.
    fn finish(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    return self
                        .child
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| format!("{s}, killed"));
                }
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Boots L1 once and streams its console until QEMU exits or a limit passes.
fn boot(config: &QemuConfig, opts: &RunOptions, log_path: &Path) -> Result<Outcome, RunError> {
    let mut log = File::create(log_path).map_err(RunError::io("create", log_path))?;
    let _ = writeln!(log, "# {} {:?}", qemu::QEMU_BINARY, config.argv());
    let start = Instant::now();
    let mut qemu = Qemu::spawn(config)?;
    let (tx, rx) = mpsc::channel();
    if let Some(mut stdout) = qemu.child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(Message::Console(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            let _ = tx.send(Message::ConsoleClosed);
        });
    }
    if let Some(stderr) = qemu.child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(Message::Stderr(line)).is_err() {
                    return;
                }
            }
        });
    }
    let watchdog = Watchdog::new(start, opts.timeout, opts.silence_timeout);
    let mut session = Session::new(&config.nonce, watchdog, opts.verbose);
    let ended = session.pump(&rx, &mut log, start);
    // After the exit marker or a passed limit there is nothing left to wait for; otherwise the console
    // closed, so QEMU is exiting.
    let done = session.exit.is_some() || ended.is_some();
    let status = qemu.finish(if done {
        Duration::ZERO
    } else {
        Duration::from_secs(5)
    });
    let _ = writeln!(log, "# QEMU: {status}");
    let outcome = match (ended, session.exit, session.setup_error.take()) {
        (_, Some(code), _) => {
            eprintln!(
                "hull-harness: command exited with status {code} (L1 wall {:.1} s, command started at {})",
                start.elapsed().as_secs_f64(),
                session.started.map_or("-".to_owned(), |t| format!("{:.1} s", t.as_secs_f64()))
            );
            Outcome::Exit(code)
        }
        (_, None, _) if session.fault.is_some() => {
            Outcome::L1Fault(session.fault.take().unwrap_or_default())
        }
        (_, None, Some(message)) => Outcome::Setup(message),
        (Some(Expiry::Silence), None, None) => Outcome::Silent,
        (Some(Expiry::WallClock), None, None) => Outcome::WallClock,
        _ => Outcome::NoExitStatus {
            status,
            tail: session.tail.join("\n"),
        },
    };
    Ok(outcome)
}

/// The console-side state of one boot: what was seen, what to print.
struct Session {
    scanner: Scanner,
    watchdog: Watchdog,
    verbose: bool,
    exit: Option<i32>,
    setup_error: Option<String>,
    /// A line of L1's kernel saying L1 itself is failing ([`console::l1_kernel_fault`]).
    fault: Option<String>,
    started: Option<Duration>,
    tail: Vec<String>,
    blank_lines: usize,
    /// Where shown lines go (stdout; a buffer in tests).
    out: Box<dyn Write>,
}

impl Session {
    fn new(nonce: &str, watchdog: Watchdog, verbose: bool) -> Self {
        Self {
            scanner: Scanner::new(nonce),
            watchdog,
            verbose,
            exit: None,
            setup_error: None,
            fault: None,
            started: None,
            tail: Vec::new(),
            blank_lines: 0,
            out: Box::new(io::stdout()),
        }
    }

    /// Shows a line of the command's output now.
    fn print(&mut self, line: &str) {
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }

    /// Handles messages until the exit marker arrives or the console closes (`None`), or a limit passes
    /// (`Some`).
    fn pump(
        &mut self,
        rx: &Receiver<Message>,
        log: &mut impl Write,
        start: Instant,
    ) -> Option<Expiry> {
        loop {
            if self.exit.is_some() || self.fault.is_some() {
                return None;
            }
            let now = Instant::now();
            if let Some(expiry) = self.watchdog.check(now) {
                return Some(expiry);
            }
            match rx.recv_timeout(self.watchdog.time_left(now)) {
                Ok(Message::Console(bytes)) => {
                    let now = Instant::now();
                    self.watchdog.output(now);
                    let _ = log.write_all(&bytes);
                    for event in self.scanner.push(&bytes) {
                        self.event(event, now.duration_since(start));
                    }
                }
                Ok(Message::Stderr(line)) => {
                    let _ = writeln!(log, "[qemu stderr] {line}");
                    if !console::is_qemu_noise(&line) {
                        eprintln!("{line}");
                    }
                }
                Ok(Message::ConsoleClosed) | Err(RecvTimeoutError::Disconnected) => {
                    for event in self.scanner.finish() {
                        self.event(event, start.elapsed());
                    }
                    return None;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn event(&mut self, event: ConsoleEvent, at: Duration) {
        match event {
            ConsoleEvent::Line(line) => {
                if self.fault.is_none() && console::l1_kernel_fault(&line) {
                    self.fault = Some(line.trim().to_owned());
                }
                // Unless verbose, show only what the command prints: the firmware's and the L1 kernel's
                // boot messages before it and the power-off messages after it go to the log (and to the
                // tail quoted by an error). Blank lines are held back: the init prints one before the
                // exit marker, to end a partial last line of the command.
                if self.verbose || (self.started.is_some() && self.exit.is_none()) {
                    if line.is_empty() {
                        self.blank_lines += 1;
                    } else {
                        let blanks = std::mem::take(&mut self.blank_lines);
                        self.print(&format!("{}{line}", "\n".repeat(blanks)));
                    }
                }
                if self.tail.len() == TAIL_LINES {
                    self.tail.remove(0);
                }
                self.tail.push(line);
            }
            ConsoleEvent::Started => {
                self.started = Some(at);
                eprintln!(
                    "hull-harness: L1 is up, command started ({:.1} s)",
                    at.as_secs_f64()
                );
            }
            ConsoleEvent::Alive => {}
            ConsoleEvent::Exit(code) => {
                self.blank_lines = 0;
                self.exit.get_or_insert(code);
            }
            ConsoleEvent::SetupError(message) => {
                eprintln!("hull-harness: L1 set-up failed: {message}");
                self.setup_error.get_or_insert(message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shown(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

    impl Write for Shown {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shown {
        fn text(&self) -> String {
            String::from_utf8(self.0.borrow().clone()).unwrap()
        }
    }

    fn pump(messages: Vec<Message>, verbose: bool) -> (Session, Option<Expiry>, String) {
        let (tx, rx) = mpsc::channel();
        for m in messages {
            tx.send(m).unwrap();
        }
        drop(tx);
        let watchdog = Watchdog::new(
            Instant::now(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let mut session = Session::new("n1", watchdog, verbose);
        let shown = Shown::default();
        session.out = Box::new(shown.clone());
        let mut log = Vec::new();
        let end = session.pump(&rx, &mut log, Instant::now());
        assert!(!log.is_empty() || session.tail.is_empty());
        (session, end, shown.text())
    }

    const BOOT: &[u8] =
        b"SeaBIOS\r\n[    0.1] Linux version\r\nHULL_HARNESS_START=n1\r\nhello\r\n\r\nworld\r\n";

    #[test]
    fn exit_marker_sets_the_status_and_only_the_command_output_is_shown() {
        let (session, end, shown) = pump(
            vec![
                Message::Console(BOOT.to_vec()),
                Message::Stderr("qemu: warning: TCG doesn't support requested feature: x".into()),
                Message::Console(b"partial\r\n\r\nHULL_HARNESS_EX".to_vec()),
                Message::Console(b"IT=n1:7\r\n".to_vec()),
                Message::Console(b"[    5.8] reboot: Power down\r\n".to_vec()),
                Message::ConsoleClosed,
            ],
            false,
        );
        assert_eq!(end, None);
        assert_eq!(session.exit, Some(7));
        assert!(session.started.is_some());
        assert_eq!(shown, "hello\n\nworld\npartial\n");
        assert_eq!(
            session.tail[session.tail.len() - 2..],
            ["partial", ""],
            "pumping stops at the marker"
        );
    }

    #[test]
    fn verbose_shows_everything() {
        let (_, _, shown) = pump(vec![Message::Console(BOOT.to_vec())], true);
        assert_eq!(shown, "SeaBIOS\n[    0.1] Linux version\nhello\n\nworld\n");
    }

    #[test]
    fn no_marker_means_no_status() {
        let (session, end, shown) =
            pump(vec![Message::Console(b"Kernel panic\r\n".to_vec())], false);
        assert_eq!(end, None);
        assert_eq!(session.exit, None);
        assert_eq!(session.tail, ["Kernel panic"]);
        assert_eq!(shown, "", "boot messages are only in the tail");
    }

    #[test]
    fn an_l1_soft_lockup_ends_the_attempt() {
        let (session, end, _) = pump(
            vec![
                Message::Console(BOOT.to_vec()),
                Message::Console(
                    b"[   36.35] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [vcpu1:177]\r\nmore\r\n"
                        .to_vec(),
                ),
            ],
            false,
        );
        assert_eq!(end, None);
        assert_eq!(session.exit, None);
        assert!(session.fault.as_deref().unwrap().contains("soft lockup"));
    }

    #[test]
    fn silence_ends_the_pump() {
        let (_tx, rx) = mpsc::channel::<Message>();
        let start = Instant::now() - Duration::from_secs(100);
        let watchdog = Watchdog::new(start, Duration::from_secs(600), Duration::from_secs(50));
        let mut session = Session::new("n1", watchdog, false);
        assert_eq!(
            session.pump(&rx, &mut Vec::new(), start),
            Some(Expiry::Silence)
        );
        let watchdog = Watchdog::new(start, Duration::from_secs(90), Duration::from_secs(200));
        let mut session = Session::new("n1", watchdog, false);
        assert_eq!(
            session.pump(&rx, &mut Vec::new(), start),
            Some(Expiry::WallClock)
        );
    }

    #[test]
    fn env_selection() {
        let vars = [
            ("PATH", "/bin"),
            ("HULL_X", "1"),
            ("SECRET", "no"),
            ("HOME", "/root"),
            ("HULLX", "no"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(
            select_env(vars.into_iter()),
            [("HOME", "/root"), ("HULL_X", "1"), ("PATH", "/bin")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn empty_command_is_refused() {
        assert!(matches!(
            run(&[], &RunOptions::default()),
            Err(HarnessError::Run(RunError::EmptyCommand))
        ));
    }

    #[test]
    fn nonces_differ() {
        let a = nonce();
        assert_eq!(a.len(), 16);
        assert_ne!(a, nonce());
    }

    #[test]
    fn on_a_hardware_kvm_host_the_command_runs_directly() {
        let target = std::env::temp_dir().join(format!("hull-harness-run-{}", std::process::id()));
        let opts = RunOptions {
            host: Some(HostKind::HardwareKvm),
            target_dir: target.clone(),
            workdir: std::env::temp_dir(),
            env: vec![("HULL_T".into(), "x y".into())],
            ..RunOptions::default()
        };
        let cmd = ["sh", "-c", "test \"$HULL_T\" = 'x y' && exit 3"].map(String::from);
        assert_eq!(run(&cmd, &opts).unwrap(), 3);
        assert_eq!(run_script("false\n", &opts).unwrap(), 1);
        assert_eq!(run(&["/nonexistent".to_owned()], &opts).unwrap(), 127);
        let timed = RunOptions {
            timeout: Duration::from_millis(200),
            ..opts
        };
        let err = run(&["sleep".to_owned(), "5".to_owned()], &timed).unwrap_err();
        assert!(err.to_string().contains("wall-clock limit"), "{err}");
        assert_eq!(
            fs::read_dir(target.join("harness/run")).unwrap().count(),
            0,
            "scripts removed"
        );
        let _ = fs::remove_dir_all(target);
    }
}
