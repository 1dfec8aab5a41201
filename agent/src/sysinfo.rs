//! What the guest is, from the kernel's own files: online CPUs (`/sys/devices/system/cpu/online`,
//! a cpu list like `0-1,3`), `MemTotal` of `/proc/meminfo`, the release of uname(2), and the uptime
//! (first field of `/proc/uptime`, seconds with two decimals). Read for the readiness marker and
//! for `GetGuestDetails`; on the host (host mode) the same files describe the host.

use std::fs;
use std::io;

use nix::errno::Errno;

/// The marker a host waits for on the console.
pub const READY_MARKER: &str = "HULL_GUEST_READY";

const CPUS: &str = "/sys/devices/system/cpu/online";
const MEMINFO: &str = "/proc/meminfo";
const UPTIME: &str = "/proc/uptime";

/// A kernel file could not be read or said something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum SysInfoError {
    /// A file every Linux system has could not be read.
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

/// The facts of the marker line and of `GetGuestDetails`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Milliseconds since the kernel booted.
    pub uptime_ms: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// `MemTotal`, KiB.
    pub mem_kib: u64,
    /// The kernel release (`uname -r`).
    pub kernel: String,
}

impl Facts {
    /// Reads them all; the uptime last, so that it is as late as possible.
    pub fn read() -> Result<Self, SysInfoError> {
        let cpus_text = read(CPUS)?;
        let cpus = count_cpu_list(&cpus_text)
            .ok_or_else(|| parse_err(CPUS, "a cpu list like 0-1,3", &cpus_text))?;

        let meminfo = read(MEMINFO)?;
        let mem_kib = mem_total_kib(&meminfo)
            .ok_or_else(|| parse_err(MEMINFO, "a MemTotal line", &meminfo))?;

        let kernel = kernel_release()?;
        let uptime_ms = read_uptime_ms()?;
        Ok(Self {
            uptime_ms,
            cpus,
            mem_kib,
            kernel,
        })
    }

    /// The readiness line: `HULL_GUEST_READY uptime_ms=.. cpus=.. mem_kib=.. kernel=..`.
    pub fn marker(&self) -> String {
        format!(
            "{READY_MARKER} uptime_ms={} cpus={} mem_kib={} kernel={}",
            self.uptime_ms, self.cpus, self.mem_kib, self.kernel
        )
    }
}

/// `uname -r`.
pub fn kernel_release() -> Result<String, SysInfoError> {
    let uts = nix::sys::utsname::uname().map_err(SysInfoError::Uname)?;
    Ok(uts.release().to_string_lossy().into_owned())
}

/// Milliseconds since boot, from `/proc/uptime`.
pub fn read_uptime_ms() -> Result<u64, SysInfoError> {
    let text = read(UPTIME)?;
    uptime_ms(&text).ok_or_else(|| parse_err(UPTIME, "seconds since boot", &text))
}

fn read(path: &'static str) -> Result<String, SysInfoError> {
    fs::read_to_string(path).map_err(|source| SysInfoError::Read { path, source })
}

fn parse_err(path: &'static str, what: &'static str, text: &str) -> SysInfoError {
    SysInfoError::Parse {
        path,
        what,
        text: text.lines().next().unwrap_or("").chars().take(80).collect(),
    }
}

// ---- pure parsers (unit-tested) ----

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
    fn marker_line_format() {
        let f = Facts {
            uptime_ms: 812,
            cpus: 2,
            mem_kib: 491_520,
            kernel: "6.1.0-56-cloud-amd64".into(),
        };
        assert_eq!(
            f.marker(),
            "HULL_GUEST_READY uptime_ms=812 cpus=2 mem_kib=491520 kernel=6.1.0-56-cloud-amd64"
        );
    }

    #[test]
    fn reads_this_machine() {
        let f = Facts::read().unwrap();
        assert!(
            f.cpus >= 1 && f.mem_kib > 0 && !f.kernel.is_empty(),
            "{f:?}"
        );
    }
}
