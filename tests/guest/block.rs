//! virtio-blk end to end: `hull-vmm --drive` with a real ext4 image, and the guest kernel's
//! virtio_blk driver (loaded by the agent at boot) finding the disk at the right size.
//!
//! What the guest reads from and writes to the disk needs the agent to mount it; until then this
//! checks the kernel's probe line on the console:
//! `virtio_blk virtio0: [vda] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)`.
#![allow(clippy::tests_outside_test_module)] // an integration-test crate is all test code

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hull_tests::{guest_image, run_with_deadline, vmm_command, VmRun};
use sha2::{Digest, Sha256};

/// Generous: an L2 boot takes ~5 s in the harness; a hang must still fail, not block.
const LIMIT: Duration = Duration::from_secs(240);

/// `quiet loglevel=6`: the console shows KERN_NOTICE and worse, which includes virtio_blk's probe
/// line, but not the KERN_INFO boot log (every console byte is a VM exit). `hull.oneshot`: the
/// agent loads the modules, prints its ready line and powers off.
const CMDLINE: &str = "console=ttyS0 quiet loglevel=6 reboot=k panic=-1 pci=off hull.oneshot";

/// The image: 64 MiB, so 131072 sectors.
const DISK_BYTES: u64 = 64 << 20;

/// A disk image in the temporary directory, removed on drop.
struct Disk(PathBuf);

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Disk {
    /// A fresh 64 MiB image with an ext4 file system (`mkfs.ext4` from e2fsprogs).
    fn ext4(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("hull-blk-{}-{name}.img", std::process::id()));
        let disk = Self(p);
        std::fs::File::create(&disk.0)
            .and_then(|f| f.set_len(DISK_BYTES))
            .unwrap_or_else(|e| panic!("create {}: {e}", disk.0.display()));
        let out = Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", "hull-test"])
            .arg(&disk.0)
            .output()
            .unwrap_or_else(|e| panic!("mkfs.ext4 (install e2fsprogs): {e}"));
        assert!(out.status.success(), "mkfs.ext4: {out:?}");
        disk
    }

    fn sha256(&self) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.0).unwrap();
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).unwrap();
        h.finalize().to_vec()
    }
}

/// Boots the guest image (ELF/PVH, 1 vCPU, 256 MiB) with `--drive <drive>`.
fn boot_with_drive(drive: &str) -> VmRun {
    let img = guest_image();
    let mut cmd = vmm_command(&img.vmlinux, 1, 256);
    cmd.args(["--cmdline", CMDLINE, "--drive", drive]);
    run_with_deadline(cmd, LIMIT)
}

/// Checks the boot ended cleanly and the kernel probed `vda` at 64 MiB.
fn assert_sees_vda(run: &VmRun) {
    assert!(run.status.success(), "hull-vmm failed: {run:?}");
    assert_eq!(run.stderr.trim(), "hull-vmm: guest powered off", "{run:?}");
    assert!(run.ready().is_some(), "no ready marker: {run:?}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("virtio_blk virtio") && l.contains("[vda]"))
        .unwrap_or_else(|| panic!("the guest kernel did not report vda: {run:?}"));
    let want = format!("[vda] {} 512-byte logical blocks", DISK_BYTES / 512);
    assert!(line.contains(&want), "expected '{want}' in: {line}");
}

#[test]
fn guest_kernel_sees_the_drive() {
    let disk = Disk::ext4("rw");
    let run = boot_with_drive(&format!("path={},serial=hull-test-disk", disk.0.display()));
    assert_sees_vda(&run);
}

#[test]
fn guest_kernel_sees_a_read_only_drive() {
    // Linux 6.1's virtio_blk marks a VIRTIO_BLK_F_RO disk read-only (set_disk_ro) without a
    // console message, so the boot only shows the disk; the image must come back unchanged.
    let disk = Disk::ext4("ro");
    let before = disk.sha256();
    let run = boot_with_drive(&format!(
        "path={},ro,serial=hull-test-disk",
        disk.0.display()
    ));
    assert_sees_vda(&run);
    assert_eq!(disk.sha256(), before, "a read-only drive was written");
}

/// A loop device over an image, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_host_block_device_is_a_drive_too() {
    // A block device has no file size: the drive is sized by seeking to its end.
    let disk = Disk::ext4("loop");
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&disk.0)
        .output()
        .unwrap_or_else(|e| panic!("losetup (util-linux): {e}"));
    assert!(out.status.success(), "losetup: {out:?}");
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    assert!(dev.0.starts_with("/dev/loop"), "{dev:?}", dev = dev.0);
    let run = boot_with_drive(&format!("path={},serial=hull-test-loop", dev.0));
    assert_sees_vda(&run);
}

/// The fixtures initramfs (busybox rootfs in the guest), made by `cargo xtask test`.
fn fixtures_initrd() -> PathBuf {
    std::env::var_os("HULL_FIXTURES_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            hull_tests::workspace_root().join("target/guest/initramfs-fixtures.cpio")
        })
}

#[test]
fn a_disk_mounted_by_serial_keeps_what_a_container_wrote() {
    use hull_agent_api::agent;
    use hull_tests::containers::{Ctx, GUEST_FIXTURE_ROOTFS};
    use hull_tests::RunningVm;

    let disk = Disk::ext4("data");
    let dir = RunningVm::prepare("blkdata");
    let vm = RunningVm::start_full(
        dir,
        &fixtures_initrd(),
        1,
        512,
        "",
        &[
            "--drive".into(),
            format!("path={},serial=hull-data", disk.0.display()),
        ],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (ctx, client) =
            Ctx::guest(vm.uds.clone(), vm.pid(), GUEST_FIXTURE_ROOTFS, "blk", LIMIT).await;
        let raw = ctx.client.clone();
        let rpc = || hull_agent_api::ttrpc::context::with_timeout(120_000_000_000);
        // A serial nobody has: a clear NOT_FOUND.
        let mut m = agent::MountStorageRequest::new();
        m.block_serial = "no-such-disk".into();
        m.fstype = "ext4".into();
        m.mount_point = "/run/hull/storage/data".into();
        let e = raw.mount_storage(rpc(), &m).await.unwrap_err();
        assert!(format!("{e:?}").contains("no-such-disk"), "{e:?}");
        m.block_serial = "hull-data".into();
        raw.mount_storage(rpc(), &m).await.unwrap();

        let mut spec = ctx.spec(&[
            "sh",
            "-c",
            "echo written in the guest > /data/hello.txt && cat /data/hello.txt",
        ]);
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
            "destination": "/data", "type": "bind",
            "source": "/run/hull/storage/data", "options": ["rbind", "rw"]}));
        let out = ctx.run("blk-1", &spec, None).await.unwrap();
        assert_eq!(
            (out.status, out.out()),
            (0, "written in the guest\n".to_owned()),
            "{}",
            out.err()
        );
        // The agent syncs and unmounts on DestroySandbox; the device flushes to the image.
        client.destroy_sandbox().await.unwrap();
    });
    let run = vm.wait(LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    let fsck = Command::new("fsck.ext4")
        .arg("-fn")
        .arg(&disk.0)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "fsck: {fsck:?}");
    let cat = Command::new("debugfs")
        .args(["-R", "cat /hello.txt"])
        .arg(&disk.0)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        "written in the guest\n",
        "{cat:?}"
    );
}
