//! Runs the harness for real (QEMU, or the host when it has hardware KVM). Ignored by default:
//! `cargo test -p hull-harness -- --ignored` (about 10 s per test on a 2-core PVM host).

#[cfg(test)]
mod l1 {
    use std::fs;

    use hull_harness::{run, run_script, RunOptions};

    #[test]
    #[ignore = "boots L1 under QEMU"]
    fn a_batch_runs_in_one_boot_and_writes_to_target() {
        let opts = RunOptions::default();
        let out = opts.target_dir.join("harness/it-batch.txt");
        let _ = fs::remove_file(&out);
        let script = format!(
            "set -e\n\
             test -c /dev/kvm\n\
             test \"$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null || echo 1)\" = 1\n\
             uname -r > {out}\n\
             echo second >> {out}\n\
             exit 5\n",
            out = out.display()
        );
        assert_eq!(run_script(&script, &opts).expect("harness run"), 5);
        let text = fs::read_to_string(&out).expect("the batch wrote to target/");
        assert!(text.ends_with("second\n"), "{text}");
        let _ = fs::remove_file(&out);
    }

    #[test]
    #[ignore = "boots L1 under QEMU"]
    fn a_missing_program_fails() {
        let status =
            run(&["/nonexistent".to_owned()], &RunOptions::default()).expect("harness run");
        assert_eq!(status, 127);
    }
}
