#!/bin/bash
# `add` does not wait for ever: a daemon that has not reported the device live within
# --timeout seconds (default 30) is killed and the device it added removed, so add exits
# 1 with one error line and leaves nothing behind (no device, record, daemon). The daemon
# is made to hang by a test hook (UBLK_QCOW2_TEST_HANG_AFTER=<setup step>, honoured only
# when set): before START_DEV (after the queues fetched their tags), before ADD_DEV (no
# device yet), with an explicit id and without recovery. Then a foreground add under a
# service manager's $NOTIFY_SOCKET says READY=1 once the device is live.
source "$(dirname "$0")/lib.bash"

img=$WORK/t.qcow2
qemu-img create -q -f qcow2 "$img" 64M

# hang_case NAME STEP ADD_ARGS...: add with the daemon hanging after STEP, --timeout 3.
hang_case() {
  local step=$1 t0 t1 rc err lines
  shift
  t0=$(date +%s%N)
  rc=0
  err=$(UBLK_QCOW2_TEST_HANG_AFTER=$step "$UQ" add --timeout 3 -f "$img" "$@" 2>&1 >/dev/null) ||
    rc=$?
  t1=$(date +%s%N)
  lines=$(printf '%s' "$err" | grep -c '')
  echo "add exited $rc after $(((t1 - t0) / 1000000)) ms: $err"
  ((rc == 1)) || return 1
  ((lines == 1)) || { echo "$lines error lines"; return 1; }
  [[ $err == "ublk-qcow2: $img: the daemon did not report the device live within 3 s"* ]] || return 1
  # 3 s, then the kill and the removal: well under the default 30 s.
  (((t1 - t0) / 1000000 < 20000)) || { echo "took too long"; return 1; }
  local listed
  listed=$("$UQ" list)
  [[ -z $listed ]] || { echo "list is not empty: $listed"; return 1; }
  no_leftovers
}

before_start() {
  hang_case start_queues || return 1
  # The message says the device went.
  local err
  err=$(UBLK_QCOW2_TEST_HANG_AFTER=start_queues "$UQ" add --timeout 2 -f "$img" 2>&1) || true
  grep -E 'it was killed and ublk device [0-9]+ removed$' <<<"$err"
}
check "hang before START_DEV: add exits 1 within the bound, one line, nothing left" before_start
check "hang before ADD_DEV: add exits 1, one line, no device was made" hang_case open_image
check "hang with -n 7 and --recovery=off: device 7 removed" hang_case start_queues -n 7 --recovery=off
check "the image is untouched by the abandoned daemons" qemu_img_check "$img"

# The bound does not get in the way of a normal add, and the device works.
normal() {
  local dev
  dev=$("$UQ" add --timeout 30 -f "$img") || return 1
  dd if=/dev/urandom of="$dev" bs=64k count=4 oflag=direct status=none
  "$UQ" del -n "$(dev_id "$dev")"
  no_leftovers
}
check "a normal add with --timeout works" normal
expect_error "add --timeout 0 -> usage, exit 2" 2 "$UQ" add --timeout 0 -f "$img"

# add --foreground under a service manager (systemd's Type=notify): READY=1 arrives on
# $NOTIFY_SOCKET once the device exists, and not before.
notify_ready() {
  local sock=$WORK/notify.sock got pid
  rm -f "$sock"
  python3 - "$sock" >"$WORK/notified" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(60)
msg = s.recv(256).decode()
import os
print(msg, os.path.exists("/dev/ublkb9"))
PY
  local listener=$!
  for ((i = 0; i < 50; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
  NOTIFY_SOCKET=$sock "$UQ" add --foreground -n 9 -f "$img" >"$WORK/fg.out" 2>"$WORK/fg.err" &
  pid=$!
  wait "$listener" || { echo "no notification"; kill "$pid"; return 1; }
  got=$(cat "$WORK/notified")
  echo "notification: $got"
  [[ $got == "READY=1 True" ]] || { kill "$pid"; return 1; }
  "$UQ" list | grep -E "^9 +/dev/ublkb9 +live " || { kill "$pid"; return 1; }
  kill -TERM "$pid"
  wait "$pid"
  no_leftovers
}
check "add --foreground sends READY=1 to \$NOTIFY_SOCKET once the device is live" notify_ready

finish
