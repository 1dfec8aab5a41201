#!/bin/busybox sh
# /init of the Hull harness's L1 VM (PID 1, run by busybox from the L1 initramfs).
#
# Kernel command line parameters (set by hull-harness, see src/qemu.rs):
#   hull.script=PATH   host path of the command script to run (inside the chroot)
#   hull.target=PATH   host path of the workspace target/ dir, shared read-write as 9p tag "hosttarget"
#   hull.nonce=HEX     per-run token that makes the marker lines below unforgeable by test output
#   hull.verbose=1     print progress of every step
#
# Console protocol (parsed by src/console.rs; every marker is a line of its own):
#   HULL_HARNESS_START=<nonce>        the command is about to start
#   HULL_HARNESS_ALIVE=<nonce>        heartbeat while the command runs (L1 is not hung)
#   HULL_HARNESS_EXIT=<nonce>:<code>  the command's exit status
#   HULL_HARNESS_ERROR=<nonce>:<msg>  L1 set-up failed; the command did not run
#
# Layout: the host root (9p "hostroot", read-only) is the lower layer of an overlay whose upper layer is a
# tmpfs, so the command sees the host's files and can write anywhere, writes vanishing at power-off; the
# host's target/ is mounted read-write on top at the same path, so what the command writes there stays.
# No tmpfs goes over /tmp: it would hide the host's files there.

/bin/busybox mkdir -p /proc /sys /dev /bin /sbin /usr/bin /usr/sbin /lower /upper /newroot
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Host tuning a Hull host should have (README, "Host set-up"): let memfd-backed guest RAM use
# transparent huge pages when the VMM asks (MADV_HUGEPAGE); the guest then takes 512x fewer
# nested-paging faults while it boots.
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null
# Loopback up: tests and benchmarks use 127.0.0.1 inside L1 (e.g. the loopback peer of bench vsock).
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null

script=
target=
nonce=
verbose=
for param in $(cat /proc/cmdline); do
    case "$param" in
        hull.script=*) script=${param#hull.script=} ;;
        hull.target=*) target=${param#hull.target=} ;;
        hull.nonce=*) nonce=${param#hull.nonce=} ;;
        hull.verbose=*) verbose=${param#hull.verbose=} ;;
    esac
done

say() {
    [ -n "$verbose" ] && echo "hull-harness L1 (uptime $(cut -d' ' -f1 /proc/uptime) s): $*"
}

fail() {
    echo
    echo "HULL_HARNESS_ERROR=$nonce:$*"
    sync
    poweroff -f
    exit 1
}

[ -n "$script" ] || fail "no hull.script= on the kernel command line"
[ -n "$target" ] || fail "no hull.target= on the kernel command line"

say "loading modules"
while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$module" || fail "insmod $module failed"
done < /etc/hull-modules

# The virtio-9p devices are probed asynchronously after virtio_pci loads: retry the mount (bounded).
say "mounting the host root"
tries=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower 2>/dev/null; do
    tries=$((tries + 1))
    [ "$tries" -lt 200 ] || fail "mounting the host root (9p tag hostroot) failed after $tries tries"
    sleep 0.05
done

mount -t tmpfs -o mode=0755 tmpfs /upper || fail "mounting the overlay's tmpfs failed"
mkdir -p /upper/upper /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/upper,workdir=/upper/work /newroot \
    || fail "mounting the overlay root failed"

mount -t proc proc /newroot/proc || fail "mounting /proc failed"
mount -t sysfs sysfs /newroot/sys || fail "mounting /sys failed"
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs /newroot/dev || fail "mounting /dev failed"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts || fail "mounting /dev/pts failed"
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm || fail "mounting /dev/shm failed"
mount -t tmpfs -o mode=0755 run /newroot/run 2>/dev/null

say "mounting the host's $target read-write"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap hosttarget "/newroot$target" \
    || fail "mounting the host's $target (9p tag hosttarget) read-write failed"
[ -f "/newroot$script" ] || fail "the command script $script is not visible inside L1"

# Heartbeat: tells the host that L1 is alive while the command prints nothing.
( while sleep 20; do echo "HULL_HARNESS_ALIVE=$nonce"; done ) &
heartbeat=$!

say "starting $script"
echo "HULL_HARNESS_START=$nonce"
env -i /bin/busybox chroot /newroot /bin/sh "$script" < /dev/null
status=$?

kill "$heartbeat" 2>/dev/null
sync
echo
echo "HULL_HARNESS_EXIT=$nonce:$status"
poweroff -f
