//! `cargo xtask test`: the whole suite, on a fresh machine.
//!
//! 1. installs what is missing (apt packages);
//! 2. formatting and clippy (`-D warnings`, all targets and features);
//! 3. every host test (`cargo test --workspace`: unit tests, CLI tests; no KVM needed);
//! 4. the guest image and the guest suites (`hull-tests --features guest`), run in ONE boot of the
//!    nested-KVM harness (or directly on a hardware-KVM host), their output kept under
//!    `target/test-logs/`; if L1 itself fails, another boot resumes where it stopped, and a test
//!    the harness's nested SVM failed (an L2 vCPU at L1's `kvm_amd` code) runs once more
//!    ([`guest_suites`]);
//! 5. a closing line `summary: N passed, M failed`.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::{cargo, deps, guest_image, guest_suites};

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
            .map(|(name, exe)| guest_suites::Suite { name, exe })
            .collect();
        if suites.is_empty() {
            bail!("no guest suites found in hull-tests");
        }
        let image = guest_image::ensure()?;
        let fixtures_initrd = guest_image::fixtures_initramfs(&image)?;
        let logs = root.join("target/test-logs");
        let vm_logs = logs.join("vm");
        let _ = std::fs::remove_dir_all(&vm_logs);
        std::fs::create_dir_all(&vm_logs)?;
        let mut env = vec![
            (
                "HULL_VMM".to_owned(),
                root.join("target/debug/hull-vmm").display().to_string(),
            ),
            (
                "HULL_FIXTURES_INITRD".to_owned(),
                fixtures_initrd.display().to_string(),
            ),
            (
                "HULL_TEST_LOG_DIR".to_owned(),
                vm_logs.display().to_string(),
            ),
        ];
        // containerd 1.7 and 2.x for the shim suite, beside Debian 12's 1.6.
        for (var, dir) in deps::other_containerds()? {
            env.push((var, dir.display().to_string()));
        }
        // The suites boot the kernel this run built (HULL_GUEST_KERNEL picks which).
        env.push(("HULL_GUEST_DIR".to_owned(), image.dir.display().to_string()));
        // One test at a time: L1 has two vCPUs, and oversubscribing them with L2 vCPUs makes nested
        // SVM under TCG lock up L1's kernel (seen with QEMU as the inner VMM too). Each test boots
        // in ~2 s, so little is lost.
        let (p, f, _) = guest_suites::run(&suites, &env, &logs)?;
        passed += p;
        failed += f;
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
