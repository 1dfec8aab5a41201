//! Running cargo (and other tools) from xtask: the workspace root, the target directory, and
//! commands echoed before they run, whose failure names the command.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

/// The target the shipped host binaries (hull-vmm, the shim) are built for: explicit, so that the
/// static-linking flag never reaches build scripts and proc macros.
pub const RELEASE_TARGET: &str = hull_guest_image::AGENT_TARGET;

/// Where [`build_release`] puts them.
pub fn release_dir() -> PathBuf {
    root().join("target").join(RELEASE_TARGET).join("release")
}

/// `cargo build --release` of `packages`, statically linked (glibc static-pie, as the guest
/// agent): what is installed on a host. Each start of a sandbox runs the shim three times
/// (containerd's `start`, the serving shim, containerd's `delete` after it) and hull-vmm once;
/// without the dynamic loader each exec took 24 ms less in the harness (hull-vmm: 74 -> 50 ms).
pub fn build_release(packages: &[&str]) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "--release", "--target", RELEASE_TARGET])
        // CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS: make ours the only one.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", hull_guest_image::AGENT_RUSTFLAGS);
    for p in packages {
        c.args(["-p", p]);
    }
    run(c)?;
    Ok(release_dir())
}

/// The cargo that runs us.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, inheriting stdio; fails if it fails.
pub fn run(mut cmd: Command) -> Result<()> {
    let what = describe(&cmd);
    println!("xtask: {what}");
    let st = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// Runs `cmd`, echoing its stdout and stderr live and returning them (merged) as text, with its
/// success.
pub fn run_captured(mut cmd: Command) -> Result<(bool, String)> {
    let what = describe(&cmd);
    println!("xtask: {what}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let err = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    text.push_str(&err_thread.join().expect("stderr reader"));
    let st = child.wait()?;
    Ok((st.success(), text))
}

/// Builds `cargo test <args> --no-run` and returns the test executables cargo reports, by target name.
pub fn test_executables(args: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut c = cargo();
    c.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .args(args);
    let what = describe(&c);
    println!("xtask: {what}");
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str()) {
            exes.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(exes)
}

/// Sums the `test result: ... N passed; M failed; K ignored` lines of libtest output.
pub fn count_results(output: &str) -> (u64, u64, u64) {
    let mut total = (0, 0, 0);
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        let num = |key: &str| -> u64 {
            rest.split([';', '.'])
                .find_map(|part| part.trim().strip_suffix(key)?.trim().parse().ok())
                .unwrap_or(0)
        };
        total.0 += num("passed");
        total.1 += num("failed");
        total.2 += num("ignored");
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_libtest_summaries() {
        let out = "running 3 tests\n\
            test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
            noise\n\
            test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(count_results(out), (8, 2, 1));
        assert_eq!(count_results("nothing"), (0, 0, 0));
    }
}
