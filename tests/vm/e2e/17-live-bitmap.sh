#!/bin/bash
# Persistent dirty bitmaps of a running device (issue 16): `bitmap -n ID` adds, disables,
# clears, merges and removes bitmaps while the device serves, and `map --bitmap NAME -n ID`
# reads them live. A bitmap added live holds exactly the writes made after the command
# returned; a disabled one stops changing. After del, QEMU serves the same bits
# (`qemu-nbd -B NAME` read with `nbdinfo --map=qemu:dirty-bitmap:NAME`) and `qemu-img check`
# is clean. A daemon killed while its bitmaps track writes leaves them marked in use
# (inconsistent), never silently wrong.
source "$(dirname "$0")/lib.bash"

MiB=$((1024 * 1024))
img=$WORK/bitmaps.qcow2

# fill DEV OFFSET_KIB LENGTH_KIB: O_DIRECT writes, flushed before it returns.
fill() {
  head -c $(($3 * 1024)) /dev/urandom |
    dd of="$1" bs=4k seek=$(($2 / 4)) oflag=direct conv=fsync,notrunc status=none
}

# dirty ID NAME: the live bitmap's dirty extents, "offset+length" per line.
dirty() {
  "$UQ" map --bitmap "$2" -n "$1" --output=json |
    python3 -c 'import json,sys; [print("%d+%d" % (e["start"], e["length"])) for e in json.load(sys.stdin) if e["dirty"]]'
}

# nbd_dirty IMAGE NAME: the same, as qemu-nbd serves the bitmap.
nbd_dirty() {
  local sock=$WORK/nbd.sock
  rm -f "$sock"
  qemu-nbd -r -k "$sock" -B "$2" -f qcow2 "$1" &
  local pid=$!
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -S $sock ]] && break
    sleep 0.1
  done
  nbdinfo --map="qemu:dirty-bitmap:$2" "nbd+unix:///?socket=$sock" |
    awk '$3 == 1 {print $1 "+" $2}'
  # qemu-nbd ends with its one client; kill it in case it did not.
  kill "$pid" 2>/dev/null || true
  wait "$pid" || true
}

# same WANT... : stdin's lines are exactly WANT.
same() {
  local got
  got=$(cat)
  local want
  want=$(printf '%s\n' "$@")
  [[ "$got" == "$want" ]] || { echo "got: $(echo $got)"; echo "want: $(echo $want)"; return 1; }
  echo "$(echo $got)"
}

qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 64M
"$UQ" bitmap --add "$img" before
dev=$(add_device -f "$img" -q 2 -d 32)
id=$(dev_id "$dev")
echo "served as $dev"

live_add() {
  fill "$dev" 0 1024
  "$UQ" bitmap -n "$id" --add -g 4k live
  # Stored at once: QEMU sees it in the file while the device runs.
  qemu-img info -U "$img" | grep -A3 'name: live'
  fill "$dev" 4096 1024
  fill "$dev" 8192 4
  dirty "$id" live | same $((4 * MiB))+$MiB $((8 * MiB))+4096
  dirty "$id" before | same 0+$MiB $((4 * MiB))+$MiB $((8 * MiB))+65536
}
check "bitmap -n --add: holds exactly the writes after it; the old one all of them" live_add

live_disable_clear_merge() {
  "$UQ" bitmap -n "$id" --disable before
  "$UQ" bitmap -n "$id" --clear live
  fill "$dev" 12288 64
  dirty "$id" before | same 0+$MiB $((4 * MiB))+$MiB $((8 * MiB))+65536
  dirty "$id" live | same $((12 * MiB))+65536
  "$UQ" bitmap -n "$id" --add --disable merged --merge before --merge live
  dirty "$id" merged | same 0+$MiB $((4 * MiB))+$MiB $((8 * MiB))+65536 $((12 * MiB))+65536
  "$UQ" bitmap -n "$id" --add gone --remove
  "$UQ" bitmap -n "$id" --enable before
  fill "$dev" 20480 4
  dirty "$id" before | same 0+$MiB $((4 * MiB))+$MiB $((8 * MiB))+65536 $((20 * MiB))+65536
  grep "bitmap '" "/run/ublk-qcow2/$id.log"
}
check "bitmap -n --disable/--clear/--merge/--remove/--enable under writes" live_disable_clear_merge

