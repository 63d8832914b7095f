# Shared helpers for the VM end-to-end tests (tests/vm/e2e/NN-name.sh).
# Sourced, not run: `source "$(dirname "$0")/lib.bash"`.
#
# Each test runs as root inside the VM rig (tests/vm/run), from the repository root,
# prints one `ok`/`FAIL` line per check and exits non-zero if any check failed. Images
# go under /scratch/<test name>/. A missing tool or kernel feature is a failure, not a
# skip.
#
# The binary: $UBLK_QCOW2_BIN (tests/vm/run-suite sets it to a copy of the one it
# built), else bazel-bin/tools/ublk-qcow2. A host path that only exists under the
# guest's read-only view of the host (/.vm-host) is found there.

set -uo pipefail
export LC_ALL=C

UQ=${UBLK_QCOW2_BIN:-$PWD/bazel-bin/tools/ublk-qcow2}
if [[ ! -x "$UQ" && -x "/.vm-host$UQ" ]]; then UQ=/.vm-host$UQ; fi
[[ -x "$UQ" ]] || { echo "FAIL  ublk-qcow2 binary not found: $UQ (build //tools:ublk-qcow2)"; exit 1; }

TEST_NAME=$(basename "$0" .sh)
WORK=/scratch/$TEST_NAME
rm -rf "$WORK"
mkdir -p "$WORK"
MNT=/mnt/$TEST_NAME
mkdir -p "$MNT"

failures=0
checks=0

# check NAME CMD...: runs CMD (output indented below the result line), ok/FAIL.
check() {
  local name=$1
  shift
  local out rc
  set +e
  out=$(set -e; "$@" 2>&1)
  rc=$?
  checks=$((checks + 1))
  if ((rc == 0)); then
    echo "ok    $name"
  else
    echo "FAIL  $name (status $rc)"
    failures=$((failures + 1))
  fi
  [[ -z "$out" ]] || printf '%s\n' "$out" | sed 's/^/      | /'
  return $rc
}

# expect_error NAME EXPECTED_STATUS CMD...: CMD must exit with EXPECTED_STATUS and
# print exactly one line on stderr starting with "ublk-qcow2: " (the CLI's error form).
expect_error() {
  local name=$1 want=$2
  shift 2
  local err rc lines
  set +e
  err=$("$@" 2>&1 >/dev/null)
  rc=$?
  checks=$((checks + 1))
  lines=$(printf '%s' "$err" | grep -c '')
  if ((rc == want)) && [[ $want != 1 || ($lines == 1 && "$err" == ublk-qcow2:\ *) ]]; then
    echo "ok    $name"
  else
    echo "FAIL  $name (status $rc, wanted $want; $lines stderr line(s))"
    failures=$((failures + 1))
  fi
  # A usage error prints the usage too: its first line is what matters.
  ((rc == 2)) && err=$(head -n1 <<<"$err")
  [[ -z "$err" ]] || printf '%s\n' "$err" | sed 's/^/      | /'
}

# count_block_devices: how many /dev/ublkb* exist.
count_block_devices() {
  local n=0 f
  for f in /dev/ublkb*; do [[ -e $f ]] && n=$((n + 1)); done
  echo "$n"
}

# add_device ARGS...: runs `ublk-qcow2 add ARGS`, prints the device path.
add_device() {
  "$UQ" add "$@"
}

# wait_gone PATH SECONDS: waits until PATH no longer exists; fails after SECONDS.
wait_gone() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    [[ -e $1 ]] || return 0
    sleep 0.1
  done
  return 1
}

# dev_id /dev/ublkbN -> N
dev_id() { echo "${1#/dev/ublkb}"; }

writes_done() {  # writes_done ID: completed write requests of /dev/ublkbID
  local s
  read -r _ _ _ _ s _ <"/sys/block/ublkb$1/stat"
  echo "$s"
}

# wait_writes ID N SECONDS: until N more writes than now have completed.
wait_writes() {
  local base i
  base=$(writes_done "$1")
  for ((i = 0; i < $3 * 10; i++)); do
    (($(writes_done "$1") >= base + $2)) && return 0
    sleep 0.1
  done
  echo "fewer than $2 writes in $3 s"
  return 1
}

