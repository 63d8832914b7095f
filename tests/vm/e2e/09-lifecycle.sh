#!/bin/bash
# The daemon's life: list (text and JSON), read-only devices, --foreground, SIGTERM
# (clean stop: device, record and daemon gone, image clean), and SIGKILL (the kernel
# fails I/O and removes the disk by itself; `list` shows it dead; `del` cleans up), and
# --cache (O_DIRECT by default, writeback on request, fallback on ramfs), --preallocate,
# --max-io and --poll-us.
source "$(dirname "$0")/lib.bash"

a=$WORK/a.qcow2
b=$WORK/b.qcow2
qemu-img create -q -f qcow2 "$a" 64M
qemu-img create -q -f qcow2 -o cluster_size=4096 "$b" 32M
qemu-io -f qcow2 -c 'write -P 0x77 0 1M' "$b" >/dev/null

listing() {
  local da db
  da=$(add_device -f "$a" -q 2 -d 32)
  db=$(add_device -f "$b" --read-only)
  "$UQ" list
  "$UQ" list | grep -E "^$(dev_id "$da") +$da +live +2 +32 +[0-9]+ +64 MiB +$a\$"
  "$UQ" list | grep -E "^$(dev_id "$db") +$db +live +1 +128 +[0-9]+ +32 MiB +$b \(read-only\)\$"
  "$UQ" list --output=json | python3 -c '
import json, sys
devs = {d["device"]: d for d in json.load(sys.stdin)}
a, b = devs[sys.argv[1]], devs[sys.argv[2]]
assert a["state"] == "live" and a["queues"] == 2 and a["depth"] == 32, a
assert a["image"] == sys.argv[3] and a["size"] == 64 << 20 and not a["read_only"], a
assert a["daemon_running"] and a["pid"] > 0, a
assert b["read_only"] and b["image"] == sys.argv[4], b
print("json ok")' "$da" "$db" "$a" "$b"
  # Read-only: the kernel refuses writes; reads work.
  [[ $(blockdev --getro "$db") == 1 ]]
  if dd if=/dev/zero of="$db" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
    echo "write to a read-only device succeeded"
    return 1
  fi
  qemu-io -f raw -r -t none -c 'read -P 0x77 0 1M' "$db" | grep -q '^read '
  "$UQ" del --all
  [[ -z "$("$UQ" list)" ]]
  echo "list is empty after del --all"
}
check "list shows devices (text and JSON); read-only refuses writes; del --all" listing

sigterm() {
  local dev id pid
  dev=$(add_device -f "$a")
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  echo "daemon pid $pid"
  dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none
  kill -TERM "$pid"
  wait_gone "/proc/$pid" 30
  wait_gone "$dev" 5
  wait_gone "/dev/ublkc$id" 5
  [[ ! -e /run/ublk-qcow2/$id.json ]]
  grep -q 'image closed cleanly' "/run/ublk-qcow2/$id.log"
  qemu_img_check "$a"
}
check "SIGTERM: the daemon stops the device, closes the image cleanly, exits" sigterm

foreground() {
  local out=$WORK/fg.out pid dev i
  "$UQ" add --foreground -f "$a" >"$out" 2>"$WORK/fg.err" &
  pid=$!
  for ((i = 0; i < 300; i++)); do
    [[ -s $out ]] && break
    sleep 0.1
  done
  dev=$(head -n1 "$out")
  echo "foreground pid $pid serves $dev"
  [[ -b $dev ]]
  dd if="$dev" of=/dev/null bs=1M count=4 iflag=direct status=none
  "$UQ" del -n "$(dev_id "$dev")"
  wait "$pid"   # its exit status: 0 after a clean stop
  echo "foreground process exited 0"
  qemu_img_check "$a"
}
check "--foreground: serves until del, then exits 0" foreground

