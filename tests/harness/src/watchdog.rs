//! Time limits of one L1 run, as a pure state machine driven with explicit instants (so tests need no
//! sleeping).
//!
//! Two limits apply:
//! - the **wall-clock limit**: the whole run (boot, command, power-off) must end within it;
//! - the **silence limit**: L1 must write something to its console at least this often. While the command
//!   runs, L1's init prints a heartbeat every 20 s, so silence means L1 itself hung (pitfall 6 of the
//!   harness notes: L1 sometimes goes silent with QEMU burning CPU), not that a test is quiet. The runner
//!   retries a silent run once.
//!
//! Once the exit marker arrived, the run is over: the runner kills QEMU rather than wait for L1 to power
//! off (the init syncs before printing the marker, and 9p writes reach the host synchronously).

use std::time::{Duration, Instant};

/// Why a run was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The wall-clock limit passed.
    WallClock,
    /// No console output for the silence limit.
    Silence,
}

/// Tracks the limits of one run.
#[derive(Debug, Clone)]
pub struct Watchdog {
    start: Instant,
    last_output: Instant,
    wall_clock: Duration,
    silence: Duration,
}

impl Watchdog {
    /// A watchdog for a run that starts at `start`.
    pub fn new(start: Instant, wall_clock: Duration, silence: Duration) -> Self {
        Self {
            start,
            last_output: start,
            wall_clock,
            silence,
        }
    }

    /// L1 wrote to its console at `now`.
    pub fn output(&mut self, now: Instant) {
        self.last_output = now;
    }

    /// The limit that has passed at `now`, if one has.
    pub fn check(&self, now: Instant) -> Option<Expiry> {
        if now >= self.start + self.wall_clock {
            Some(Expiry::WallClock)
        } else if now >= self.last_output + self.silence {
            Some(Expiry::Silence)
        } else {
            None
        }
    }

    /// How long after `now` the next limit passes (zero if one has).
    pub fn time_left(&self, now: Instant) -> Duration {
        let deadline = (self.start + self.wall_clock).min(self.last_output + self.silence);
        deadline.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn quiet_until_a_limit() {
        let t0 = Instant::now();
        let dog = Watchdog::new(t0, S(600), S(120));
        assert_eq!(dog.check(t0), None);
        assert_eq!(dog.check(t0 + S(119)), None);
        assert_eq!(dog.time_left(t0 + S(100)), S(20));
        assert_eq!(dog.check(t0 + S(120)), Some(Expiry::Silence));
        assert_eq!(dog.time_left(t0 + S(130)), Duration::ZERO);
    }

    #[test]
    fn output_resets_silence_but_not_the_wall_clock() {
        let t0 = Instant::now();
        let mut dog = Watchdog::new(t0, S(300), S(120));
        for t in (0..300).step_by(60) {
            dog.output(t0 + S(t));
            assert_eq!(dog.check(t0 + S(t + 59)), None);
        }
        assert_eq!(dog.time_left(t0 + S(290)), S(10));
        assert_eq!(dog.check(t0 + S(300)), Some(Expiry::WallClock));
    }

    #[test]
    fn wall_clock_shorter_than_silence() {
        let t0 = Instant::now();
        let dog = Watchdog::new(t0, S(30), S(120));
        assert_eq!(dog.time_left(t0), S(30));
        assert_eq!(dog.check(t0 + S(30)), Some(Expiry::WallClock));
    }
}
