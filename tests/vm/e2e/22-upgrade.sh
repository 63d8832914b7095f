#!/bin/bash
# `upgrade -n ID`: a live device handed to a new daemon without failing any I/O.
# Where the kernel offers UBLK_F_QUIESCE (GET_FEATURES; the 7.3 VM kernel, where add's
# default device also has zero copy):
#  1. fio random 4k writes with crc32c verification (verify_fatal) on the raw device, two
#     queues, across three upgrades: fio sees no error and verifies every block, the
#     daemon pid changes each time (the old one gone), every handover within 60 s and
#     without the CLI killing the old daemon, `list` shows the device live, the
#     old daemon logged that it closed the image cleanly; after del `qemu-img check`
#     finds nothing (exit 0, no leak: every handover closed the image cleanly);
#     1z. the same on a --zero-copy=on device, 96 MiB of writes across six upgrades, every
#     daemon serving with zero copy;
#  2. a mounted ext4 with a writer copying trees across two upgrades: no error, the
#     files verify after a remount, e2fsck -fn clean, the image clean;
#  3. an idle --recovery=fail-io device is upgraded too (I/O sent during the handover
#     would fail: fail-io's meaning); and one under I/O: a writer of 64 KiB chunks, each
#     synced, across the upgrade: writes may fail during the handover, but every chunk
#     whose write succeeded reads back, the writer goes on through the new daemon, and
#     the image is clean;
#  4. refusals, one line, exit 1, nothing changed: a device added with --recovery=off,
#     an unknown id, a device whose daemon is gone (recover is what it needs).
# Elsewhere (6.12): upgrade is one line naming UBLK_F_QUIESCE, exit 1, and the device
# keeps working with the same daemon.
source "$(dirname "$0")/lib.bash"

M=$((1024 * 1024))
img=$WORK/u.qcow2

has_quiesce=$("$UQ" features --output=json | python3 -c 'import json,sys; print(int("QUIESCE" in json.load(sys.stdin)["features"]))')

# upgrade_once ID DEV: upgrade, see the new daemon serve the live device.
upgrade_once() {
  local id=$1 dev=$2 pid new out t0 ms
  pid=$(daemon_pid "$id")
  [[ -n $pid && -d /proc/$pid ]] || { echo "no daemon before ($pid)"; return 1; }
  t0=$(date +%s%N)
  out=$("$UQ" upgrade -n "$id") || { echo "upgrade failed: $out"; return 1; }
  ms=$((($(date +%s%N) - t0) / 1000000))
  [[ $out == "$dev" ]] || { echo "upgrade printed '$out'"; return 1; }
  new=$(daemon_pid "$id")
  [[ -n $new && $new != "$pid" && -d /proc/$new ]] || { echo "no new daemon ($new)"; return 1; }
  [[ ! -d /proc/$pid ]] || { echo "old daemon $pid still there"; return 1; }
  "$UQ" list | grep -E "^$id +$dev +live " >/dev/null || { "$UQ" list; return 1; }
  echo "daemon $pid handed $dev over to daemon $new in $ms ms"
}

