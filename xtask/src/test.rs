//! `cargo xtask test`: the whole suite, on a fresh machine.
//!
//! 1. installs what is missing (apt packages);
//! 2. formatting and clippy (`-D warnings`, all targets and features);
//! 3. every host test (`cargo test --workspace`: unit tests, CLI tests; no KVM needed);
//! 4. the guest image and the guest suites (`hull-tests --features guest`), run in ONE boot of the
//!    nested-KVM harness (or directly on a hardware-KVM host), their output kept under
//!    `target/test-logs/`;
//! 5. a closing line `summary: N passed, M failed`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{cargo, deps, guest_image, harness};

/// Arguments of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Args {
    /// Skip formatting and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Only the host tests (no guest image, no harness).
    #[arg(long)]
    pub host_only: bool,
}

/// Runs the suite.
pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    deps::ensure()?;
    let root = cargo::root();
    if !args.no_lint {
        let mut c = cargo::cargo();
        c.args(["fmt", "--all", "--", "--check"]);
        cargo::run(c)?;
        let mut c = cargo::cargo();
        c.args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]);
        cargo::run(c)?;
    }

    let mut c = cargo::cargo();
    c.args(["test", "--workspace", "--no-fail-fast"]);
    let (host_ok, host_out) = cargo::run_captured(c)?;
    let (mut passed, mut failed, _) = cargo::count_results(&host_out);
    if !host_ok && failed == 0 {
        failed += 1; // a build failure or a crashed test binary
    }

    if !args.host_only {
        let mut c = cargo::cargo();
        c.args(["build", "-p", "hull-vmm", "-p", "hull-shim"]);
        cargo::run(c)?;
        let suites: Vec<_> = cargo::test_executables(&["-p", "hull-tests", "--features", "guest"])?
            .into_iter()
            .filter(|(name, _)| name.starts_with("guest_"))
            .collect();
        if suites.is_empty() {
            bail!("no guest suites found in hull-tests");
        }
        let image = guest_image::ensure()?;
        let fixtures_initrd = guest_image::fixtures_initramfs(&image)?;
        let logs = root.join("target/test-logs");
        std::fs::create_dir_all(&logs)?;
        let mut script = String::from("st=0\n");
        let vmm = root.join("target/debug/hull-vmm");
        writeln!(script, "export HULL_VMM='{}'", vmm.display())?;
        writeln!(
            script,
            "export HULL_FIXTURES_INITRD='{}'",
            fixtures_initrd.display()
        )?;
        let vm_logs = logs.join("vm");
        let _ = std::fs::remove_dir_all(&vm_logs);
        std::fs::create_dir_all(&vm_logs)?;
        writeln!(script, "export HULL_TEST_LOG_DIR='{}'", vm_logs.display())?;
        // One test at a time: L1 has two vCPUs, and oversubscribing them with L2 vCPUs makes nested
        // SVM under TCG lock up L1's kernel (seen with QEMU as the inner VMM too). Each test boots
        // in ~2 s, so little is lost.
        for (name, exe) in &suites {
            let log = logs.join(format!("{name}.log"));
            let _ = std::fs::remove_file(&log);
            writeln!(
                script,
                "echo '== guest suite {name}'\nbash -o pipefail -c '\"$0\" --test-threads=1 2>&1 | tee \"$1\"' '{}' '{}' || st=1",
                exe.display(),
                log.display()
            )?;
        }
        script.push_str("exit $st\n");
        let status = harness::run_script(&script, &harness::options(Duration::from_secs(1800)))?;
        let mut guest_out = String::new();
        for (name, _) in &suites {
            match std::fs::read_to_string(logs.join(format!("{name}.log"))) {
                Ok(t) => guest_out.push_str(&t),
                Err(_) => {
                    println!("xtask: guest suite {name} left no log: counted as failed");
                    failed += 1;
                }
            }
        }
        let (p, f, _) = cargo::count_results(&guest_out);
        passed += p;
        failed += f;
        if status != 0 && f == 0 {
            failed += 1;
        }
    }
    println!(
        "xtask test: finished in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    println!("summary: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
