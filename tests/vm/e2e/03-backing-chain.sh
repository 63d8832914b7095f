#!/bin/bash
# A backing chain: the device shows the base's data through an empty overlay, writes
# land in the overlay only, and the base file is left byte-for-byte unchanged.
source "$(dirname "$0")/lib.bash"

base=$WORK/base.qcow2
overlay=$WORK/overlay.qcow2
qemu-img create -q -f qcow2 "$base" 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -P 0x33 32M 512k' "$base" >/dev/null
qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$overlay"
base_sum=$(sha256sum <"$base")
dev=$(add_device -f "$overlay")

reads_base() {
  echo "served as $dev"
  qemu-io -f raw -t none -c 'read -P 0x11 0 4M' -c 'read -P 0x33 32M 512k' -c 'read -P 0 40M 1M' "$dev" |
    grep -c '^read ' | grep -qx 3
}

writes_land_in_overlay() {
  qemu-io -f raw -t none -c 'write -P 0x22 1M 1M' -c 'write -P 0x44 32M 4k' "$dev" >/dev/null
  # Read back through the device: the new data, the base's around it.
  qemu-io -f raw -t none -c 'read -P 0x22 1M 1M' -c 'read -P 0x11 0 1M' -c 'read -P 0x11 2M 2M' \
    -c 'read -P 0x44 32M 4k' -c 'read -P 0x33 32772k 508k' "$dev" | grep -c '^read ' | grep -qx 5
  "$UQ" del -n "$(dev_id "$dev")"
}

base_unchanged() {
  [[ "$(sha256sum <"$base")" == "$base_sum" ]]
  echo "base sha256 unchanged"
  qemu-img check "$base" >/dev/null
}

overlay_holds_the_writes() {
  qemu_img_check "$overlay"
  qemu-io -f qcow2 -c 'read -P 0x22 1M 1M' -c 'read -P 0x11 0 1M' -c 'read -P 0x44 32M 4k' \
    -c 'read -P 0x33 32772k 508k' "$overlay" | grep -c '^read ' | grep -qx 4
  # The overlay allocated only the clusters written (plus metadata): under 4 MiB of data.
  local data
  data=$(qemu-img map --output=json -f qcow2 "$overlay" |
    python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"] and e["depth"]==0))')
  echo "overlay data bytes: $data"
  ((data > 0 && data <= 2 * 1024 * 1024))
}

check "the device reads the base's data through the overlay" reads_base
check "writes read back; base data around them still visible" writes_land_in_overlay
check "the base image is unchanged (sha256)" base_unchanged
check "the overlay holds the writes, and passes qemu-img check" overlay_holds_the_writes
check "no device, daemon or record left" no_leftovers
finish
