#!/bin/bash
# `del` refuses a device that is in use, and `del --force` stops it anyway (issue 20).
# Where GET_FEATURES offers SAFE_STOP_DEV (7.0+: the 7.3 kernel) the kernel checks and stops
# in one step (TRY_STOP_DEV) and any opener counts; before that (6.12) an exclusive open of
# /dev/ublkbN stands in, which sees mounts and exclusive holders but not plain opens. The
# test branches on what `features` reports, never on the kernel version.
source "$(dirname "$0")/lib.bash"

safe_stop=no
"$UQ" features --output=json | grep -q '"SAFE_STOP_DEV"' && safe_stop=yes
echo "SAFE_STOP_DEV offered: $safe_stop"

img=$WORK/busy.qcow2

mounted_refused() {
  local dev id pid
  qemu-img create -q -f qcow2 "$img" 256M
  dev=$(add_device -f "$img")
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  mkfs.ext4 -F -q "$dev"
  mount "$dev" "$MNT"
  head -c 1M /dev/urandom >"$MNT/before"
  sync
  local err rc=0
  err=$("$UQ" del -n "$id" 2>&1) || rc=$?
  echo "del of the mounted $dev: status $rc: $err"
  ((rc == 1)) && [[ $(grep -c '' <<<"$err") == 1 && $err == *"in use"* && $err == *--force* ]]
  # Nothing changed: the device, its daemon and the file system carry on.
  [[ -b $dev && -d /proc/$pid ]]
  head -c 1M /dev/urandom >"$MNT/after"
  sync
  sums_of "$MNT" >"$WORK/sums"
  umount "$MNT"
  "$UQ" del -n "$id"
  [[ ! -e $dev && ! -e /proc/$pid ]]
  echo "unmounted: del succeeded"
  qemu_img_check "$img"
  dev=$(add_device -f "$img")
  mount "$dev" "$MNT"
  (cd "$MNT" && sha256sum --quiet -c "$WORK/sums")
  umount "$MNT"
  "$UQ" del -n "$(dev_id "$dev")"
}
check "del of a mounted device: exit 1, one line naming --force, device untouched" mounted_refused

# A plain open (no mount): refused where the kernel can tell (SAFE_STOP_DEV), stopped
# before it, since an exclusive open does not see plain openers.
open_device() {
  local dev id rc=0
  dev=$(add_device -f "$img")
  id=$(dev_id "$dev")
  exec 9<"$dev"
  "$UQ" del -n "$id" 2>"$WORK/err" || rc=$?
  cat "$WORK/err"
  exec 9<&-
  if [[ $safe_stop == yes ]]; then
    ((rc == 1)) && grep -q 'in use' "$WORK/err" && [[ -b $dev ]]
    "$UQ" del -n "$id"
  else
    ((rc == 0))
  fi
  wait_gone "$dev" 10
  qemu_img_check "$img"
}
check "del of an open device: refused with SAFE_STOP_DEV ($safe_stop), stopped without" open_device

forced() {
  local dev id pid rc=0
  dev=$(add_device -f "$img")
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  mount "$dev" "$MNT"
  head -c 1M /dev/urandom >"$MNT/forced"
  sync
  "$UQ" del --force -n "$id"
  echo "del --force of the mounted $dev: exit 0"
  wait_gone "/proc/$pid" 10 && wait_gone "$dev" 10
  [[ ! -e /run/ublk-qcow2/$id.json ]]
  # The file system lost its disk: further writes fail, the unmount still works.
  if (echo x >"$MNT/late" && sync "$MNT/late") 2>/dev/null; then echo "a write after the stop succeeded"; fi
  umount -l "$MNT"
  rc=0
  qemu-img check "$img" || rc=$?
  echo "qemu-img check: status $rc (0 clean, 3 leaks only)"
  ((rc == 0 || rc == 3))
}
check "del --force of a mounted device: stopped, daemon gone, image consistent" forced

all_with_one_busy() {
  local idle busy rc=0
  "$UQ" check -r all "$img" >/dev/null
  qemu-img create -q -f qcow2 "$WORK/idle.qcow2" 64M
  busy=$(add_device -f "$img")
  idle=$(add_device -f "$WORK/idle.qcow2")
  mount "$busy" "$MNT"
  "$UQ" del --all 2>"$WORK/err" || rc=$?
  cat "$WORK/err"
  ((rc == 1)) && grep -q "ublk device $(dev_id "$busy") is in use" "$WORK/err"
  wait_gone "$idle" 10
  [[ -b $busy ]]
  echo "del --all: $idle removed, $busy (mounted) kept, exit 1"
  umount "$MNT"
  "$UQ" del --all
  wait_gone "$busy" 10
  qemu_img_check "$img"
}
check "del --all removes idle devices and refuses the mounted one" all_with_one_busy
check "no device, daemon or record left" no_leftovers
finish