sigkill() {
  local dev id pid reader rc i
  # Without user recovery: the old behaviour (18-recovery.sh covers recovery).
  dev=$(add_device -f "$a" --recovery=off)
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  # A reader busy on the device while the daemon dies: it must fail, not hang.
  timeout 60 dd if="$dev" of=/dev/null bs=4k iflag=direct status=none &
  reader=$!
  sleep 1
  kill -KILL "$pid"
  set +e
  wait "$reader"
  rc=$?
  set -e
  echo "reader exited with status $rc (124 = hung)"
  ((rc != 0 && rc != 124))
  wait_gone "$dev" 10
  echo "$dev removed by the kernel"
  "$UQ" list
  "$UQ" list | grep -E "^$id +/dev/ublkb$id +dead .* - "
  "$UQ" del -n "$id"
  [[ ! -e /dev/ublkc$id && ! -e /run/ublk-qcow2/$id.json ]]
  # Killed mid-flight: leaks are possible, corruption is not.
  qemu-img check "$a" || (($? == 3))
}
check "SIGKILL: I/O fails (no hang), the kernel removes the disk, del cleans up" sigkill

# image_fd_flags PID IMAGE: the open(2) flags (octal) of PID's fd on IMAGE.
image_fd_flags() {
  local fd
  for fd in /proc/"$1"/fd/*; do
    if [[ $(readlink "$fd") == "$2" ]]; then
      awk '/^flags:/ {print $2}' "/proc/$1/fdinfo/${fd##*/}"
      return 0
    fi
  done
  return 1
}
has_o_direct() { (((8#$1 & 8#40000) != 0)); }  # O_DIRECT on x86-64

# --cache: none (default) opens the image with O_DIRECT, writeback without; on a file
# system without O_DIRECT (ramfs; tmpfs has it since Linux 6.6) none falls back to
# writeback with a warning and still works.
cache_modes() {
  local dev pid flags r=/mnt/ramfs-$$ t err=$WORK/add.err
  dev=$(add_device -f "$a")
  pid=$(daemon_pid "$(dev_id "$dev")")
  flags=$(image_fd_flags "$pid" "$a")
  echo "--cache default: image fd flags $flags"
  has_o_direct "$flags"
  "$UQ" del -n "$(dev_id "$dev")"
  dev=$(add_device -f "$a" --cache=writeback)
  pid=$(daemon_pid "$(dev_id "$dev")")
  flags=$(image_fd_flags "$pid" "$a")
  echo "--cache=writeback: image fd flags $flags"
  ! has_o_direct "$flags"
  "$UQ" del -n "$(dev_id "$dev")"
  mkdir -p "$r"
  mount -t ramfs ramfs "$r"
  t=$r/cache-test.qcow2
  qemu-img create -q -f qcow2 "$t" 16M
  dev=$("$UQ" add -f "$t" 2>"$err")
  cat "$err"
  grep -q "does not support O_DIRECT; serving through the page cache" "$err"
  dd if=/dev/urandom of="$WORK/blob" bs=1M count=2 status=none
  dd if="$WORK/blob" of="$dev" bs=1M oflag=direct status=none
  dd if="$dev" of="$WORK/blob.back" bs=1M count=2 iflag=direct status=none
  cmp "$WORK/blob.back" "$WORK/blob"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$t"
  umount "$r"
  local rc=0
  "$UQ" add -f "$a" --cache=directsync 2>/dev/null || rc=$?
  echo "--cache=directsync: exit status $rc (usage error)"
  ((rc == 2))
}
check "--cache=none opens the image O_DIRECT, writeback does not, ramfs falls back" cache_modes

# --preallocate (default 64M): while served, the image file is grown ahead of the
# clusters allocating writes take; del cuts it back to the image's end; 0 turns it off.
preallocation() {
  local img=$WORK/grow.qcow2 dev size end
  qemu-img create -q -f qcow2 "$img" 256M
  dev=$(add_device -f "$img")
  dd if=/dev/urandom of="$dev" bs=1M count=2 oflag=direct status=none
  sync
  size=$(stat -c %s "$img")
  echo "served, after 2 MiB of writes: file $size bytes"
  ((size >= 64 * 1024 * 1024))
  "$UQ" del -n "$(dev_id "$dev")"
  size=$(stat -c %s "$img")
  end=$(qemu-img check --output=json "$img" | sed -n 's/.*"image-end-offset": *\([0-9]*\).*/\1/p')
  echo "after del: file $size bytes, image end offset $end"
  ((size == end))
  qemu_img_check "$img" >/dev/null
  # Recovery off: a recoverable device reserves up to 8 MiB of clusters ahead whatever
  # --preallocate says (qcow2/qcow2_reserve.cc), which this size check would count.
  dev=$(add_device -f "$img" --preallocate=0 --recovery=off)
  dd if=/dev/urandom of="$dev" bs=1M count=2 seek=8 oflag=direct status=none
  sync
  size=$(stat -c %s "$img")
  echo "--preallocate=0, after 2 more MiB: file $size bytes"
  ((size < 8 * 1024 * 1024))
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img" >/dev/null
}
check "--preallocate grows the file ahead while served, del cuts it back, 0 turns it off" preallocation
# --max-io (default 1M): the largest request the kernel sends, so a 1 MiB direct
# write is one request; a smaller value splits it, and the data is the same either way.
max_io() {
  local img=$WORK/maxio.qcow2 dev kb
  qemu-img create -q -f qcow2 "$img" 16M
  head -c 4M /dev/urandom >"$WORK/maxio.data"
  for want in default 64K; do
    if [[ $want == default ]]; then dev=$(add_device -f "$img"); else dev=$(add_device -f "$img" --max-io="$want"); fi
    kb=$(cat "/sys/block/${dev#/dev/}/queue/max_hw_sectors_kb")
    echo "--max-io $want: max_hw_sectors_kb $kb"
    [[ $want == default ]] && ((kb == 1024))
    [[ $want == 64K ]] && ((kb == 64))
    dd if="$WORK/maxio.data" of="$dev" bs=1M oflag=direct status=none
    dd if="$dev" of="$WORK/maxio.back" bs=1M count=4 iflag=direct status=none
    cmp "$WORK/maxio.back" "$WORK/maxio.data"
    "$UQ" del -n "$(dev_id "$dev")"
  done
  local rc=0
  "$UQ" add -f "$img" --max-io=1000 2>/dev/null || rc=$?
  echo "--max-io=1000: exit status $rc"
  ((rc != 0))
  qemu_img_check "$img" >/dev/null
}
check "--max-io sets the largest request (default 1 MiB); data intact either way" max_io
# --poll-us: queue threads busy-poll their rings before sleeping. Data is the same, the
# daemon's log counts waits that polling ended, and once the device is idle the
# threads sleep again (no CPU burnt while nothing happens).
polling() {
  local img=$WORK/poll.qcow2 dev id pid t0 t1
  qemu-img create -q -f qcow2 "$img" 16M
  head -c 4M /dev/urandom >"$WORK/poll.data"
  dev=$(add_device -f "$img" -q 2 --poll-us=500)
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  dd if="$WORK/poll.data" of="$dev" bs=4k oflag=direct status=none
  dd if="$dev" of="$WORK/poll.back" bs=4k count=1024 iflag=direct status=none
  cmp "$WORK/poll.back" "$WORK/poll.data"
  sleep 1
  t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  sleep 3
  t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  echo "idle daemon: $((t1 - t0)) ticks of CPU in 3 s"
  ((t1 - t0 < 30))
  "$UQ" del -n "$id"
  wait_gone "/proc/$pid" 30
  grep 'served' "/run/ublk-qcow2/$id.log"
  grep -Eq 'queue 0: [0-9]+ requests \([0-9]+ on its own thread; waits: [1-9][0-9]* polled, [0-9]+ slept\)' \
    "/run/ublk-qcow2/$id.log"
  local rc=0
  "$UQ" add -f "$img" --poll-us=-1 2>/dev/null || rc=$?
  ((rc != 0))
  qemu_img_check "$img" >/dev/null
}
check "--poll-us: data intact, waits polled, idle threads sleep" polling
check "no device, daemon or record left" no_leftovers
finish
