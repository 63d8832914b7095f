#!/bin/bash
# PID 1 of the test VM started by tests/vm/run. Not meant to be run on the host.
#
# The kernel mounts the host's whole file system read-only over virtio-9p as the guest's
# root and execs this script from it. We then:
#   1. format the scratch disk (/dev/vda) and stack a writable overlay on top of the
#      read-only host root, with its upper layer on the scratch disk (so writes anywhere,
#      e.g. into the checkout or /root, work and cost no guest RAM; they vanish with the VM);
#   2. pivot into the overlay; the pure read-only host view stays at /.vm-host;
#   3. mount the usual API file systems, tmpfs on /tmp, /run, /dev/shm, and bind the
#      scratch disk's own ext4 directory at /scratch (images go there: real ext4, no
#      overlay in the I/O path, so O_DIRECT and benchmarks behave);
#   4. run the command script named by `ublkvm.cmd=<host path>` on the kernel command line
#      from the repository root, as root, output on the serial console;
#   5. print `UBLK_VM_EXIT_STATUS=<n>` (parsed by tests/vm/run) and power off.
# If setup fails, no marker is printed and the VM powers off, which run reports as a rig
# failure rather than a test result.
# shellcheck disable=SC2317  # on_exit is reached through the EXIT trap
set -euo pipefail

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
readonly host_view=/.vm-host   # where the read-only host root stays visible after pivot

log() { printf 'vm-init: %s\n' "$*"; }

power_off() {
  sync
  # Debian's poweroff is systemctl; with -f and no systemd running it calls reboot(2)
  # directly. The fragment enables ACPI, so this really turns QEMU off.
  poweroff -f >/dev/null 2>&1 || true
  echo o >/proc/sysrq-trigger 2>/dev/null || true
  sleep 10
  # Last resort: PID 1 exiting panics the kernel; panic=-1 plus QEMU's -no-reboot end the VM.
  exit 1
}

# Any unexpected failure (set -e) lands here: say where, and end the VM instead of
# letting PID 1 exit (which would panic and hide the message).
failed_line='?'
on_exit() {
  local rc=$?
  log "FATAL: init failed (status $rc) at init.sh line $failed_line; no test was run"
  power_off
}
trap 'failed_line=$LINENO' ERR
trap on_exit EXIT

mount_if_absent() {  # mount_if_absent TYPE SOURCE TARGET [OPTIONS]
  local type=$1 src=$2 target=$3 opts=${4:-}
  mkdir -p "$target"
  mountpoint -q "$target" && return 0
  mount -t "$type" ${opts:+-o "$opts"} "$src" "$target"
}

# --- Stage 1: still on the read-only 9p root --------------------------------------------

# The 9p export crosses the host's mount points, so until we mount our own, /proc, /sys and
# /dev here show the *host's* contents: /proc/cmdline would be the host's, mountpoint(1)
# would read the host's mount table, and reading host sysfs/procfs files over 9p (their
# sizes lie) sends this kernel's netfs read-retry path into endless recursion: a stack
# overflow oops (seen with mkfs.ext4 probing /sys). Hence proc first and unconditionally,
# then sysfs, before running anything else. These stay mounted under /.vm-host after the
# pivot, so that view never exposes the host's pseudo files either.
mount -t proc proc /proc
mount_if_absent sysfs sysfs /sys
mount_if_absent devtmpfs devtmpfs /dev   # usually already there (CONFIG_DEVTMPFS_MOUNT)
mount_if_absent tmpfs tmpfs /run mode=0755

