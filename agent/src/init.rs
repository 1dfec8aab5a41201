//! PID-1 duties of the guest agent: mount `/proc`, `/sys` and devtmpfs on `/dev`, load the kernel
//! modules listed in `/lib/modules/load-order`, print the readiness marker on the console, then sync
//! and power the guest off.
//!
//! PID 1 must never exit (the kernel panics) nor hang: every failure ends in `HULL_GUEST_ERROR <what>`
//! and a power-off, panics included. Quiet by default (serial output is slow in the nested harness);
//! `hull.debug` on the kernel command line prints a line per step with its duration.

use std::ffi::CStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

/// Where the image lists the modules to load, one absolute path a line, dependencies first.
pub const LOAD_ORDER: &str = "/lib/modules/load-order";
/// The marker a host waits for on the console.
pub const READY_MARKER: &str = "HULL_GUEST_READY";
/// The marker of a failed boot.
pub const ERROR_MARKER: &str = "HULL_GUEST_ERROR";
/// The kernel command-line flag that turns on step-by-step output.
pub const DEBUG_FLAG: &str = "hull.debug";

/// A fatal failure of init.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("mount {fstype} on {target}: {errno}")]
    Mount {
        /// The filesystem type.
        fstype: &'static str,
        /// The mount point.
        target: &'static str,
        /// Why.
        errno: Errno,
    },
    /// A file every Linux guest has could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A kernel file did not say what it should.
    #[error("parse {path}: {what} in {text:?}")]
    Parse {
        /// The file.
        path: &'static str,
        /// What was missing or malformed.
        what: &'static str,
        /// The text (trimmed to a line or so).
        text: String,
    },
    /// uname(2) failed.
    #[error("uname: {0}")]
    Uname(Errno),
}

/// Whether this process is the init of its PID namespace.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Runs the PID-1 sequence; never returns: the guest powers off at the end, whatever happens.
pub fn run() -> ! {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string().replace('\n', " ");
        fatal(&format!("panic: {msg}"))
    }));
    match boot() {
        Ok(marker) => say(&marker),
        Err(e) => say(&format!("{ERROR_MARKER} {e}")),
    }
    power_off()
}

/// Everything up to the marker line, which it returns.
fn boot() -> Result<String, InitError> {
    let mut log = Log::new();
    for (fstype, target, flags, data) in [
        (
            "proc",
            "/proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")),
    ] {
        let t = Instant::now();
        let _ = fs::create_dir(target); // in the image already; EEXIST is the normal case
        match mount(Some(fstype), target, Some(fstype), flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(errno) => {
                return Err(InitError::Mount {
                    fstype,
                    target,
                    errno,
                })
            }
        }
        if fstype == "proc" {
            // /proc/cmdline is readable from here on.
            let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
            log.debug = debug_flag(&cmdline);
        }
        log.step(format_args!("mount {fstype} on {target}: ok"), t);
    }
    ensure_console();

    load_modules(&log);

    let t = Instant::now();
    let marker = marker()?;
    log.step(format_args!("marker values read"), t);
    Ok(marker)
}

/// Loads every module of [`LOAD_ORDER`], in order. Failures are reported and skipped: a missing
/// driver shows up later as a missing device, with this line explaining it.
fn load_modules(log: &Log) {
    let list = match fs::read_to_string(LOAD_ORDER) {
        Ok(list) => list,
        Err(e) => {
            say(&format!(
                "hull-agent: {LOAD_ORDER}: {e}: loading no modules"
            ));
            return;
        }
    };
    let params: &CStr = c"";
    let all = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    for path in parse_load_order(&list) {
        let t = Instant::now();
        let result = File::open(path)
            .map_err(|e| format!("open: {e}"))
            .and_then(
                |f| match finit_module(&f, params, ModuleInitFlags::empty()) {
                    Ok(()) => Ok("loaded"),
                    Err(Errno::EEXIST) => Ok("already loaded"),
                    Err(errno) => Err(format!("finit_module: {errno}")),
                },
            );
        match result {
            Ok(state) => {
                ok += 1;
                log.step(format_args!("module {path}: {state}"), t);
            }
            Err(e) => {
                failed += 1;
                say(&format!("hull-agent: module {path}: {e}"));
            }
        }
    }
    log.step(format_args!("modules: {ok} ok, {failed} failed"), all);
}

