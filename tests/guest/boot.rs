//! Boots the real guest image under `hull-vmm` with real KVM (L1 of the harness, or hardware KVM)
//! and checks what the guest reports, how the VMM ends, and the errors it gives.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::process::Command;
use std::time::Duration;

use hull_tests::{guest_image, run_with_deadline, vmm_bin, vmm_command, VmRun};

/// Generous: an L2 boot takes ~5 s in the harness; a hang must still fail, not block.
const LIMIT: Duration = Duration::from_secs(240);

/// The default command line plus `hull.oneshot`: the agent prints its ready line and powers off.
const ONESHOT_CMDLINE: &str =
    "console=ttyS0 quiet reboot=k panic=-1 pci=off cryptomgr.notests hull.oneshot";

/// No init in the initramfs: the kernel panics, and panic=-1 reboots at once (reboot=k: through
/// the i8042 reset line).
const NO_INIT_CMDLINE: &str =
    "console=ttyS0 quiet reboot=k panic=-1 pci=off rdinit=/nonexistent init=/nonexistent";

fn boot(kernel: &std::path::Path, vcpus: u8, memory_mib: u32, extra: &[&str]) -> VmRun {
    let mut cmd = vmm_command(kernel, vcpus, memory_mib);
    if !extra.contains(&"--cmdline") {
        cmd.args(["--cmdline", ONESHOT_CMDLINE]);
    }
    cmd.args(extra);
    run_with_deadline(cmd, LIMIT)
}

fn assert_boots(kernel: &std::path::Path, vcpus: u8, memory_mib: u32) {
    let img = guest_image();
    let run = boot(kernel, vcpus, memory_mib, &[]);
    assert!(run.status.success(), "hull-vmm failed: {run:?}");
    assert_eq!(run.stderr.trim(), "hull-vmm: guest powered off", "{run:?}");
    let ready = run
        .ready()
        .unwrap_or_else(|| panic!("no ready marker: {run:?}"));
    assert_eq!(ready.cpus, u32::from(vcpus), "{run:?}");
    assert_eq!(ready.kernel, img.release);
    // A healthy quiet boot leaves the agent nothing to complain about (each console line costs
    // the boot a trap per character).
    let complaints: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("hull-agent:"))
        .collect();
    assert!(
        complaints.is_empty(),
        "the agent complained: {complaints:?}"
    );
    // MemTotal is RAM minus what the kernel reserves for itself: between 80% and 100% of it.
    let configured_kib = u64::from(memory_mib) * 1024;
    assert!(
        ready.mem_kib <= configured_kib && ready.mem_kib >= configured_kib * 8 / 10,
        "guest sees {} KiB of {configured_kib} KiB",
        ready.mem_kib
    );
}

#[test]
fn bzimage_1_vcpu_256_mib() {
    assert_boots(&guest_image().vmlinuz, 1, 256);
}

#[test]
fn bzimage_2_vcpus_512_mib() {
    assert_boots(&guest_image().vmlinuz, 2, 512);
}

#[test]
fn elf_pvh_1_vcpu_256_mib() {
    assert_boots(&guest_image().vmlinux, 1, 256);
}

#[test]
fn elf_pvh_2_vcpus_512_mib() {
    assert_boots(&guest_image().vmlinux, 2, 512);
}

#[test]
fn console_to_file_and_off() {
    let img = guest_image();
    let log = std::env::temp_dir().join(format!("hull-console-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let arg = format!("file:{}", log.display());
    let run = boot(&img.vmlinux, 1, 256, &["--console", &arg]);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(run.stdout, "", "console went to the file, not stdout");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| hull_tests::parse_ready(l).is_some()),
        "{text}"
    );

    let run = boot(&img.vmlinux, 1, 256, &["--console", "off"]);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr.trim(), "hull-vmm: guest powered off");
}

#[test]
fn guest_reboot_ends_the_vmm() {
    let img = guest_image();
    let run = boot(&img.vmlinux, 1, 256, &["--cmdline", NO_INIT_CMDLINE]);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(
        run.stderr.trim(),
        "hull-vmm: guest requested a reboot",
        "{run:?}"
    );
    assert!(run.ready().is_none());
}

#[test]
fn a_panic_with_the_console_off_leaves_its_last_console_lines() {
    // As above (the kernel panics and reboots), with the console off: hull-vmm's log then
    // carries the console's last lines, the panic among them, before its own last word.
    let img = guest_image();
    let run = boot(
        &img.vmlinux,
        1,
        256,
        &["--console", "off", "--cmdline", NO_INIT_CMDLINE],
    );
    assert!(run.status.success(), "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    let tail_at = run
        .stderr
        .find("the guest console's last")
        .unwrap_or_else(|| panic!("no console lines: {run:?}"));
    let panic_at = run
        .stderr
        .find("Kernel panic - not syncing")
        .unwrap_or_else(|| panic!("no panic among them: {run:?}"));
    assert!(tail_at < panic_at, "{run:?}");
    assert!(
        run.stderr
            .trim_end()
            .ends_with("hull-vmm: guest requested a reboot"),
        "{run:?}"
    );
}

#[test]
fn unprivileged_user_gets_a_permission_error() {
    // A private copy of the KVM node, readable by root only; hull-vmm run as 'nobody'.
    let img = guest_image();
    let node = std::env::temp_dir().join(format!("hull-kvm-{}", std::process::id()));
    let _ = std::fs::remove_file(&node);
    let ok = Command::new("mknod")
        .arg(&node)
        .args(["c", "10", "232"])
        .status()
        .expect("mknod");
    assert!(ok.success(), "mknod (the guest suite runs as root)");
    std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vmm_bin())
        .arg("--kernel")
        .arg(&img.vmlinux)
        .arg("--kvm")
        .arg(&node);
    let run = run_with_deadline(cmd, LIMIT);
    let _ = std::fs::remove_file(&node);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("permission denied opening"), "{run:?}");
}

#[test]
fn command_line_too_long_is_refused() {
    let img = guest_image();
    let long = "x".repeat(4096);
    let run = boot(&img.vmlinux, 1, 256, &["--cmdline", &long]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(
        run.stderr.contains("invalid kernel command line"),
        "{run:?}"
    );
}
