//! `cargo xtask harness [--timeout SECS] -- CMD ARGS...`: runs a command where guest VMs can boot —
//! inside the nested-KVM L1 VM on a PVM or KVM-less host, directly on a hardware-KVM host — and exits
//! with the command's status. The L1 image is built into target/harness/ first if needed.
//!
//! Other commands (test, bench) call [`run_commands`] or [`run_script`] to run many commands in ONE L1
//! boot: a boot costs ~7 s.
use std::time::Duration;

use anyhow::{Context, Result};
use hull_harness::{script::quote, RunOptions};

/// Arguments of `cargo xtask harness`.
#[derive(clap::Args)]
pub struct Args {
    /// Wall-clock limit of the run (boot, command, power-off), in seconds.
    #[arg(long, default_value_t = hull_harness::DEFAULT_TIMEOUT.as_secs())]
    pub timeout: u64,
    /// Seconds L1 may print nothing (not even its heartbeat) before it counts as hung and the run is
    /// retried (up to hull_harness::MAX_ATTEMPTS attempts in all).
    #[arg(long, default_value_t = hull_harness::DEFAULT_SILENCE_TIMEOUT.as_secs())]
    pub silence_timeout: u64,
    /// Show the full L1 kernel log and the L1 init's progress (also: HULL_HARNESS_VERBOSE=1).
    #[arg(long)]
    pub verbose: bool,
    /// The command to run inside L1.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// Runs the command and exits with its status.
pub fn run(args: Args) -> Result<()> {
    let mut opts = options(Duration::from_secs(args.timeout));
    opts.silence_timeout = Duration::from_secs(args.silence_timeout);
    opts.verbose |= args.verbose;
    let status = hull_harness::run(&args.cmd, &opts).context("the harness run failed")?;
    std::process::exit(status);
}

/// Harness options for this workspace: its `target/` directory, the current directory as the working
/// directory, the forwarded environment, and the given wall-clock limit.
pub fn options(timeout: Duration) -> RunOptions {
    RunOptions {
        timeout,
        ..RunOptions::default()
    }
}

/// Runs a POSIX shell script in one L1 boot and returns its exit status. Start it with `set -e` to stop
/// at the first failing command.
pub fn run_script(script: &str, opts: &RunOptions) -> Result<i32> {
    hull_harness::run_script(script, opts).context("the harness run failed")
}

/// Runs `commands` one after another in one L1 boot, stopping at the first that fails; returns 0 or the
/// status of the failing command. Each command is a program and its arguments (quoted for the shell).
pub fn run_commands(commands: &[Vec<String>], opts: &RunOptions) -> Result<i32> {
    run_script(&batch_script(commands), opts)
}

/// The script [`run_commands`] runs.
fn batch_script(commands: &[Vec<String>]) -> String {
    let mut script = String::from("set -e\n");
    for cmd in commands {
        let words: Vec<String> = cmd.iter().map(|a| quote(a)).collect();
        script.push_str(&words.join(" "));
        script.push('\n');
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_quotes_and_stops_at_failure() {
        let script = batch_script(&[
            vec!["echo".into(), "a b".into()],
            vec!["sh".into(), "-c".into(), "exit 3".into()],
            vec!["echo".into(), "never".into()],
        ]);
        assert_eq!(script, "set -e\necho 'a b'\nsh -c 'exit 3'\necho never\n");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"a b\n");
    }
}
