#!/bin/bash
# Bad input fails cleanly: one error line, exit status 1 (2 for a bad command line), and
# afterwards no device, no daemon, no record.
source "$(dirname "$0")/lib.bash"

# A qcow2 image whose L1 table offset points inside the header cluster, unaligned.
qemu-img create -q -f qcow2 "$WORK/corrupt.qcow2" 16M
python3 - "$WORK/corrupt.qcow2" <<'PY'
import struct, sys
with open(sys.argv[1], 'r+b') as f:
    f.seek(40)                      # l1_table_offset
    f.write(struct.pack('>Q', 0x1234))
PY
# An overlay whose backing file is gone.
qemu-img create -q -f qcow2 "$WORK/base.qcow2" 16M
qemu-img create -q -f qcow2 -b "$WORK/base.qcow2" -F qcow2 "$WORK/overlay.qcow2"
rm "$WORK/base.qcow2"
# An empty file (probed as a raw image of 0 bytes: nothing to serve).
: >"$WORK/empty.img"
qemu-img create -q -f qcow2 "$WORK/good.qcow2" 16M

before=$(count_block_devices)

expect_error "add: corrupt L1 table offset -> exit 1, one line" 1 "$UQ" add -f "$WORK/corrupt.qcow2"
expect_error "add: missing backing file -> exit 1, one line" 1 "$UQ" add -f "$WORK/overlay.qcow2"
expect_error "add: missing image -> exit 1, one line" 1 "$UQ" add -f "$WORK/nonexistent.qcow2"
expect_error "add: empty file -> exit 1, one line" 1 "$UQ" add -f "$WORK/empty.img"
expect_error "add --foreground: corrupt image -> exit 1, one line" 1 "$UQ" add --foreground -f "$WORK/corrupt.qcow2"
expect_error "del: unknown device id -> exit 1, one line" 1 "$UQ" del -n 77
expect_error "add: no -f -> usage, exit 2" 2 "$UQ" add
expect_error "add: bad queue count -> usage, exit 2" 2 "$UQ" add -f "$WORK/good.qcow2" -q 0
expect_error "del: neither -n nor --all -> usage, exit 2" 2 "$UQ" del
expect_error "del: both -n and --all -> usage, exit 2" 2 "$UQ" del -n 1 --all

messages() {
  local out
  out=$("$UQ" add -f "$WORK/corrupt.qcow2" 2>&1 || true)
  grep -q 'L1 table' <<<"$out"
  out=$("$UQ" add -f "$WORK/overlay.qcow2" 2>&1 || true)
  grep -q 'base.qcow2' <<<"$out"
  out=$("$UQ" add -f "$WORK/empty.img" 2>&1 || true)
  grep -q 'empty.img' <<<"$out"
  out=$("$UQ" del -n 77 2>&1 || true)
  grep -q '77' <<<"$out"
}
check "error messages name the problem (L1 table, the backing file, the file, the id)" messages

no_new_device() {
  local after
  after=$(count_block_devices)
  echo "block devices before: $before, after: $after"
  ((after == before))
}
check "no new /dev/ublkb* after the failures" no_new_device
check "no daemon, no record, no char device left" no_leftovers

# A failure at every step of the daemon's setup is undone completely (the setup has a
# test hook that fails on purpose right after the named step).
partial_setup() {
  local step out
  for step in open_image add_dev set_params record open_char start_queues start_dev control_socket; do
    if out=$(UBLK_QCOW2_TEST_FAIL_AFTER=$step "$UQ" add -f "$WORK/good.qcow2" 2>&1); then
      echo "add succeeded despite a failure after $step"
      return 1
    fi
    echo "after $step: $out"
    grep -q "injected failure after $step" <<<"$out"
    no_leftovers
  done
  qemu_img_check "$WORK/good.qcow2"
}
check "a failure after any setup step leaves no device, daemon or record" partial_setup

# A device id already taken: the second add fails, the first device keeps working.
taken() {
  local dev
  dev=$("$UQ" add -n 5 -f "$WORK/good.qcow2")
  [[ $dev == /dev/ublkb5 ]]
  qemu-img create -q -f qcow2 "$WORK/other.qcow2" 16M
  if "$UQ" add -n 5 -f "$WORK/other.qcow2"; then echo "second add -n 5 succeeded"; return 1; fi
  dd if=/dev/ublkb5 of=/dev/null bs=64k count=4 iflag=direct status=none
  "$UQ" del -n 5
  [[ ! -e /dev/ublkb5 ]]
}
check "add -n of a taken id fails; the existing device is unharmed" taken
check "no device, daemon or record left" no_leftovers
finish
