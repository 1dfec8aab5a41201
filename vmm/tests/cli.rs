//! `hull-vmm` refuses bad input with a one-line error and a non-zero exit, before touching KVM.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code
//! These run anywhere (no /dev/kvm needed).

use std::path::PathBuf;
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hull-vmm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A file that passes the kernel probe (ELF magic) without being bootable.
fn fake_kernel(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("vmlinux");
    std::fs::write(&p, b"\x7fELF\x02\x01\x01").unwrap();
    p
}

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hull-vmm"))
        .args(args)
        .output()
        .expect("run hull-vmm")
}

fn assert_fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("hull-vmm: error: "), "{stderr}");
}

#[test]
fn missing_kernel() {
    let out = vmm(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_fails_with(&out, "cannot read kernel /nonexistent/vmlinuz");
}

#[test]
fn not_a_kernel() {
    let d = tmp("notkernel");
    let p = d.join("README");
    std::fs::write(&p, "just text\n").unwrap();
    let out = vmm(&["--kernel", p.to_str().unwrap()]);
    assert_fails_with(&out, "is not a Linux kernel");
}

#[test]
fn missing_initrd() {
    let d = tmp("initrd");
    let k = fake_kernel(&d);
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_fails_with(&out, "cannot read initrd /nonexistent/initrd");
}

#[test]
fn zero_vcpus() {
    let d = tmp("vcpus");
    let k = fake_kernel(&d);
    let out = vmm(&["--kernel", k.to_str().unwrap(), "--vcpus", "0"]);
    assert_fails_with(&out, "invalid vCPU count 0");
}

#[test]
fn too_little_memory() {
    let d = tmp("mem");
    let k = fake_kernel(&d);
    let out = vmm(&["--kernel", k.to_str().unwrap(), "--memory", "16"]);
    assert_fails_with(&out, "too little memory: 16 MiB");
}

#[test]
fn pvm_host_is_refused_unless_declared() {
    let d = tmp("pvm");
    let k = fake_kernel(&d);
    let sys = d.join("sys-module");
    std::fs::create_dir_all(sys.join("kvm_pvm")).unwrap();
    let base = [
        "--kernel",
        k.to_str().unwrap(),
        "--sysfs-module",
        sys.to_str().unwrap(),
    ];
    let out = vmm(&base);
    assert_fails_with(&out, "CONFIG_PVM_GUEST");
    // Declared PVM-capable: passes the host check and goes on to KVM (absent here).
    let mut args = base.to_vec();
    args.extend(["--pvm-guest", "--kvm", "/nonexistent/kvm"]);
    assert_fails_with(&vmm(&args), "/nonexistent/kvm does not exist");
}

#[test]
fn missing_kvm_device() {
    let d = tmp("nokvm");
    let k = fake_kernel(&d);
    let sys = d.join("sys-module");
    std::fs::create_dir_all(&sys).unwrap();
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--sysfs-module",
        sys.to_str().unwrap(),
        "--kvm",
        "/nonexistent/kvm",
    ]);
    assert_fails_with(&out, "/nonexistent/kvm does not exist");
}

#[test]
fn bad_console() {
    let out = vmm(&["--kernel", "/x", "--console", "tty"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid console 'tty'"));
}

#[test]
fn drive_missing_file() {
    let d = tmp("drive-missing");
    let k = fake_kernel(&d);
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--drive",
        "path=/nonexistent/disk.img,serial=x",
    ]);
    assert_fails_with(&out, "drive /nonexistent/disk.img does not exist");
}

#[test]
fn drive_bad_option() {
    let d = tmp("drive-option");
    let k = fake_kernel(&d);
    let img = d.join("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let arg = format!("path={},rw", img.display());
    let out = vmm(&["--kernel", k.to_str().unwrap(), "--drive", &arg]);
    assert_fails_with(&out, &format!("invalid drive '{arg}': unknown option 'rw'"));
    let out = vmm(&["--kernel", k.to_str().unwrap(), "--drive", "ro"]);
    assert_fails_with(&out, "invalid drive 'ro': no path");
}

#[test]
fn drive_serial_too_long() {
    let d = tmp("drive-serial");
    let k = fake_kernel(&d);
    let img = d.join("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let arg = format!("path={},serial=012345678901234567890", img.display());
    let out = vmm(&["--kernel", k.to_str().unwrap(), "--drive", &arg]);
    assert_fails_with(&out, "invalid drive serial \"012345678901234567890\"");
}
