//! Reading L1's serial console: turns the byte stream QEMU writes to its stdout into lines to show and
//! into the harness's marker events.
//!
//! L1's `/init` (tests/harness/l1-init.sh) speaks a tiny line protocol on the console, interleaved with
//! whatever the command and the L1 kernel print. Every marker carries a per-run nonce (passed on the L1
//! kernel command line), so a test that prints marker-like text (say, by `cat`-ing the init script) cannot
//! fake the end of a run:
//!
//! | marker | meaning |
//! |---|---|
//! | `HULL_HARNESS_START=<nonce>` | L1 is set up; the command starts now |
//! | `HULL_HARNESS_ALIVE=<nonce>` | heartbeat while the command runs: L1 is not hung |
//! | `HULL_HARNESS_EXIT=<nonce>:<code>` | the command exited with `<code>` |
//! | `HULL_HARNESS_ERROR=<nonce>:<message>` | L1 set-up failed; the command did not run |
//!
//! A marker may follow other text on the same line (the command printed a partial line, or the kernel
//! interleaved a message); the text before it is still shown. The serial line ends lines with `\r\n`; the
//! `\r` is dropped. Bytes that are not UTF-8 are shown lossily.

/// What the scanner found in the console output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// A line of output to show (without its line ending).
    Line(String),
    /// L1 finished its set-up and started the command.
    Started,
    /// L1's heartbeat: it is alive, the command is still running.
    Alive,
    /// The command exited with this status.
    Exit(i32),
    /// L1's set-up failed with this message.
    SetupError(String),
}

/// Whether `line` is L1's kernel saying that L1 itself is failing: a CPU stuck in the kernel, an RCU
/// stall, or a panic. Seen under load when nested SVM is emulated by TCG (the same happens with
/// QEMU as the inner VMM); the run is then retried like a silent L1.
pub fn l1_kernel_fault(line: &str) -> bool {
    const SIGNS: [&str; 4] = [
        "watchdog: BUG: soft lockup",
        "rcu_sched self-detected stall",
        "rcu: INFO: rcu_preempt self-detected stall",
        "Kernel panic - not syncing",
    ];
    SIGNS.iter().any(|s| line.contains(s))
}

const START: &str = "HULL_HARNESS_START=";
const ALIVE: &str = "HULL_HARNESS_ALIVE=";
const EXIT: &str = "HULL_HARNESS_EXIT=";
const ERROR: &str = "HULL_HARNESS_ERROR=";

/// Splits console bytes into lines and recognises this run's markers.
#[derive(Debug)]
pub struct Scanner {
    nonce: String,
    partial: Vec<u8>,
}

impl Scanner {
    /// A scanner for the run whose markers carry `nonce`.
    pub fn new(nonce: &str) -> Self {
        Self {
            nonce: nonce.to_owned(),
            partial: Vec::new(),
        }
    }

    /// Feeds a chunk of console bytes; returns the events of every line the chunk completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.partial);
                self.line(&line, &mut events);
            } else {
                self.partial.push(byte);
            }
        }
        events
    }

    /// Ends the stream: the events of a last line that had no line ending.
    pub fn finish(&mut self) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, &mut events);
        }
        events
    }

    fn line(&self, raw: &[u8], events: &mut Vec<ConsoleEvent>) {
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end_matches('\r');
        match self.find_marker(text) {
            Some((before, event)) => {
                let before = before.trim_end_matches('\r');
                if !before.is_empty() {
                    events.push(ConsoleEvent::Line(before.to_owned()));
                }
                events.push(event);
            }
            None => events.push(ConsoleEvent::Line(text.to_owned())),
        }
    }

    /// The first marker of this run in `line`, and the text before it.
    fn find_marker<'a>(&self, line: &'a str) -> Option<(&'a str, ConsoleEvent)> {
        let mut best: Option<(usize, ConsoleEvent)> = None;
        for prefix in [START, ALIVE, EXIT, ERROR] {
            let mut from = 0;
            while let Some(pos) = line[from..].find(prefix) {
                let at = from + pos;
                let rest = &line[at + prefix.len()..];
                if let Some(event) = self.parse_marker(prefix, rest) {
                    if best.as_ref().is_none_or(|(b, _)| at < *b) {
                        best = Some((at, event));
                    }
                    break;
                }
                from = at + prefix.len();
            }
        }
        best.map(|(at, event)| (&line[..at], event))
    }

    fn parse_marker(&self, prefix: &str, rest: &str) -> Option<ConsoleEvent> {
        let rest = rest.strip_prefix(self.nonce.as_str())?;
        match prefix {
            START => rest.trim().is_empty().then_some(ConsoleEvent::Started),
            ALIVE => Some(ConsoleEvent::Alive),
            EXIT => {
                let code = rest.strip_prefix(':')?;
                let digits: &str = &code[..code
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(code.len())];
                digits.parse().ok().map(ConsoleEvent::Exit)
            }
            ERROR => rest
                .strip_prefix(':')
                .map(|msg| ConsoleEvent::SetupError(msg.trim().to_owned())),
            _ => None,
        }
    }
}

