#!/bin/bash
# Internal snapshots of a running device (issue 16): `snapshot -c NAME -n ID`, `-l -n ID` and
# `-d NAME -n ID` while fio writes with crc32c verification on two queues. Each snapshot holds
# exactly what was written before the command returned (checked afterwards with QEMU:
# `qemu-img convert -l snapshot.name=NAME`), writes after it reach the active layer only,
# fio's own verification passes through the device, and after del `qemu-img check` is clean
# and `qemu-img snapshot -l` lists what `-l -n ID` listed. `-a -n ID` is refused.
source "$(dirname "$0")/lib.bash"

MiB=$((1024 * 1024))
img=$WORK/live.qcow2

# fill DEV OFFSET_MIB LENGTH_MIB BYTE: O_DIRECT writes of BYTE, flushed before it returns.
fill() {
  head -c $(($3 * MiB)) /dev/zero | tr '\0' "\\$(printf %03o "$4")" |
    dd of="$1" bs=1M seek="$2" oflag=direct conv=fsync,notrunc status=none
}

# expect FILE OFFSET_MIB LENGTH_MIB BYTE: every byte of the range is BYTE.
expect() {
  python3 - "$@" <<'PY'
import sys
path, off, length, byte = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3]) << 20, int(sys.argv[4])
with open(path, "rb") as f:
    f.seek(off)
    data = f.read(length)
bad = next((i for i, b in enumerate(data) if b != byte), None)
if len(data) != length or bad is not None:
    sys.exit(f"{path}: at {off + (bad or 0)} not {byte:#x} (read {len(data)} of {length} bytes)")
print(f"{path}: [{off >> 20}M, +{length >> 20}M) all {byte:#x}")
PY
}

qemu-img create -q -f qcow2 "$img" 256M
dev=$(add_device -f "$img" -q 2 -d 64)
id=$(dev_id "$dev")
echo "served as $dev"

live_snapshots() {
  # fio in its own range, on both queues, for the whole sequence.
  fio --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 --verify=crc32c \
    --do_verify=1 --verify_fatal=1 --randrepeat=1 --randseed=99 \
    --name=a --rw=randwrite --bs=4k --offset=64M --size=16M --cpus_allowed=0 \
    --name=b --rw=randwrite --bs=64k --offset=128M --size=64M --cpus_allowed=1 \
    >"$WORK/fio.out" 2>&1 &
  local fio_pid=$!
  fill "$dev" 0 8 $((0xa1))
  "$UQ" snapshot -c s1 -n "$id"
  fill "$dev" 0 4 $((0xb2))
  "$UQ" snapshot -c s2 -n "$id"
  fill "$dev" 0 2 $((0xc3))
  "$UQ" snapshot -c s3 -n "$id"
  "$UQ" snapshot -d s3 -n "$id"
  "$UQ" snapshot -l -n "$id" | tee "$WORK/live.list"
  local rc=0
  wait "$fio_pid" || rc=$?
  echo "fio status $rc"
  grep -E '^ *(write|read): IOPS=' "$WORK/fio.out" || true
  ((rc == 0)) || { tail -n 20 "$WORK/fio.out"; return 1; }
  grep -qE '^ *read: IOPS=' "$WORK/fio.out"  # the verify pass ran
  [[ $(grep -c '^[0-9]' "$WORK/live.list") == 2 ]]
  awk '/^[0-9]/ {print $2}' "$WORK/live.list" | tr '\n' ' ' | grep -qx 's1 s2 '
  grep "snapshot '" "/run/ublk-qcow2/$id.log"
}
check "snapshot -c/-d/-l -n while fio writes on two queues; fio verifies" live_snapshots

expect_error "snapshot -a -n: refused, one line" 1 "$UQ" snapshot -a s1 -n "$id"
expect_error "snapshot -d of a missing name -n: one line" 1 "$UQ" snapshot -d nosuch -n "$id"
expect_error "snapshot -l -n of a missing device: one line" 1 "$UQ" snapshot -l -n 77
expect_error "snapshot -n with an IMAGE: one line" 1 "$UQ" snapshot -l -n "$id" "$img"

after_del() {
  "$UQ" del -n "$id"
  qemu_img_check "$img"
  qemu-img snapshot -l "$img" | tee "$WORK/qemu.list"
  # The same table as -l -n showed (qemu-img's own formatting of our entries).
  grep '^[0-9]' "$WORK/live.list" >"$WORK/live.rows"
  grep '^[0-9]' "$WORK/qemu.list" >"$WORK/qemu.rows"
  diff "$WORK/live.rows" "$WORK/qemu.rows"
  qemu-img convert -l snapshot.name=s1 -O raw "$img" "$WORK/s1.raw"
  qemu-img convert -l snapshot.name=s2 -O raw "$img" "$WORK/s2.raw"
  qemu-img convert -O raw "$img" "$WORK/active.raw"
  expect "$WORK/s1.raw" 0 8 $((0xa1))
  expect "$WORK/s2.raw" 0 4 $((0xb2))
  expect "$WORK/s2.raw" 4 4 $((0xa1))
  expect "$WORK/active.raw" 0 2 $((0xc3))
  expect "$WORK/active.raw" 2 2 $((0xb2))
  expect "$WORK/active.raw" 4 4 $((0xa1))
  expect "$WORK/s1.raw" 8 48 0
}
check "after del: image clean, both snapshots and the active layer as written" after_del
check "no device, daemon or record left" no_leftovers
finish
