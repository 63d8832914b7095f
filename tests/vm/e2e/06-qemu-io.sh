#!/bin/bash
# Raw block I/O through the device, checked by QEMU's own tools: qemu-io writes and
# verifies a pattern with O_DIRECT (-t none), the device's contents read back with
# qemu-img convert equal the image's after del, and the image passes qemu-img check.
source "$(dirname "$0")/lib.bash"

img=$WORK/io.qcow2
qemu-img create -q -f qcow2 "$img" 64M
# Some data in the image before it is served, to read through the device.
qemu-io -f qcow2 -c 'write -P 0x5a 8M 1M' "$img" >/dev/null
dev=$(add_device -f "$img")

served() {
  echo "served as $dev"
  [[ -b $dev ]]
}

qemu_io_pattern() {
  local out
  out=$(qemu-io -f raw -t none -c 'write -P 0xab 1M 2M' -c 'read -P 0xab 1M 2M' \
    -c 'write -P 0xcd 3583k 5k' -c 'read -P 0xcd 3583k 5k' -c 'read -P 0x5a 8M 1M' \
    -c 'read -P 0 20M 1M' "$dev" 2>&1)
  local rc=$?
  echo "$out"
  ((rc == 0)) && ! grep -qiE 'fail|error' <<<"$out" && [[ $(grep -c '^read ' <<<"$out") == 4 ]]
}

contents_match() {
  qemu-img convert -f raw -O raw "$dev" "$WORK/device.raw"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu-img convert -f qcow2 -O raw "$img" "$WORK/image.raw"
  cmp "$WORK/device.raw" "$WORK/image.raw"
  echo "device contents == image contents ($(stat -c %s "$WORK/image.raw") bytes)"
}

check "add a 64 MiB qcow2 image" served || finish
check "qemu-io -t none: write/read patterns (aligned and unaligned to clusters)" qemu_io_pattern
check "qemu-img convert of the device equals that of the image after del" contents_match
check "qemu-img check clean" qemu_img_check "$img"
check "no device, daemon or record left" no_leftovers
finish