# upgrade_bounded ID DEV SECONDS: upgrade_once, which must finish within SECONDS and
# without the CLI killing the old daemon. If the old daemon is still there after
# SECONDS/2, its threads' kernel stacks go to the output (what it waits for).
upgrade_bounded() {
  local id=$1 dev=$2 limit=$3 pid watcher rc=0 t0 s
  pid=$(daemon_pid "$id")
  (
    sleep $((limit / 2)) </dev/null >/dev/null 2>&1  # holds no pipe of check's
    if [[ -d /proc/$pid ]]; then
      echo "old daemon $pid still there after $((limit / 2)) s; its threads:"
      for t in /proc/"$pid"/task/*; do
        echo "-- $(cat "$t/comm" 2>/dev/null) $(cat "$t/wchan" 2>/dev/null)"
        cat "$t/stack" 2>/dev/null
      done
      tail -5 "/run/ublk-qcow2/$id.log"
    fi
  ) &
  watcher=$!
  t0=$SECONDS
  upgrade_once "$id" "$dev" 2>"$WORK/upgrade.err" || rc=$?
  s=$((SECONDS - t0))
  kill "$watcher" 2>/dev/null || true
  wait "$watcher" 2>/dev/null || true
  cat "$WORK/upgrade.err"
  ((rc == 0)) || return 1
  ! grep -q "was killed" "$WORK/upgrade.err" || return 1
  ((s <= limit)) || { echo "upgrade took $s s (limit $limit)"; return 1; }
}

if ((has_quiesce)); then
  fio_across_upgrades() {
    local dev id fio_pid rc k
    qemu-img create -q -f qcow2 "$img" 256M
    dev=$(add_device -f "$img" -q 2) || return 1
    id=$(dev_id "$dev")
    "$UQ" list --output=json | python3 -c '
import json, sys
d = {x["device"]: x for x in json.load(sys.stdin)}[sys.argv[1]]
assert "QUIESCE" in d["flags"] and "USER_RECOVERY_REISSUE" in d["flags"], d["flags"]
' "$dev"
    fio_verify_start "$dev" 48M
    for k in 1 2 3; do
      wait_writes "$id" 400 120 || { kill "$fio_pid"; return 1; }
      upgrade_bounded "$id" "$dev" 60 || { kill "$fio_pid"; return 1; }
    done
    fio_verify_finish "$dev" 48M "the last upgrade" || return 1
    grep -E "quiesced in|handed over|leak repair" "/run/ublk-qcow2/$id.log"
    (($(grep -c "handed over to a new daemon; image closed cleanly" "/run/ublk-qcow2/$id.log") == 3))
    # Each new daemon found nothing to repair: the old one closed the image cleanly.
    (($(grep -c "leak repair on open: 0 leaked clusters freed, 0 corruptions in" \
      "/run/ublk-qcow2/$id.log") == 3))
    "$UQ" del -n "$id"
    qemu-img check "$img"
  }
  check "fio crc32c verify across 3 upgrades: no error, new daemon each time, image clean (no leak)" fio_across_upgrades
  cleanup

  # zc_across_upgrades: case 1 on a device added with --zero-copy=on (AUTO_BUF_REG +
  # USER_COPY), across UQ_ZC_UPGRADES (default 6) upgrades: every handover must be clean
  # (the old daemon closes the image and exits by itself, not killed by the CLI after
  # 120 s as on 7.3 before the queues stopped waiting for fetches QUIESCE_DEV does not
  # abort: that hang came at the 4th upgrade of this workload) and take at most 60 s; the
  # new daemon serves with zero copy too.
  zc_across_upgrades() {
    local dev id fio_pid rc k log n=${UQ_ZC_UPGRADES:-6}
    qemu-img create -q -f qcow2 "$img" 256M
    dev=$(add_device -f "$img" -q 2 --zero-copy=on) || return 1
    id=$(dev_id "$dev")
    log=/run/ublk-qcow2/$id.log
    "$UQ" list --output=json | python3 -c '
import json, sys
d = {x["device"]: x for x in json.load(sys.stdin)}[sys.argv[1]]
assert "AUTO_BUF_REG" in d["flags"] and "USER_COPY" in d["flags"], d["flags"]
assert "QUIESCE" in d["flags"], d["flags"]
' "$dev"
    fio_verify_start "$dev" 96M
    for ((k = 1; k <= n; k++)); do
      wait_writes "$id" 400 120 || { kill "$fio_pid"; return 1; }
      upgrade_bounded "$id" "$dev" 60 || { kill "$fio_pid"; return 1; }
    done
    fio_verify_finish "$dev" 96M "the last upgrade" || return 1
    grep -E "quiesced in|handed over|served" "$log"
    (($(grep -c "handed over to a new daemon; image closed cleanly" "$log") == n))
    (($(grep -c "leak repair on open: 0 leaked clusters freed, 0 corruptions in" "$log") == n))
    (($(grep -c "recovered, serving .*zero copy: on" "$log") == n))
    "$UQ" del -n "$id"
    # Every daemon served requests with zero copy (the counts of the n + 1 'served' lines).
    (($(grep 'served queue' "$log" | grep -cE 'with zero copy: [0-9]*[1-9]') == n + 1))
    echo "fetches QUIESCE_DEV did not abort, per handover and queue (were waited for before):"
    grep -oE 'queue [0-9]+: [^)]*fetches not aborted' "$log" || echo "none this run"
    qemu-img check "$img"
  }
  if "$UQ" features --output=json | python3 -c '
import json, sys
f = json.load(sys.stdin)["features"]
sys.exit(0 if "AUTO_BUF_REG" in f and "USER_COPY" in f else 1)'; then
    check "zero copy (--zero-copy=on): fio crc32c verify across 6 upgrades, each handover clean within 60 s" zc_across_upgrades
    cleanup
  fi

  ext4_across_upgrades() { ext4_writer_across "$img" 2 upgrade_once; }
  check "mounted ext4 with a writer across 2 upgrades: no error, files verify, e2fsck and image clean" ext4_across_upgrades
  cleanup

  fail_io_upgrade() {
    local dev id
    qemu-img create -q -f qcow2 "$img" 64M
    dev=$(add_device -f "$img" --recovery=fail-io) || return 1
    id=$(dev_id "$dev")
    dd if=/dev/urandom of="$WORK/p" bs=1M count=4 status=none
    dd if="$WORK/p" of="$dev" bs=1M oflag=direct conv=fsync status=none
    upgrade_once "$id" "$dev"
    "$UQ" list --output=json | python3 -c '
import json, sys
d = {x["device"]: x for x in json.load(sys.stdin)}[sys.argv[1]]
assert d["recovery"] == "fail-io", d
' "$dev"
    cmp -n $((4 * M)) "$dev" "$WORK/p"
    dd if="$WORK/p" of="$dev" bs=1M seek=8 oflag=direct conv=fsync status=none
    echo "the data reads back, the device takes writes"
    "$UQ" del -n "$id"
    qemu-img check "$img"
  }
  check "upgrade of a --recovery=fail-io device (idle): new daemon, data intact, image clean" fail_io_upgrade

  fail_io_upgrade_under_io() {
    local dev id writer ok failed
    qemu-img create -q -f qcow2 "$img" 128M
    dev=$(add_device -f "$img" --recovery=fail-io) || return 1
    id=$(dev_id "$dev")
    dd if=/dev/urandom of="$WORK/p" bs=1M count=64 status=none
    # Chunk i (64 KiB of the pattern at offset i * 64 KiB) written once, synced; its
    # result logged.
    rm -f "$WORK/stop"
    (
      i=0
      while [[ ! -e $WORK/stop ]] && ((i < 1024)); do
        if dd if="$WORK/p" of="$dev" bs=64k skip=$i seek=$i count=1 oflag=direct \
          conv=fsync,notrunc status=none 2>/dev/null; then
          echo "$i ok"
        else
          echo "$i failed"
        fi
        i=$((i + 1))
      done
    ) >"$WORK/chunks" &
    writer=$!
    wait_writes "$id" 40 120 || { kill "$writer"; return 1; }
    upgrade_once "$id" "$dev" || { kill "$writer"; return 1; }
    wait_writes "$id" 40 120 || { kill "$writer"; return 1; }  # through the new daemon
    touch "$WORK/stop"
    wait "$writer"
    ok=$(grep -c ' ok$' "$WORK/chunks")
    failed=$(grep -c ' failed$' "$WORK/chunks" || true)
    echo "$ok chunks written, $failed failed (sent during the handover)"
    ((ok >= 30))
    dd if="$dev" of="$WORK/back" bs=1M count=64 iflag=direct status=none
    python3 - "$WORK/chunks" "$WORK/p" "$WORK/back" <<'PY'
import sys
want, got = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
for line in open(sys.argv[1]):
    i, status = line.split()
    at = int(i) * 65536
    if status == "ok" and got[at:at + 65536] != want[at:at + 65536]:
        sys.exit("chunk %s was acknowledged but reads back different" % i)
print("every acknowledged chunk reads back")
PY
    "$UQ" del -n "$id"
    qemu-img check "$img"
  }
  check "upgrade of a --recovery=fail-io device under writes: acknowledged writes read back, writes go on, image clean" fail_io_upgrade_under_io
  cleanup

  refuse_recovery_off() {
    local dev id pid rc err
    qemu-img create -q -f qcow2 "$img" 64M
    dev=$(add_device -f "$img" --recovery=off) || return 1
    id=$(dev_id "$dev")
    pid=$(daemon_pid "$id")
    rc=0
    err=$("$UQ" upgrade -n "$id" 2>&1) || rc=$?
    echo "upgrade: status $rc: $err"
    [[ $rc == 1 && $err == "ublk-qcow2: ublk device $id was added without user recovery (--recovery=off)"* ]]
    [[ $(daemon_pid "$id") == "$pid" && -d /proc/$pid ]]
    dd if=/dev/urandom of="$WORK/p" bs=1M count=2 status=none
    dd if="$WORK/p" of="$dev" bs=1M oflag=direct conv=fsync status=none
    cmp -n $((2 * M)) "$dev" "$WORK/p"
    echo "the device still works with daemon $pid"
    "$UQ" del -n "$id"
    qemu-img check "$img"
  }
  check "upgrade of a --recovery=off device: one line, exit 1, nothing changed" refuse_recovery_off

  refuse_no_daemon() {
    local dev id pid rc err
    qemu-img create -q -f qcow2 "$img" 64M
    dev=$(add_device -f "$img") || return 1
    id=$(dev_id "$dev")
    pid=$(daemon_pid "$id")
    kill -KILL "$pid"
    wait_gone "/proc/$pid" 10
    rc=0
    err=$("$UQ" upgrade -n "$id" 2>&1) || rc=$?
    echo "upgrade: status $rc: $err"
    [[ $rc == 1 && $err == "ublk-qcow2: ublk device $id is "*"has no running daemon: use recover -n $id" ]]
    "$UQ" recover -n "$id"
    "$UQ" del -n "$id"
    qemu-img check "$img"
  }
  check "upgrade of a device whose daemon died: one line naming recover, exit 1" refuse_no_daemon
else
  no_quiesce() {
    local dev id pid rc err
    qemu-img create -q -f qcow2 "$img" 64M
    dev=$(add_device -f "$img") || return 1
    id=$(dev_id "$dev")
    pid=$(daemon_pid "$id")
    dd if=/dev/urandom of="$WORK/p" bs=1M count=2 status=none
    dd if="$WORK/p" of="$dev" bs=1M oflag=direct conv=fsync status=none
    rc=0
    err=$("$UQ" upgrade -n "$id" 2>&1) || rc=$?
    echo "upgrade: status $rc: $err"
    [[ $rc == 1 && $(grep -c '' <<<"$err") == 1 && $err == "ublk-qcow2: "*"UBLK_F_QUIESCE (Linux 6.16+)"* ]]
    [[ $(daemon_pid "$id") == "$pid" && -d /proc/$pid ]]
    "$UQ" list | grep -E "^$id +$dev +live "
    cmp -n $((2 * M)) "$dev" "$WORK/p"
    dd if=/dev/urandom of="$WORK/q" bs=1M count=2 status=none
    dd if="$WORK/q" of="$dev" bs=1M seek=4 oflag=direct conv=fsync status=none
    cmp -n $((2 * M)) -i 0:$((4 * M)) "$WORK/q" "$dev"
    echo "the device keeps working with daemon $pid"
    "$UQ" del -n "$id"
    qemu-img check "$img"
  }
  check "without UBLK_F_QUIESCE (6.12): one line naming it, exit 1, the device keeps working" no_quiesce
fi
expect_error "upgrade of a device that does not exist" 1 "$UQ" upgrade -n 77
check "no device, daemon or record left" no_leftovers
finish