cmd_script=
read -r -a kernel_args </proc/cmdline
for arg in "${kernel_args[@]}"; do
  case $arg in ublkvm.cmd=*) cmd_script=${arg#ublkvm.cmd=} ;; esac
done
[[ -n "$cmd_script" ]] || { log "no ublkvm.cmd=<script> on the kernel command line: $(</proc/cmdline)"; exit 1; }

# The repository root is where this script lives (tests/vm/init.sh).
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

[[ -b /dev/vda ]] || { log "scratch disk /dev/vda missing (run passes it as a virtio drive)"; exit 1; }
# Lazy init: the disk is a fresh sparse file (already zeros), and skipping the inode-table
# zeroing (noinit_itable) keeps a background kernel thread from burning TCG CPU.
mkfs.ext4 -F -q -E lazy_itable_init=1,lazy_journal_init=1 /dev/vda
mkdir -p /run/vm/disk /run/vm/root
mount -t ext4 -o noinit_itable /dev/vda /run/vm/disk
mkdir -p /run/vm/disk/upper /run/vm/disk/work /run/vm/disk/scratch
chmod 1777 /run/vm/disk/scratch
mount -t overlay overlay \
  -o lowerdir=/,upperdir=/run/vm/disk/upper,workdir=/run/vm/disk/work /run/vm/root

# --- Stage 2: switch into the writable overlay ------------------------------------------

mkdir -p "/run/vm/root$host_view"
cd /run/vm/root
pivot_root . ".$host_view"   # old root (with our /proc, /sys, /dev, /run on it) -> /.vm-host
cd /

mount -t proc proc /proc   # unconditionally again: the overlay's /proc shows the host's
mount_if_absent sysfs sysfs /sys
mount_if_absent devtmpfs devtmpfs /dev
mount_if_absent devpts devpts /dev/pts gid=5,mode=620,ptmxmode=666
mount_if_absent tmpfs tmpfs /dev/shm mode=1777
mount_if_absent tmpfs tmpfs /run mode=0755
mkdir -p /run/lock   # Debian's /var/lock -> /run/lock; qemu-nbd -c binds a socket there
chmod 1777 /run/lock
# A checkout under /tmp would be hidden by the tmpfs about to be mounted there: park its
# (writable, overlay) view and put it back on top of the tmpfs at the same path.
if [[ "$repo_root/" == /tmp/* ]]; then
  mkdir -p /run/vm/repo
  mount --bind "$repo_root" /run/vm/repo
fi
mount_if_absent tmpfs tmpfs /tmp mode=1777
if [[ "$repo_root/" == /tmp/* ]]; then
  mkdir -p "$repo_root"
  mount --move /run/vm/repo "$repo_root"
fi
mkdir -p /scratch
mount --bind "$host_view/run/vm/disk/scratch" /scratch

# The command script (in the host's temp dir) is read through the untouched host view.
cmd_path=$host_view$cmd_script
[[ -r "$cmd_path" ]] || { log "command script not readable: $cmd_script"; exit 1; }

ip link set lo up 2>/dev/null || true   # tests may talk to localhost
hostname ublk-vm 2>/dev/null || true
# No \r\n on the serial console: the host sees plain lines.
stty -onlcr 2>/dev/null || true

# --- Run the command --------------------------------------------------------------------

cd "$repo_root"
# Remember how many kernel warnings boot produced, to show only the command's own below.
dmesg_levels=emerg,alert,crit,err,warn
boot_warnings=$(dmesg --level=$dmesg_levels 2>/dev/null | wc -l || echo 0)
# tests/vm/run boots again when the VM dies before this line (a boot-time panic).
log "command started"
set +e
# A clean environment (the command script exports what the host passed through);
# stdin is /dev/null so a command waiting for input fails instead of hanging.
env -i PATH="$PATH" HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 TERM=dumb UBLK_IN_VM=1 \
  /bin/bash "$cmd_path" </dev/null
status=$?
set -e

if ((status != 0)); then
  # Kernel warnings are not on the console (quiet); show those logged while the command
  # ran, for diagnosis.
  warnings=$(dmesg --level=$dmesg_levels 2>/dev/null | tail -n +$((boot_warnings + 1)) | tail -n 40 || true)
  if [[ -n "$warnings" ]]; then
    log "command failed; kernel warnings logged while it ran (last 40):"
    printf '%s\n' "$warnings"
  fi
fi

sync
printf '\nUBLK_VM_EXIT_STATUS=%d\n' "$status"
trap - EXIT
power_off