# fio_verify_start DEV SIZE: crc32c-verified random 4 KiB writes over the first SIZE of DEV,
# in the background (log in $WORK/fio.log, pid in fio_pid), for a test that changes the
# device's daemon under them (kill + recover, upgrade). Paced at 600 writes/s: unpaced, a
# fast device (zero copy on 7.3) finished the writes before the test's last handover and
# its wait for more writes failed; paced, SIZE sets how long they last (48M: 20 s).
fio_verify_start() {
  fio --name=v --filename="$1" --direct=1 --ioengine=io_uring --iodepth=32 \
    --rw=randwrite --bs=4k --offset=0 --size="$2" --rate_iops=600 --verify=crc32c \
    --verify_fatal=1 --do_verify=1 --numjobs=1 --output-format=normal >"$WORK/fio.log" 2>&1 &
  fio_pid=$!
}

# fio_verify_finish DEV SIZE AFTER: waits for fio_verify_start's fio; passes when it exits 0
# with no verify error and a second reader (--verify_only) then finds every block, after
# AFTER (words for the output: "the last upgrade").
fio_verify_finish() {
  local rc=0
  wait "$fio_pid" || rc=$?
  grep -E 'err=|verify|WRITE:|READ:' "$WORK/fio.log" | head -6
  echo "fio status $rc"
  ((rc == 0)) && ! grep -qiE 'verify failed|bad magic|crc32c: verify' "$WORK/fio.log" || return 1
  fio --name=v --filename="$1" --direct=1 --ioengine=io_uring --iodepth=32 \
    --rw=randwrite --bs=4k --offset=0 --size="$2" --verify=crc32c --verify_fatal=1 \
    --verify_only --output-format=terse >/dev/null || return 1
  echo "fio --verify_only passes after $3"
}

# ext4_writer_across IMAGE N CHANGE: a new 512M IMAGE on a device, ext4 on it, mounted, and
# a writer copying a tree of files into it (each copy synced) while `CHANGE ID DEV` (the
# test's daemon change: kill_and_recover, upgrade_once) runs N times, each after 150 more
# writes. Passes when the writer saw no error, e2fsck finds nothing, every copy (at least 3)
# verifies after a remount, and after `del` qemu-img check finds the image clean (no leak).
# Runs under check (errexit).
ext4_writer_across() {
  local img=$1 changes=$2 change=$3 dev id writer rc k n d
  qemu-img create -q -f qcow2 "$img" 512M
  dev=$(add_device -f "$img") || return 1
  id=$(dev_id "$dev")
  mkfs.ext4 -q "$dev"
  mount "$dev" "$MNT"
  make_tree "$WORK/tree"
  # Copies until told to stop (at least 3), each synced.
  rm -f "$WORK/stop"
  (
    set -e
    i=0
    while [[ ! -e $WORK/stop ]] || ((i < 3)); do
      i=$((i + 1))
      cp -r "$WORK/tree" "$MNT/copy$i"
      sync -f "$MNT/copy$i/a/b/big"
    done
    echo "$i copies written"
  ) >"$WORK/writer.log" 2>&1 &
  writer=$!
  for ((k = 0; k < changes; k++)); do
    wait_writes "$id" 150 120 || { kill "$writer"; return 1; }
    "$change" "$id" "$dev" || { kill "$writer"; return 1; }
  done
  touch "$WORK/stop"
  rc=0
  wait "$writer" || rc=$?
  cat "$WORK/writer.log"
  echo "writer status $rc"
  ((rc == 0))
  umount "$MNT"
  e2fsck -fn "$dev"
  mount "$dev" "$MNT"
  sums_of "$WORK/tree" | awk '{print $1}' >"$WORK/want"
  n=0
  for d in "$MNT"/copy*; do
    sums_of "$d" | awk '{print $1}' | cmp - "$WORK/want"
    n=$((n + 1))
  done
  ((n >= 3))
  echo "$n copies verify after remount"
  umount "$MNT"
  "$UQ" del -n "$id"
  qemu-img check "$img"
}

# list_has DEV FLAG: the device's flags (list --output=json) name UBLK_F_FLAG.
list_has() {
  "$UQ" list --output=json | python3 -c '
import json, sys
d = {x["device"]: x for x in json.load(sys.stdin)}[sys.argv[1]]
sys.exit(0 if sys.argv[2] in d["flags"] else 1)' "$1" "$2"
}

