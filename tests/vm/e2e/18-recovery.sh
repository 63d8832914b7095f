#!/bin/bash
# The device outlives its daemon (user recovery, the default of `add`):
#  1. fio random 4k writes with crc32c verification (verify_fatal) on the raw device, two
#     queues, while the daemon is SIGKILLed and `recover -n ID` starts a new one, three
#     times: fio sees no error and verifies every block; `list` shows the device
#     awaiting recovery in between; a second `recover` while a daemon runs is a
#     one-line error; after del `qemu-img check` finds nothing (exit 0: each recovering
#     daemon frees the leaks of the killed one when it opens the image);
#  2. a mounted ext4 with a writer copying a tree of files, the daemon killed and
#     recovered three times: the writer sees no error, every file verifies after a
#     remount, e2fsck -fn is clean, the image is clean (no leak either);
#  3. `del` of a device waiting for recovery removes it;
#  4. --recovery=fail-io (kernels with USER_RECOVERY_FAIL_IO: 7.3): I/O fails promptly
#     while no daemon runs, the device stays, recover brings it back; elsewhere (6.12)
#     asking for it is a one-line error;
#  5. --recovery=off keeps the old behaviour: I/O fails promptly and the device goes.
source "$(dirname "$0")/lib.bash"

M=$((1024 * 1024))
img=$WORK/r.qcow2

fio_across_kills() {
  local dev id fio_pid rc k
  qemu-img create -q -f qcow2 "$img" 256M
  dev=$(add_device -f "$img" -q 2) || return 1
  id=$(dev_id "$dev")
  "$UQ" list --output=json | python3 -c '
import json, sys
d = {x["device"]: x for x in json.load(sys.stdin)}[sys.argv[1]]
assert d["recovery"] == "reissue", d
assert "USER_RECOVERY" in d["flags"] and "USER_RECOVERY_REISSUE" in d["flags"], d["flags"]
' "$dev"
  grep -q '"recovery":"reissue"' "/run/ublk-qcow2/$id.json"
  fio_verify_start "$dev" 48M
  for k in 1 2 3; do
    wait_writes "$id" 400 120 || { kill "$fio_pid"; return 1; }
    kill_and_recover "$id" "$dev" || { kill "$fio_pid"; return 1; }
    if ((k == 1)); then
      # A daemon is alive now: a second recover is refused, nothing changes.
      rc=0
      err=$("$UQ" recover -n "$id" 2>&1) || rc=$?
      echo "second recover: status $rc: $err"
      [[ $rc == 1 && $err == "ublk-qcow2: ublk device $id is live: its daemon (pid "*") is running" ]] || {
        kill "$fio_pid"
        return 1
      }
    fi
  done
  fio_verify_finish "$dev" 48M "the last recover" || return 1
  # Each recovering daemon freed what the killed one leaked (its cluster reserve) when it
  # opened the image, and del closes it cleanly: no leak, no corruption.
  grep "leak repair on open" "/run/ublk-qcow2/$id.log"
  (($(grep -c "leak repair on open: [1-9][0-9]* leaked clusters freed, 0 corruptions in" \
    "/run/ublk-qcow2/$id.log") == 3))
  "$UQ" del -n "$id"
  qemu-img check "$img"
}
check "fio crc32c verify across 3 SIGKILL + recover: no error, every block verifies, image clean" fio_across_kills
cleanup

ext4_across_kills() { ext4_writer_across "$img" 3 kill_and_recover; }
check "ext4 with a writer across 3 SIGKILL + recover: no error, files verify, e2fsck and image clean (no leak)" ext4_across_kills
cleanup  # whatever a failed check left, so that the next ones start clean

del_waiting() {
  local dev id pid
  qemu-img create -q -f qcow2 "$img" 64M
  dev=$(add_device -f "$img") || return 1
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none
  kill -KILL "$pid"
  wait_gone "/proc/$pid" 10
  for ((i = 0; i < 100; i++)); do
    "$UQ" list | grep -qE "^$id .* awaiting-recovery " && break
    sleep 0.1
  done
  "$UQ" list | grep -E "^$id .* awaiting-recovery "
  "$UQ" del -n "$id"
  [[ ! -e $dev && ! -e /dev/ublkc$id && ! -e /run/ublk-qcow2/$id.json ]]
  echo "del removed the device waiting for recovery"
  rc=0
  qemu-img check "$img" || rc=$?
  ((rc == 0 || rc == 3))
}
check "del of a device waiting for recovery" del_waiting

