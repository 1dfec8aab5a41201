//! The agent's settings on the kernel command line (`/proc/cmdline`), read once at boot.
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `hull.debug` | step-by-step boot lines and debug logs on the console | off |
//! | `hull.oneshot` | print the readiness marker and power off at once (boot tests, benchmark) | off |
//! | `agent.port=N` | the vsock port of the ttrpc API | 1024 |
//! | `agent.log_port=N` | also send the logs to the host: a vsock stream to CID 2, port N | none |
//! | `agent.echo_port=N` | an echo service on vsock port N (host throughput tests) | none |
//! | `agent.hostname=NAME` | the guest's hostname | `hull` |
//! | `agent.shared_fs=TAG` | mount the virtio-fs TAG on `/run/hull/shared` before serving | none |
//! | `page_reporting.page_reporting_order=N` | the kernel's own key (free page reporting in blocks of 2^N pages); Linux 6.1's balloon driver overwrites it when it registers, so the agent sets it again | the kernel's (2 MiB) |
//!
//! Flags are on when bare or `=1|y|yes|on|true`, off with any other value. The last occurrence of a
//! key wins. A bad value keeps the default and is reported (see [`Cmdline::warnings`]): the
//! agent still boots, and the console says why a setting was ignored.

use hull_agent_api::DEFAULT_AGENT_PORT;

/// The kernel command-line flag that turns on step-by-step output.
pub const DEBUG_FLAG: &str = "hull.debug";
/// The flag of the one-shot mode.
pub const ONESHOT_FLAG: &str = "hull.oneshot";
/// The kernel's own key for the free page reporting order (Linux's `mm/page_reporting.c`).
pub const PAGE_REPORTING_ORDER: &str = "page_reporting.page_reporting_order";
/// The largest page order Linux's buddy allocator has on x86-64 (`MAX_ORDER - 1`).
pub const MAX_PAGE_ORDER: u32 = 10;
/// The hostname unless `agent.hostname=` says otherwise.
pub const DEFAULT_HOSTNAME: &str = "hull";

/// The settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `hull.debug`.
    pub debug: bool,
    /// `hull.oneshot`.
    pub oneshot: bool,
    /// `agent.port=`.
    pub port: u32,
    /// `agent.log_port=`.
    pub log_port: Option<u32>,
    /// `agent.echo_port=`.
    pub echo_port: Option<u32>,
    /// `agent.hostname=`.
    pub hostname: String,
    /// `agent.shared_fs=`: the virtio-fs tag of the sandbox's shared directory.
    pub shared_fs: Option<String>,
    /// `page_reporting.page_reporting_order=`: the smallest free block the guest reports to
    /// the host's balloon device, as a page order.
    pub page_reporting_order: Option<u32>,
    /// Ignored values, one line each, e.g. `agent.port=x: not a port (1..=4294967295)`.
    pub warnings: Vec<String>,
}

impl Default for Cmdline {
    fn default() -> Self {
        Self {
            debug: false,
            oneshot: false,
            port: DEFAULT_AGENT_PORT,
            log_port: None,
            echo_port: None,
            hostname: DEFAULT_HOSTNAME.to_owned(),
            shared_fs: None,
            page_reporting_order: None,
            warnings: Vec::new(),
        }
    }
}

impl Cmdline {
    /// Parses `/proc/cmdline`'s text.
    pub fn parse(text: &str) -> Self {
        let mut c = Self::default();
        for word in text.split_whitespace() {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            };
            match key {
                DEBUG_FLAG => c.debug = flag(value),
                ONESHOT_FLAG => c.oneshot = flag(value),
                "agent.port" => {
                    if let Some(p) = c.port_value(word, value) {
                        c.port = p;
                    }
                }
                "agent.log_port" => {
                    if let Some(p) = c.port_value(word, value) {
                        c.log_port = Some(p);
                    }
                }
                "agent.echo_port" => {
                    if let Some(p) = c.port_value(word, value) {
                        c.echo_port = Some(p);
                    }
                }
                "agent.hostname" => match value.filter(|v| valid_hostname(v)) {
                    Some(h) => c.hostname = h.to_owned(),
                    None => c.warnings.push(format!(
                        "{word}: not a hostname (1 to 64 of a-z A-Z 0-9 - .); using {:?}",
                        c.hostname
                    )),
                },
                "agent.shared_fs" => match value.filter(|v| (1..=36).contains(&v.len())) {
                    Some(tag) => c.shared_fs = Some(tag.to_owned()),
                    None => c.warnings.push(format!(
                        "{word}: not a virtio-fs tag (1 to 36 bytes); no shared directory"
                    )),
                },
                PAGE_REPORTING_ORDER => {
                    match value
                        .and_then(|v| v.parse::<u32>().ok())
                        .filter(|o| *o <= MAX_PAGE_ORDER)
                    {
                        Some(o) => c.page_reporting_order = Some(o),
                        None => c.warnings.push(format!(
                            "{word}: not a page order (0..={MAX_PAGE_ORDER}); the kernel's is kept"
                        )),
                    }
                }
                _ => {}
            }
        }
        c
    }

    fn port_value(&mut self, word: &str, value: Option<&str>) -> Option<u32> {
        let port = value
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&p| p != 0);
        if port.is_none() {
            self.warnings.push(format!(
                "{word}: not a vsock port (1..=4294967295); ignored"
            ));
        }
        port
    }
}

