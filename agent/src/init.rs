//! PID-1 duties of the guest agent: make the root a mount of its own (see [`root_to_mount`]), mount
//! `/proc`, `/sys`, devtmpfs on `/dev` and the cgroup v2 hierarchy on `/sys/fs/cgroup`, load the
//! kernel modules listed in `/lib/modules/load-order`, then either
//! - one-shot (`hull.oneshot` on the kernel command line: boot tests, the boot benchmark): print
//!   the readiness marker on the console, sync and power the guest off; or
//! - serve ([`crate::guest`]): the agent's API on vsock until `DestroySandbox`, then sync, unmount
//!   what can be and power off.
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
use nix::mount::{mount, umount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use crate::cmdline::Cmdline;
use crate::sysinfo::Facts;

/// Where the image lists the modules to load, one absolute path a line, dependencies first.
pub const LOAD_ORDER: &str = "/lib/modules/load-order";
/// The marker of a failed boot.
pub const ERROR_MARKER: &str = "HULL_GUEST_ERROR";

/// A fatal failure of init.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The root could not be made a mount of its own.
    #[error("switch the root to a bind mount of itself: {step}: {errno}")]
    Root {
        /// The step that failed.
        step: &'static str,
        /// Why.
        errno: Errno,
    },
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
    let cmdline = match boot() {
        Ok(cmdline) => cmdline,
        Err(e) => {
            say(&format!("{ERROR_MARKER} {e}"));
            power_off()
        }
    };
    if cmdline.oneshot {
        let t = Instant::now();
        match Facts::read() {
            Ok(facts) => {
                step(cmdline.debug, format_args!("marker values read"), t);
                say(&facts.marker());
            }
            Err(e) => say(&format!("{ERROR_MARKER} {e}")),
        }
    } else if let Err(e) = crate::guest::run(&cmdline) {
        say(&format!("{ERROR_MARKER} {e}"));
    }
    power_off()
}

/// Mounts, console, modules; returns the kernel command line's settings.
fn boot() -> Result<Cmdline, InitError> {
    let mut log = Log::new();
    let mut cmdline = Cmdline::default();
    let t = Instant::now();
    root_to_mount()?;
    log.step(format_args!("root is a bind mount"), t);
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
        (
            "cgroup2",
            "/sys/fs/cgroup",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
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
            cmdline = Cmdline::parse(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
            log.debug = cmdline.debug;
        }
        log.step(format_args!("mount {fstype} on {target}: ok"), t);
    }
    ensure_console();

    for warning in &cmdline.warnings {
        say(&format!("hull-agent: kernel command line: {warning}"));
    }

    load_modules(&log);
    if let Some(order) = cmdline.page_reporting_order {
        let t = Instant::now();
        match set_page_reporting_order(order) {
            Ok(()) => log.step(format_args!("page reporting order {order}"), t),
            Err(e) => say(&format!(
                "hull-agent: {PAGE_REPORTING_ORDER_PARAM}: {e}: free pages are reported in the kernel's block size"
            )),
        }
    }
    Ok(cmdline)
}

/// The kernel's run-time knob for the free page reporting order.
pub const PAGE_REPORTING_ORDER_PARAM: &str =
    "/sys/module/page_reporting/parameters/page_reporting_order";

/// Sets the smallest free block (a page order) the guest reports to the host's balloon. Linux 6.1
/// reads `page_reporting.page_reporting_order=` from the command line but overwrites it when the
/// balloon driver registers (by then built in and probed, or loaded above); its parameter is
/// writable at run time and applies from the next report on.
fn set_page_reporting_order(order: u32) -> io::Result<()> {
    fs::write(PAGE_REPORTING_ORDER_PARAM, order.to_string())
}

/// Makes `/` a mount of its own: a bind mount of the initramfs moved over it, as switch_root
/// does. The initramfs root (rootfs) has no parent mount, and pivot_root(2) refuses to move it;
/// every container's pivot_root would fail. A bind mount costs nothing (no copy).
fn root_to_mount() -> Result<(), InitError> {
    let err = |step| move |errno| InitError::Root { step, errno };
    let _ = fs::create_dir("/.root"); // EEXIST after a re-exec: fine
    mount(
        Some("/"),
        "/.root",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(err("bind / on /.root"))?;
    nix::unistd::chdir("/.root").map_err(err("chdir /.root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(err("move /.root to /"))?;
    nix::unistd::chroot(".").map_err(err("chroot ."))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))?;
    Ok(())
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
pub fn say(line: &str) {
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

/// Before powering off at the end of a sandbox: sync, then unmount every mount but the root, the
/// newest first (so a mount inside another goes before it), and sync again. What cannot be
/// unmounted (busy) stays: its data is synced already and the power-off follows.
pub fn unmount_all() {
    nix::unistd::sync();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for target in mount_points(&mounts).into_iter().rev() {
        if target == "/" {
            continue;
        }
        if let Err(errno) = umount(target.as_str()) {
            tracing::debug!(%target, %errno, "unmount failed; left mounted");
        }
    }
    nix::unistd::sync();
}

/// sync, then power off; falls back to halt and reboot (a VMM run with "no reboot" exits either way),
/// and as a very last resort sleeps forever rather than exit (PID 1 exiting panics the kernel).
pub fn power_off() -> ! {
    nix::unistd::sync();
    // What we wrote to the console may still be in the tty's transmit buffer: the kernel's own
    // "reboot: Power down" goes straight to the UART and would land in the middle of our last
    // line (seen: the ready marker's `kernel=` value ending in the kernel's `[`). Wait for it.
    // A console that is not a tty (or none) just fails, which is fine.
    let _ = nix::sys::termios::tcdrain(std::io::stdout());
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
        step(self.debug, what, since);
    }
}

/// With `debug`, one console line: what was done and how long it took.
pub fn step(debug: bool, what: std::fmt::Arguments<'_>, since: Instant) {
    if debug {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        say(&format!("hull-agent: {what} ({ms:.2} ms)"));
    }
}

// ---- pure parsers (unit-tested) ----

/// The module paths of a load-order file: one a line, blank lines and `#` comments skipped.
pub fn parse_load_order(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// The mount points of `/proc/self/mounts`, in mount order, with the kernel's octal escapes
/// (`\040` for a space, `\011`, `\012`, `\134`) undone.
pub fn mount_points(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(unescape_octal)
        .collect()
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn mounts_file() {
        let text = "rootfs / rootfs rw 0 0\n\
                    proc /proc proc rw,nosuid 0 0\n\
                    devtmpfs /dev devtmpfs rw 0 0\n\
                    tmpfs /run/a\\040b tmpfs rw 0 0\n\
                    x /odd\\134\\0 x rw 0 0\n";
        assert_eq!(
            mount_points(text),
            ["/", "/proc", "/dev", "/run/a b", "/odd\\\\0"]
        );
        assert!(mount_points("").is_empty());
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
