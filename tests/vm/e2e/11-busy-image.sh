#!/bin/bash
# QEMU's image locks, both ways: an image that qemu-io holds open cannot be served (one
# error line naming the lock, exit 1, nothing left behind), and an image we serve cannot
# be opened by qemu-img info or written by qemu-io; a base opened read-only through an
# overlay can still be read by qemu-img info, but not written.
source "$(dirname "$0")/lib.bash"

img=$WORK/busy.qcow2
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -P 0x5a 0 1M' "$img" >/dev/null

# hold IMAGE: starts a qemu-io that keeps IMAGE open read-write (for up to 300 s) and
# returns once QEMU's locks are taken. Its pid goes to a file: check runs its command in
# a subshell, whose variables die with it.
# The locks are looked for in /proc/locks (QEMU takes OFD locks on the file), not by
# running qemu-img info: that takes a lock of its own while it runs, and a qemu-io that
# opens the image meanwhile fails and exits (one suite run in ~10 lost a minute that way
# under TCG, then failed). A qemu-io that exits anyway is reported with its stderr and
# started again, up to 3 times.
alive() {  # PID: running (not gone, not a zombie)
  local state=
  read -r _ _ state _ 2>/dev/null <"/proc/$1/stat" || true
  [[ -n $state && $state != Z ]]
}
locked() {  # IMAGE: some process holds an OFD lock on it
  local inode
  inode=$(stat -c %i "$1")
  grep -qE "OFDLCK .*:$inode " /proc/locks
}
hold() {
  local attempt i pid
  for ((attempt = 1; attempt <= 3; attempt++)); do
    qemu-io -f qcow2 -c 'sleep 300000' "$1" >/dev/null 2>"$WORK/holder.err" &
    pid=$!
    echo "$pid" >"$WORK/holder.pid"
    for ((i = 0; i < 600; i++)); do
      if locked "$1"; then
        # And QEMU's tools see them.
        qemu-img info "$1" >/dev/null 2>&1 && { echo "locked, yet qemu-img info opens it"; return 1; }
        return 0
      fi
      alive "$pid" || break
      sleep 0.1
    done
    echo "attempt $attempt: qemu-io $pid $(alive "$pid" && echo "still running without a lock" ||
      echo exited); its stderr: $(tr '\n' ' ' <"$WORK/holder.err")"
    kill "$pid" 2>/dev/null || true
  done
  return 1
}

release() {  # ends the qemu-io started by hold, waits until it is gone
  local pid i state
  [[ -s $WORK/holder.pid ]] || return 0
  pid=$(<"$WORK/holder.pid")
  rm -f "$WORK/holder.pid"
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    state=
    read -r _ _ state _ 2>/dev/null <"/proc/$pid/stat" || true
    [[ -z $state || $state == Z ]] && return 0
    sleep 0.1
  done
  echo "qemu-io $pid did not exit"
  return 1
}

before=$(count_block_devices)
check "qemu-io holds the image open (qemu-img info fails)" hold "$img" || finish
expect_error "add: image held by qemu-io -> exit 1, one line" 1 "$UQ" add -f "$img"
expect_error "add --read-only: image held by qemu-io -> exit 1, one line" 1 "$UQ" add --read-only -f "$img"

message() {
  local out
  out=$("$UQ" add -f "$img" 2>&1 || true)
  echo "$out"
  grep -qiE 'lock|in use' <<<"$out"
  grep -qF "$img" <<<"$out"
}
check "the error names the image and the lock / that it is in use" message

nothing_left() {
  echo "block devices before: $before, now: $(count_block_devices)"
  (($(count_block_devices) == before))
  no_leftovers
}
check "no device, daemon or record left after the refused adds" nothing_left
release

# (The device is added here, not inside a check: check runs its command in a subshell.)
dev=$(add_device -f "$img")
served() {
  echo "after qemu-io exited: served as $dev"
  [[ -b $dev ]]
  qemu-io -f raw -t none -r -c 'read -P 0x5a 0 1M' "$dev" | grep -q '^read '
}
check "once qemu-io has exited, add works" served || finish

qemu_refused() {
  local out rc
  rc=0
  out=$(qemu-img info "$img" 2>&1) || rc=$?
  echo "qemu-img info: status $rc: $out"
  ((rc != 0))
  grep -qi 'lock' <<<"$out"
  rc=0
  out=$(qemu-io -f qcow2 -c 'write -P 0xcd 0 512' "$img" 2>&1) || rc=$?
  echo "qemu-io write: status $rc: $out"
  ((rc != 0))
  grep -qi 'lock' <<<"$out"
  ! grep -q '^wrote ' <<<"$out"
  # The image was not touched: the device still reads the old data.
  qemu-io -f raw -t none -r -c 'read -P 0x5a 0 1M' "$dev" | grep -q '^read '
  # -U (force share) may still read the header.
  qemu-img info -U "$img" | grep -q 'file format: qcow2'
}
check "while served: qemu-img info and qemu-io write fail on the lock; image untouched" qemu_refused

after_del() {
  "$UQ" del -n "$(dev_id "$dev")"
  qemu-img info "$img" >/dev/null
  qemu_img_check "$img"
}
check "after del: qemu-img opens the image again; check clean" after_del

# A backing file is opened read-only: readers may share it, writers may not.
base_shared() {
  local overlay=$WORK/overlay.qcow2 out rc
  local dev
  qemu-img create -q -f qcow2 -b "$img" -F qcow2 "$overlay"
  dev=$(add_device -f "$overlay")
  qemu-img info "$img" >/dev/null
  echo "qemu-img info of the base works while the overlay is served"
  rc=0
  out=$(qemu-io -f qcow2 -c 'write -P 0xcd 0 512' "$img" 2>&1) || rc=$?
  echo "qemu-io write to the base: status $rc: $out"
  ((rc != 0))
  grep -qi 'lock' <<<"$out"
  rc=0
  out=$(qemu-img info "$overlay" 2>&1) || rc=$?
  echo "qemu-img info of the overlay: status $rc"
  ((rc != 0))
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$overlay"
  qemu-io -f qcow2 -r -c 'read -P 0x5a 0 1M' "$img" | grep -q '^read '
}
check "a served overlay's base: qemu-img info works, qemu-io write fails" base_shared

# The other way round with a base: qemu-io writing the base blocks serving an overlay.
base_held() {
  local overlay=$WORK/overlay.qcow2 out rc
  hold "$img"
  rc=0
  out=$("$UQ" add -f "$overlay" 2>&1) || rc=$?
  release
  echo "add of the overlay while its base is held: status $rc: $out"
  ((rc == 1))
  grep -qiE 'lock|in use' <<<"$out"
  no_leftovers
}
check "add of an overlay whose base qemu-io holds for writing fails cleanly" base_held
release  # in case a check failed while qemu-io held the image
check "no device, daemon or record left" no_leftovers
finish