/// The readiness line: `HULL_GUEST_READY uptime_ms=.. cpus=.. mem_kib=.. kernel=..`.
fn marker() -> Result<String, InitError> {
    let read = |path: &'static str| {
        fs::read_to_string(path).map_err(|source| InitError::Read { path, source })
    };
    let parse_err = |path: &'static str, what: &'static str, text: &str| InitError::Parse {
        path,
        what,
        text: text.lines().next().unwrap_or("").chars().take(80).collect(),
    };

    const CPUS: &str = "/sys/devices/system/cpu/online";
    let cpus_text = read(CPUS)?;
    let cpus = count_cpu_list(&cpus_text)
        .ok_or_else(|| parse_err(CPUS, "a cpu list like 0-1,3", &cpus_text))?;

    const MEMINFO: &str = "/proc/meminfo";
    let meminfo = read(MEMINFO)?;
    let mem_kib =
        mem_total_kib(&meminfo).ok_or_else(|| parse_err(MEMINFO, "a MemTotal line", &meminfo))?;

    let uts = nix::sys::utsname::uname().map_err(InitError::Uname)?;
    let kernel = uts.release().to_string_lossy().into_owned();

    // Last, so it is as late as possible.
    const UPTIME: &str = "/proc/uptime";
    let uptime = read(UPTIME)?;
    let uptime_ms =
        uptime_ms(&uptime).ok_or_else(|| parse_err(UPTIME, "seconds since boot", &uptime))?;

    Ok(format!(
        "{READY_MARKER} uptime_ms={uptime_ms} cpus={cpus} mem_kib={mem_kib} kernel={kernel}"
    ))
}

/// If the kernel could not give init a console (no `/dev/console` in the initramfs), open the one
/// devtmpfs now provides as fds 0, 1 and 2.
fn ensure_console() {
    if Path::new("/proc/self/fd/1").exists() {
        return;
    }
    let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 on a valid open descriptor (`console`, alive for the whole loop) onto 0..2,
        // which are closed (checked above); no Rust object owns those numbers.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// Writes a line to the console (stdout); never fails (nothing to report it to).
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A fatal error after which nothing else is tried: marker line, power off. Used by the panic hook,
/// so it writes to fd 1 directly rather than through `std::io::stdout()`'s lock, which the panicking
/// code may hold.
fn fatal(what: &str) -> ! {
    let line = format!("{ERROR_MARKER} {what}\n");
    // SAFETY: write(2) reads `line.len()` bytes from a live buffer; if fd 1 is closed it fails with
    // EBADF and nothing else happens.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
    power_off()
}

/// sync, then power off; falls back to halt and reboot (a VMM run with "no reboot" exits either way),
/// and as a very last resort sleeps forever rather than exit (PID 1 exiting panics the kernel).
fn power_off() -> ! {
    nix::unistd::sync();
    for mode in [
        RebootMode::RB_POWER_OFF,
        RebootMode::RB_HALT_SYSTEM,
        RebootMode::RB_AUTOBOOT,
    ] {
        let Err(errno) = reboot(mode);
        say(&format!("hull-agent: reboot({mode:?}): {errno}"));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Step-by-step output, on with `hull.debug`.
struct Log {
    debug: bool,
}

impl Log {
    fn new() -> Self {
        Self { debug: false }
    }

    fn step(&self, what: std::fmt::Arguments<'_>, since: Instant) {
        if self.debug {
            let ms = since.elapsed().as_secs_f64() * 1000.0;
            say(&format!("hull-agent: {what} ({ms:.2} ms)"));
        }
    }
}

// ---- pure parsers (unit-tested) ----

/// Whether the kernel command line turns on debug output: `hull.debug`, or `hull.debug=1|y|yes|on|true`.
/// The last occurrence wins.
pub fn debug_flag(cmdline: &str) -> bool {
    let mut on = false;
    for word in cmdline.split_whitespace() {
        if word == DEBUG_FLAG {
            on = true;
        } else if let Some(v) = word
            .strip_prefix(DEBUG_FLAG)
            .and_then(|r| r.strip_prefix('='))
        {
            on = matches!(
                v.to_ascii_lowercase().as_str(),
                "1" | "y" | "yes" | "on" | "true"
            );
        }
    }
    on
}

/// Milliseconds since boot from `/proc/uptime` ("350.63 1234.56").
pub fn uptime_ms(text: &str) -> Option<u64> {
    let secs = text.split_whitespace().next()?;
    let (int, frac) = secs.split_once('.').unwrap_or((secs, ""));
    if int.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u64 = int.parse().ok()?;
    // The first three fractional digits, right-padded: "63" → 630 ms.
    let ms = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0, |acc, d| acc * 10 + u64::from(d - b'0'));
    int.checked_mul(1000)?.checked_add(ms)
}

/// How many CPUs a kernel cpu list names ("0-1,3" → 3; "0" → 1).
pub fn count_cpu_list(text: &str) -> Option<u32> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut count = 0u32;
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        if hi < lo {
            return None;
        }
        count = count.checked_add(hi - lo + 1)?;
    }
    Some(count)
}

