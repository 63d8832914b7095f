#!/bin/bash
# The systemd unit's wrappers (systemd/unit-start, unit-stop) with the real binary, as
# systemd would run them (the VM does not run systemd): unit-start adds the device and
# becomes its daemon (exec: same pid); after a SIGKILL of that daemon a second unit-start
# finds the device awaiting recovery and recovers it, the data written before intact;
# a third unit-start while it runs refuses; unit-stop with $MAINPID unset (a crash)
# leaves the device, with $MAINPID set deletes it (no error logged, the image clean).
source "$(dirname "$0")/lib.bash"

img=$WORK/u.qcow2
qemu-img create -q -f qcow2 "$img" 64M
export UBLK_QCOW2=$UQ IMAGE=$img OPTIONS="--queues=1 --cache=writeback"
id=4
dev=/dev/ublkb$id

wait_live() {  # wait_live PID: until list shows device $id live, served by PID
  local i
  for ((i = 0; i < 300; i++)); do
    "$UQ" list | grep -qE "^$id +$dev +live +[0-9]+ +[0-9]+ +$1 " && return 0
    kill -0 "$1" 2>/dev/null || { echo "unit-start (pid $1) ended"; return 1; }
    sleep 0.1
  done
  "$UQ" list
  return 1
}

# The checks run in subshells: the daemons' pids are kept in files. A daemon's output
# goes to files, so that no check waits for it to close a pipe.
start_adds() {
  systemd/unit-start "$id" >"$WORK/start1.out" 2>"$WORK/start1.err" &
  local pid1=$!
  echo "$pid1" >"$WORK/pid1"
  wait_live "$pid1" || return 1
  cat "$WORK/start1.err"
  grep -q "adding device $id" "$WORK/start1.err"
  [[ $(daemon_pid "$id") == "$pid1" ]] || { echo "record pid $(daemon_pid "$id"), want $pid1"; return 1; }
  head -c $((4 * 1024 * 1024)) /dev/urandom >"$WORK/data"
  dd if="$WORK/data" of="$dev" bs=1M oflag=direct conv=fsync status=none
}
check "unit-start with no device: adds it and is its daemon (same pid)" start_adds

stop_after_crash() {
  local pid1
  pid1=$(cat "$WORK/pid1")
  kill -KILL "$pid1"
  wait_gone "/proc/$pid1" 10 || { echo "daemon $pid1 still there"; return 1; }
  env -u MAINPID systemd/unit-stop "$id"
  [[ -b $dev ]] || { echo "$dev went away"; return 1; }
  for ((i = 0; i < 100; i++)); do
    "$UQ" list | grep -qE "^$id +$dev +awaiting-recovery " && return 0
    sleep 0.1
  done
  "$UQ" list
  return 1
}
check "daemon killed: unit-stop without MAINPID leaves the device awaiting recovery" stop_after_crash

start_recovers() {
  systemd/unit-start "$id" >"$WORK/start2.out" 2>"$WORK/start2.err" &
  local pid2=$!
  echo "$pid2" >"$WORK/pid2"
  wait_live "$pid2" || return 1
  cat "$WORK/start2.err"
  grep -q "recover" "$WORK/start2.err"
  dd if="$dev" bs=1M count=4 iflag=direct status=none | cmp - "$WORK/data"
}
check "unit-start again: recovers the device, data intact" start_recovers

refuses() {
  local err rc=0
  err=$(systemd/unit-start "$id" 2>&1) || rc=$?
  echo "$err"
  ((rc == 1)) && [[ $(grep -c '' <<<"$err") == 1 ]] && grep -q "already served" <<<"$err"
}
check "unit-start while a daemon serves it: one line, exit 1" refuses

stop_deletes() {
  local pid2
  pid2=$(cat "$WORK/pid2")
  MAINPID=$pid2 systemd/unit-stop "$id" || return 1
  wait_gone "/proc/$pid2" 10 || { echo "daemon $pid2 still there"; return 1; }
  # A foreground daemon's status is its exit code, which is not ours to wait for here;
  # del succeeds only if the daemon exited within its time, and the image must be clean.
  if grep -i "error\|fail" "$WORK/start2.err"; then return 1; fi
  [[ ! -e $dev ]] && no_leftovers || return 1
  # The killed daemon's unused cluster reserve leaked; the recovering daemon freed it
  # when it opened the image, and closed it cleanly: no leak, no corruption.
  grep "leak repair on open" "$WORK/start2.err"
  qemu-img check "$img"
}
check "unit-stop with MAINPID: del, the daemon ends, nothing left, image clean (no leak)" stop_deletes

finish