# kernel_has FLAG: this kernel's ublk offers UBLK_F_FLAG (features --output=json).
kernel_has() {
  "$UQ" features --output=json | python3 -c '
import json, sys
sys.exit(0 if sys.argv[1] in json.load(sys.stdin)["features"] else 1)' "$1"
}

daemon_pid() {  # daemon_pid ID
  sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "/run/ublk-qcow2/$1.json" 2>/dev/null
}

# kill_and_recover ID DEV: SIGKILL the daemon, see the device wait, recover it.
kill_and_recover() {
  local id=$1 dev=$2 pid new t0 out
  pid=$(daemon_pid "$id")
  kill -KILL "$pid"
  wait_gone "/proc/$pid" 10 || { echo "daemon $pid still there"; return 1; }
  # The kernel quiesces the device once the dead daemon's rings are gone.
  for ((i = 0; i < 100; i++)); do
    "$UQ" list | grep -qE "^$id +$dev +awaiting-recovery " && break
    sleep 0.1
  done
  "$UQ" list | grep -E "^$id +$dev +awaiting-recovery " || { "$UQ" list; return 1; }
  [[ -b $dev ]] || { echo "$dev went away"; return 1; }
  t0=$(date +%s%N)
  out=$("$UQ" recover -n "$id") || return 1
  [[ $out == "$dev" ]] || { echo "recover printed '$out'"; return 1; }
  new=$(daemon_pid "$id")
  [[ -n $new && $new != "$pid" && -d /proc/$new ]] || { echo "no new daemon ($new)"; return 1; }
  "$UQ" list | grep -E "^$id +$dev +live " >/dev/null
  echo "daemon $pid killed, $dev awaited recovery, daemon $new serves it ($((($(date +%s%N) - t0) / 1000000)) ms for recover)"
}

# The state the tests leave: no device, no daemon, no record, no control socket.
no_leftovers() {
  local bad=0
  if compgen -G '/dev/ublkb*' >/dev/null; then echo "block devices left: $(echo /dev/ublkb*)"; bad=1; fi
  if compgen -G '/dev/ublkc*' >/dev/null; then echo "char devices left: $(echo /dev/ublkc*)"; bad=1; fi
  if pgrep -x ublk-qcow2 >/dev/null; then echo "daemons left: $(pgrep -a -x ublk-qcow2)"; bad=1; fi
  if compgen -G '/run/ublk-qcow2/*.json' >/dev/null; then echo "records left: $(echo /run/ublk-qcow2/*.json)"; bad=1; fi
  if compgen -G '/run/ublk-qcow2/*.sock' >/dev/null; then echo "control sockets left: $(echo /run/ublk-qcow2/*.sock)"; bad=1; fi
  return $bad
}

# Writes a tree of files with random content under $1 (a few MB).
make_tree() {
  local root=$1 i d
  for d in a a/b a/b/c d e/f; do mkdir -p "$root/$d"; done
  i=0
  for d in . a a/b a/b/c d e/f; do
    head -c $((4096 * (i + 1) + 123)) /dev/urandom >"$root/$d/small$i"
    head -c $((200 * 1024 + i * 7777)) /dev/urandom >"$root/$d/medium$i"
    i=$((i + 1))
  done
  head -c $((3 * 1024 * 1024 + 17)) /dev/urandom >"$root/a/b/big"
  : >"$root/d/empty"
}

sums_of() {  # sums_of DIR: sha256 of every file, sorted by path
  (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
}

qemu_img_check() {  # qemu_img_check IMAGE: no errors, no leaks
  local out
  out=$(qemu-img check "$1" 2>&1)
  local rc=$?
  echo "$out"
  ((rc == 0)) && grep -q 'No errors were found' <<<"$out" && ! grep -q 'leaked' <<<"$out"
}

# Undo whatever the test left, then report.
cleanup() {
  mountpoint -q "$MNT" && umount "$MNT"
  "$UQ" del --all --force >/dev/null 2>&1 || true
}

finish() {
  cleanup
  if ((failures)); then
    echo "== $TEST_NAME: $failures of $checks check(s) FAILED"
    exit 1
  fi
  echo "== $TEST_NAME: all $checks check(s) passed"
  exit 0
}