/// `MemTotal` in KiB from `/proc/meminfo`.
pub fn mem_total_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The module paths of a load-order file: one a line, blank lines and `#` comments skipped.
pub fn parse_load_order(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime() {
        assert_eq!(uptime_ms("350.63 1234.56\n"), Some(350_630));
        assert_eq!(uptime_ms("1.07 0.50\n"), Some(1070));
        assert_eq!(uptime_ms("0.5 0.5"), Some(500));
        assert_eq!(uptime_ms("12 3"), Some(12_000));
        assert_eq!(uptime_ms("2.1234 1"), Some(2123));
        assert_eq!(uptime_ms(""), None);
        assert_eq!(uptime_ms("abc 1"), None);
        assert_eq!(uptime_ms(".5 1"), None);
        assert_eq!(uptime_ms("1.x 1"), None);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-1,3"), Some(3));
        assert_eq!(count_cpu_list("0,2,4-7"), Some(6));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("0-"), None);
        assert_eq!(count_cpu_list("a"), None);
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:         496104 kB\nMemFree:          470000 kB\nMemAvailable:     460000 kB\n";
        assert_eq!(mem_total_kib(text), Some(496_104));
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_kib("MemTotal: lots\n"), None);
    }

    #[test]
    fn cmdline_flag() {
        assert!(!debug_flag("console=ttyS0 quiet panic=-1"));
        assert!(debug_flag("console=ttyS0 hull.debug quiet"));
        assert!(debug_flag("hull.debug=1"));
        assert!(debug_flag("hull.debug=on"));
        assert!(!debug_flag("hull.debug=0"));
        assert!(!debug_flag("hull.debug hull.debug=off"));
        assert!(!debug_flag("hull.debugger xhull.debug"));
    }

    #[test]
    fn load_order_file() {
        let text = "/lib/modules/r/kernel/a.ko\n\n# comment\n  /lib/modules/r/kernel/b.ko  \n";
        let v: Vec<&str> = parse_load_order(text).collect();
        assert_eq!(
            v,
            ["/lib/modules/r/kernel/a.ko", "/lib/modules/r/kernel/b.ko"]
        );
        assert_eq!(parse_load_order("").count(), 0);
    }

    #[test]
    fn errors_say_what_failed() {
        let e = InitError::Mount {
            fstype: "proc",
            target: "/proc",
            errno: Errno::EPERM,
        };
        assert!(
            e.to_string().starts_with("mount proc on /proc: EPERM"),
            "{e}"
        );
    }
}