has_fail_io=0
kernel_has USER_RECOVERY_FAIL_IO && has_fail_io=1
if ((has_fail_io)); then
  fail_io() {
    local dev id pid rc t0
    qemu-img create -q -f qcow2 "$img" 64M
    dev=$(add_device -f "$img" --recovery=fail-io) || return 1
    id=$(dev_id "$dev")
    pid=$(daemon_pid "$id")
    head -c $((4 * M)) /dev/urandom >"$WORK/p"
    dd if="$WORK/p" of="$dev" bs=1M oflag=direct conv=fsync status=none
    kill -KILL "$pid"
    wait_gone "/proc/$pid" 10
    sleep 1
    t0=$SECONDS
    rc=0
    timeout 20 dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null || rc=$?
    echo "a read with no daemon: status $rc after $((SECONDS - t0)) s (124 = hung)"
    ((rc != 0 && rc != 124))
    [[ -b $dev ]]
    "$UQ" list | grep -E "^$id .* awaiting-recovery "
    "$UQ" recover -n "$id"
    cmp -n $((4 * M)) "$dev" "$WORK/p"
    echo "recovered: the data reads back"
    "$UQ" del -n "$id"
  }
  check "--recovery=fail-io: I/O fails promptly without a daemon, the device stays, recover" fail_io
else
  expect_error "--recovery=fail-io without USER_RECOVERY_FAIL_IO: one line, exit 1" 1 \
    "$UQ" add -f "$img" --recovery=fail-io
fi

recovery_off() {
  local dev id pid rc
  qemu-img create -q -f qcow2 "$img" 64M
  dev=$(add_device -f "$img" --recovery=off) || return 1
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  grep -q '"recovery":"off"' "/run/ublk-qcow2/$id.json"
  kill -KILL "$pid"
  rc=0
  timeout 20 dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null || rc=$?
  echo "a read after the kill: status $rc (124 = hung)"
  ((rc != 0 && rc != 124))
  wait_gone "$dev" 10
  "$UQ" list | grep -E "^$id +/dev/ublkb$id +dead "
  rc=0
  err=$("$UQ" recover -n "$id" 2>&1) || rc=$?
  echo "recover: status $rc: $err"
  [[ $rc == 1 && $err == "ublk-qcow2: ublk device $id was added without user recovery"* ]]
  "$UQ" del -n "$id"
  rc=0
  qemu-img check "$img" || rc=$?
  ((rc == 0 || rc == 3))
}
check "--recovery=off: I/O fails promptly and the device goes (the old behaviour)" recovery_off
expect_error "recover of a device that does not exist" 1 "$UQ" recover -n 77

# The cost of stable metadata on the device (one run each under TCG: a ratio, not a
# target): allocating 4k random writes at depth 32 on an empty image, with and without.
alloc_iops() {  # alloc_iops ADD_ARGS...: fio IOPS on a fresh empty image
  local dev
  rm -f "$WORK/b.qcow2"
  qemu-img create -q -f qcow2 "$WORK/b.qcow2" 4G
  dev=$(add_device -f "$WORK/b.qcow2" "$@") || return 1
  fio --name=a --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32 --rw=randwrite \
    --bs=4k --size=4G --time_based --runtime=8 --ramp_time=1 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
  "$UQ" del -n "$(dev_id "$dev")"
}
measure_cost() {
  local off on
  off=$(alloc_iops --recovery=off)
  on=$(alloc_iops --recovery=reissue)
  echo "allocating 4k randwrite QD32: recovery off $off IOPS, reissue $on IOPS, ratio $(python3 -c "print(round($on / $off, 2))")"
}
check "the cost of stable metadata (printed)" measure_cost
check "no device, daemon or record left" no_leftovers
finish
