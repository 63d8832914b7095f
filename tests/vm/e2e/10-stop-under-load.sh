#!/bin/bash
# Stopping a device that is busy: fio random writes (O_DIRECT, iodepth 32) run while
#  1. `del --force` stops the device: fio ends promptly (with I/O errors), del succeeds, the daemon
#     is gone, the image passes qemu-img check with no leak, and data written with
#     fsync before and during the load reads back intact through qemu-img;
#  2. the daemon is SIGKILLed: fio ends promptly (no hang), qemu-img check finds at most
#     leaked clusters, `ublk-qcow2 check -r all` repairs them, the fsync'ed data is still
#     there, `del` cleans up and the image can be served again.
source "$(dirname "$0")/lib.bash"

M=$((1024 * 1024))
img=$WORK/load.qcow2
qemu-img create -q -f qcow2 "$img" 256M
# Known data at fixed places, written with fsync (a FLUSH through the device).
for n in 1 2 3 4; do head -c $((4 * M)) /dev/urandom >"$WORK/pattern$n"; done
P1=$((200 * M)) P2=$((208 * M)) P3=$((216 * M)) P4=$((224 * M))

write_pattern() {  # write_pattern DEV N OFFSET
  dd if="$WORK/pattern$2" of="$1" bs=1M seek=$(($3 / M)) oflag=direct conv=fsync,notrunc status=none
}

# pattern_in_image N OFFSET: qemu-img's view of the image holds pattern N at OFFSET.
pattern_in_image() {
  # (No count=: qemu-img dd counts it from offset 0, skipped blocks included.)
  rm -f "$WORK/region"
  qemu-img dd -f qcow2 -O raw bs=1M skip=$(($2 / M)) if="$img" of="$WORK/region" 2>&1
  cmp -n $((4 * M)) "$WORK/region" "$WORK/pattern$1"
  echo "pattern $1 at $(($2 / M)) MiB intact (qemu-img dd)"
}

# The load: random 4k writes over the first 128 MiB, for far longer than the test waits.
start_load() {  # start_load DEV LOG; sets load_pid
  fio --name=load --filename="$1" --direct=1 --ioengine=io_uring --iodepth=32 \
    --rw=randwrite --bs=4k --offset=0 --size=128M --time_based --runtime=120 \
    --output-format=normal >"$2" 2>&1 &
  load_pid=$!
}

# ends_within PID SECONDS: the child PID exits within SECONDS (else it is killed).
# Sets child_status. A zombie counts as exited (kill -0 would still see it).
ends_within() {
  local i state
  for ((i = 0; i < $2 * 10; i++)); do
    state=
    read -r _ _ state _ 2>/dev/null <"/proc/$1/stat" || true
    [[ -z $state || $state == Z ]] && break
    sleep 0.1
  done
  if [[ -n $state && $state != Z ]]; then
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null || true
    echo "pid $1 still running ${2} s later (killed)"
    return 1
  fi
  child_status=0
  wait "$1" || child_status=$?
  return 0
}

del_under_load() {
  local dev id pid t0 rc
  dev=$(add_device -f "$img" -d 64)
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  write_pattern "$dev" 1 $P1
  start_load "$dev" "$WORK/del.fio"
  wait_writes "$id" 500 60
  # Data flushed while the load runs.
  write_pattern "$dev" 2 $P2
  wait_writes "$id" 200 30
  echo "$dev under load ($(writes_done "$id") writes done); del --force -n $id"
  t0=$SECONDS
  rc=0
  "$UQ" del --force -n "$id" || rc=$?
  echo "del exited $rc after $((SECONDS - t0)) s"
  ends_within "$load_pid" 20
  echo "fio ended $((SECONDS - t0)) s after del began, status $child_status:"
  grep -m2 -iE 'error|err=' "$WORK/del.fio" | sed 's/^/  /' || true
  ((rc == 0))
  wait_gone "/proc/$pid" 5 || { echo "daemon $pid still running"; return 1; }
  [[ ! -e $dev && ! -e /dev/ublkc$id && ! -e /run/ublk-qcow2/$id.json ]]
  grep -q 'image closed cleanly' "/run/ublk-qcow2/$id.log"
  echo "daemon gone, device and record removed, image closed cleanly"
  qemu_img_check "$img"
  pattern_in_image 1 $P1
  pattern_in_image 2 $P2
}
check "del under fio load: fio ends promptly, daemon gone, image clean, fsync'ed data intact" del_under_load

sigkill_under_load() {
  local dev id pid t0 rc
  dev=$(add_device -f "$img" -d 64 --recovery=off)  # the kernel removes the device
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  write_pattern "$dev" 3 $P3
  start_load "$dev" "$WORK/kill.fio"
  wait_writes "$id" 500 60
  write_pattern "$dev" 4 $P4
  wait_writes "$id" 200 30
  echo "$dev under load ($(writes_done "$id") writes done); SIGKILL daemon $pid"
  t0=$SECONDS
  kill -KILL "$pid"
  ends_within "$load_pid" 20
  echo "fio ended $((SECONDS - t0)) s after SIGKILL, status $child_status:"
  grep -m2 -iE 'error|err=' "$WORK/kill.fio" | sed 's/^/  /' || true
  ((child_status != 0))
  # Any further I/O fails at once too (the device is dead or already removed).
  rc=0
  timeout 20 dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null || rc=$?
  echo "a read after the kill: status $rc (124 = hung)"
  ((rc != 0 && rc != 124))
  wait_gone "/proc/$pid" 10
  wait_gone "$dev" 10
  echo "daemon and $dev gone"
  "$UQ" list | grep -E "^$id +/dev/ublkb$id +dead "
  # Killed mid-flight: leaked clusters are allowed, corruption is not.
  rc=0
  qemu-img check "$img" || rc=$?
  echo "qemu-img check after SIGKILL: status $rc (0 clean, 3 leaks only)"
  ((rc == 0 || rc == 3))
  "$UQ" check -r all "$img"
  qemu_img_check "$img"
  echo "clean after ublk-qcow2 check -r all"
  for n in 1 2 3 4; do
    case $n in 1) off=$P1 ;; 2) off=$P2 ;; 3) off=$P3 ;; 4) off=$P4 ;; esac
    pattern_in_image $n $off
  done
  "$UQ" del -n "$id"
  [[ ! -e /dev/ublkc$id && ! -e /run/ublk-qcow2/$id.json ]]
  echo "del -n $id removed the dead device"
}
check "SIGKILL under fio load: I/O fails promptly, at most leaks, repaired, fsync'ed data intact" sigkill_under_load

again() {
  local dev
  dev=$(add_device -f "$img")
  dd if="$dev" of="$WORK/region" bs=1M skip=$((P4 / M)) count=4 iflag=direct status=none
  cmp "$WORK/region" "$WORK/pattern4"
  write_pattern "$dev" 1 $((100 * M))
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img"
  pattern_in_image 1 $((100 * M))
}
check "the image is served again: data reads back, a new write lands, image clean" again
check "no device, daemon or record left" no_leftovers
finish