/// Whether a line QEMU wrote to its stderr is known, harmless noise (pitfall 5 of the harness notes):
/// TCG's warnings about CPU features of the emulated EPYC that it does not implement.
pub fn is_qemu_noise(line: &str) -> bool {
    line.contains("TCG doesn't support requested feature")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Vec<ConsoleEvent> {
        let mut scanner = Scanner::new("abc123");
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(scanner.push(chunk));
        }
        events.extend(scanner.finish());
        events
    }

    fn line(s: &str) -> ConsoleEvent {
        ConsoleEvent::Line(s.to_owned())
    }

    #[test]
    fn plain_lines_and_crlf() {
        assert_eq!(
            scan(&[b"hello\r\nworld\r\n"]),
            vec![line("hello"), line("world")]
        );
    }

    #[test]
    fn markers_on_their_own_lines() {
        let events = scan(&[b"HULL_HARNESS_START=abc123\r\nout\r\nHULL_HARNESS_ALIVE=abc123\r\n\r\nHULL_HARNESS_EXIT=abc123:7\r\n"]);
        assert_eq!(
            events,
            vec![
                ConsoleEvent::Started,
                line("out"),
                ConsoleEvent::Alive,
                line(""),
                ConsoleEvent::Exit(7)
            ]
        );
    }

    #[test]
    fn marker_split_across_chunks() {
        let events = scan(&[b"HULL_HARN", b"ESS_EXIT=abc", b"123:4", b"2\r", b"\n"]);
        assert_eq!(events, vec![ConsoleEvent::Exit(42)]);
    }

    #[test]
    fn marker_after_partial_output_keeps_the_output() {
        let events = scan(&[b"no newline at the endHULL_HARNESS_EXIT=abc123:0\r\n"]);
        assert_eq!(
            events,
            vec![line("no newline at the end"), ConsoleEvent::Exit(0)]
        );
    }

    #[test]
    fn marker_followed_by_interleaved_kernel_text() {
        let events = scan(&[b"HULL_HARNESS_EXIT=abc123:3[   12.5] reboot: Power down\r\n"]);
        assert_eq!(events, vec![ConsoleEvent::Exit(3)]);
    }

    #[test]
    fn foreign_nonce_is_just_output() {
        let events = scan(&[b"echo HULL_HARNESS_EXIT=$nonce:$status\nHULL_HARNESS_EXIT=zzz:1\n"]);
        assert_eq!(
            events,
            vec![
                line("echo HULL_HARNESS_EXIT=$nonce:$status"),
                line("HULL_HARNESS_EXIT=zzz:1")
            ]
        );
    }

    #[test]
    fn fake_marker_before_real_one_on_one_line() {
        let events = scan(&[b"HULL_HARNESS_EXIT=bad:1 HULL_HARNESS_EXIT=abc123:5\n"]);
        assert_eq!(
            events,
            vec![line("HULL_HARNESS_EXIT=bad:1 "), ConsoleEvent::Exit(5)]
        );
    }

    #[test]
    fn exit_without_digits_is_output() {
        assert_eq!(
            scan(&[b"HULL_HARNESS_EXIT=abc123:\n"]),
            vec![line("HULL_HARNESS_EXIT=abc123:")]
        );
    }

    #[test]
    fn setup_error_message() {
        let events = scan(&[b"HULL_HARNESS_ERROR=abc123:insmod kvm.ko failed\r\n"]);
        assert_eq!(
            events,
            vec![ConsoleEvent::SetupError("insmod kvm.ko failed".into())]
        );
    }

    #[test]
    fn last_line_without_newline_is_flushed() {
        assert_eq!(scan(&[b"a\nb"]), vec![line("a"), line("b")]);
    }

    #[test]
    fn invalid_utf8_is_shown_lossily() {
        assert_eq!(scan(&[b"\xffok\n"]), vec![line("\u{fffd}ok")]);
    }

    #[test]
    fn qemu_noise() {
        assert!(is_qemu_noise(
            "qemu-system-x86_64: warning: TCG doesn't support requested feature: CPUID.01H:ECX.fma [bit 12]"
        ));
        assert!(!is_qemu_noise(
            "qemu-system-x86_64: -fsdev local: cannot open"
        ));
    }
}