# Discards and write-zeroes dirty a bitmap as writes do, in QEMU too: the same requests on
# the device (blkdiscard, blkdiscard -z: BLKZEROOUT) and through qemu-io on a twin image,
# then the bits compared as qemu-nbd serves them. Ranges inside and across 4 KiB granules,
# over data and over unallocated clusters.
zero_discard_twin() {
  local ours=$WORK/zd.qcow2 twin=$WORK/zd-qemu.qcow2 dev2 id2 K=1024
  qemu-img create -q -f qcow2 -o cluster_size=64k "$ours" 64M
  qemu-io -c "write -P 7 0 32M" "$ours" >/dev/null
  qemu-img bitmap --add -g 4k "$ours" zd
  cp "$ours" "$twin"
  dev2=$(add_device -f "$ours") || return 1
  id2=$(dev_id "$dev2")
  blkdiscard -o $((1 * MiB)) -l $((1 * MiB)) "$dev2"
  blkdiscard -o $((5 * MiB + 64 * K)) -l $((192 * K)) "$dev2"
  blkdiscard -o $((7 * MiB + 4 * K + 512)) -l $((20 * K)) "$dev2"
  blkdiscard -z -o $((9 * MiB + 4 * K)) -l $((60 * K)) "$dev2"
  blkdiscard -z -o $((40 * MiB)) -l $((2 * MiB)) "$dev2"
  dirty "$id2" zd >"$WORK/zd.live"
  "$UQ" del -n "$id2" || return 1
  qemu-io -c "discard $((1 * MiB)) $((1 * MiB))" -c "discard $((5 * MiB + 64 * K)) $((192 * K))" \
    -c "discard $((7 * MiB + 4 * K + 512)) $((20 * K))" \
    -c "write -z $((9 * MiB + 4 * K)) $((60 * K))" -c "write -z $((40 * MiB)) $((2 * MiB))" \
    "$twin" >/dev/null || return 1
  nbd_dirty "$twin" zd >"$WORK/zd.qemu"
  nbd_dirty "$ours" zd >"$WORK/zd.ours"
  echo "qemu: $(tr '\n' ' ' <"$WORK/zd.qemu")"
  [[ -s $WORK/zd.qemu ]] || { echo "QEMU's bitmap is empty"; return 1; }
  diff "$WORK/zd.qemu" "$WORK/zd.ours" && diff "$WORK/zd.ours" "$WORK/zd.live" &&
    qemu_img_check "$ours"
}
check "discards and write-zeroes dirty the bitmap as in QEMU (twin)" zero_discard_twin

expect_error "bitmap -n --remove of a missing bitmap: one line" 1 \
  "$UQ" bitmap -n "$id" --remove nosuch
expect_error "bitmap -n --add of an existing bitmap: one line" 1 "$UQ" bitmap -n "$id" --add live
expect_error "map --bitmap -n of a missing bitmap: one line" 1 "$UQ" map --bitmap nosuch -n "$id"
expect_error "bitmap -n of a missing device: one line" 1 "$UQ" bitmap -n 77 --add x
expect_error "bitmap -n with -b: one line" 1 "$UQ" bitmap -n "$id" --merge a -b "$img" live

for name in before live merged; do dirty "$id" "$name" >"$WORK/live.$name"; done

after_del() {
  "$UQ" del -n "$id"
  qemu_img_check "$img"
  local name
  for name in before live merged; do
    nbd_dirty "$img" "$name" >"$WORK/nbd.$name"
    diff "$WORK/live.$name" "$WORK/nbd.$name"
    echo "$name: $(tr '\n' ' ' <"$WORK/nbd.$name")"
  done
  ! qemu-img info "$img" | grep -q 'name: gone'
}
check "after del: QEMU serves the bits map --bitmap -n showed; image clean" after_del

killed() {
  dev=$(add_device -f "$img" --recovery=off)
  id=$(dev_id "$dev")
  fill "$dev" 32768 64
  local pid
  pid=$(daemon_pid "$id")
  kill -9 "$pid"
  wait_gone "$dev" 30
  qemu-img info "$img" | tee "$WORK/info.killed"
  # Enabled and written: in use, so QEMU will not trust it. Disabled: untouched.
  qemu-img info --output=json "$img" | python3 -c '
import json, sys
bm = {b["name"]: b["flags"] for b in json.load(sys.stdin)["format-specific"]["data"]["bitmaps"]}
print(bm)
assert "in-use" in bm["before"] and "in-use" in bm["live"], bm
assert "in-use" not in bm["merged"], bm'
  "$UQ" del -n "$id" 2>/dev/null || true
}
check "a killed daemon leaves its tracked bitmaps in use, the disabled one intact" killed
check "no device, daemon or record left" no_leftovers
finish