/// A flag's value: bare is on.
fn flag(value: Option<&str>) -> bool {
    match value {
        None => true,
        Some(v) => matches!(
            v.to_ascii_lowercase().as_str(),
            "1" | "y" | "yes" | "on" | "true"
        ),
    }
}

/// What sethostname(2) gets from us: 1 to 64 bytes (the kernel's limit) of letters, digits,
/// `-` and `.`.
pub fn valid_hostname(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Cmdline::parse("console=ttyS0 reboot=k panic=-1 pci=off quiet");
        assert_eq!(c, Cmdline::default());
        assert_eq!(c.port, 1024);
        assert_eq!(c.hostname, "hull");
        assert_eq!((c.log_port, c.echo_port), (None, None));
    }

    #[test]
    fn debug_flag() {
        let debug = |s: &str| Cmdline::parse(s).debug;
        assert!(!debug("console=ttyS0 quiet panic=-1"));
        assert!(debug("console=ttyS0 hull.debug quiet"));
        assert!(debug("hull.debug=1"));
        assert!(debug("hull.debug=on"));
        assert!(debug("hull.debug=TRUE"));
        assert!(!debug("hull.debug=0"));
        assert!(!debug("hull.debug hull.debug=off"));
        assert!(!debug("hull.debugger xhull.debug"));
    }

    #[test]
    fn oneshot_flag() {
        assert!(Cmdline::parse("quiet hull.oneshot").oneshot);
        assert!(Cmdline::parse("hull.oneshot=yes").oneshot);
        assert!(!Cmdline::parse("hull.oneshot=no").oneshot);
        assert!(!Cmdline::parse("hull.oneshotx hull.debug").oneshot);
    }

    #[test]
    fn ports() {
        let c = Cmdline::parse("agent.port=2048 agent.log_port=1025 agent.echo_port=5000");
        assert_eq!(c.port, 2048);
        assert_eq!(c.log_port, Some(1025));
        assert_eq!(c.echo_port, Some(5000));
        assert!(c.warnings.is_empty());

        // The last one wins.
        assert_eq!(Cmdline::parse("agent.port=5 agent.port=6").port, 6);
        assert_eq!(Cmdline::parse("agent.port=4294967295").port, u32::MAX);
    }

    #[test]
    fn bad_ports_keep_the_default_and_say_so() {
        for bad in [
            "agent.port=",
            "agent.port",
            "agent.port=0",
            "agent.port=-1",
            "agent.port=x",
            "agent.port=4294967296",
        ] {
            let c = Cmdline::parse(bad);
            assert_eq!(c.port, 1024, "{bad}");
            assert_eq!(c.warnings.len(), 1, "{bad}");
            assert!(c.warnings[0].starts_with(bad), "{:?}", c.warnings);
        }
        let c = Cmdline::parse("agent.log_port=x agent.echo_port=0");
        assert_eq!((c.log_port, c.echo_port), (None, None));
        assert_eq!(c.warnings.len(), 2);
        // A later good value still counts.
        assert_eq!(
            Cmdline::parse("agent.echo_port=x agent.echo_port=7").echo_port,
            Some(7)
        );
    }

    #[test]
    fn hostnames() {
        assert_eq!(Cmdline::parse("agent.hostname=pod-1.x").hostname, "pod-1.x");
        for bad in [
            "agent.hostname=",
            "agent.hostname",
            "agent.hostname=a_b",
            "agent.hostname=a/b",
        ] {
            let c = Cmdline::parse(bad);
            assert_eq!(c.hostname, "hull", "{bad}");
            assert_eq!(c.warnings.len(), 1, "{bad}");
        }
        let long = format!("agent.hostname={}", "a".repeat(65));
        assert_eq!(Cmdline::parse(&long).hostname, "hull");
        let max = "a".repeat(64);
        assert_eq!(
            Cmdline::parse(&format!("agent.hostname={max}")).hostname,
            max
        );
    }

    #[test]
    fn page_reporting_order() {
        let c = Cmdline::parse("quiet page_reporting.page_reporting_order=4");
        assert_eq!(c.page_reporting_order, Some(4));
        assert!(c.warnings.is_empty());
        for bad in [
            "page_reporting.page_reporting_order=11",
            "page_reporting.page_reporting_order=x",
            "page_reporting.page_reporting_order",
        ] {
            let c = Cmdline::parse(bad);
            assert_eq!(c.page_reporting_order, None, "{bad}");
            assert_eq!(c.warnings.len(), 1, "{bad}");
        }
    }

    #[test]
    fn unrelated_keys_are_ignored() {
        let c = Cmdline::parse("agent.other=1 hull.unknown root=/dev/vda agent.portx=5");
        assert_eq!(c, Cmdline::default());
    }
}
