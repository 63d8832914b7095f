#!/bin/bash
# Two of QEMU's conventions the daemon must keep too (issue 22): a relative external
# data file name is relative to the working directory `add` ran in (the daemon itself
# runs in /), and QEMU's persistent bitmaps are maintained by the daemon (issue 16):
# the enabled one gets the bits of the device's writes, both are stored, not in use,
# when the device is deleted, and a daemon killed while writing leaves the enabled one
# marked in use (inconsistent), never wrong.
source "$(dirname "$0")/lib.bash"

mkdir -p "$WORK/dir" "$WORK/run"
cd "$WORK/run" || exit 1
qemu-img create -q -f qcow2 -o data_file=img.data ../dir/img.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' ../dir/img.qcow2 >/dev/null

bitmaps=$WORK/bitmaps.qcow2
qemu-img create -q -f qcow2 "$bitmaps" 64M
qemu-io -f qcow2 -c 'write -P 0x21 0 1M' "$bitmaps" >/dev/null
qemu-img bitmap --add "$bitmaps" b0
qemu-img bitmap --add --disable -g 1M "$bitmaps" b1

relative_data_file_served() {
  local dev
  dev=$(add_device -f ../dir/img.qcow2) || return 1
  echo "served as $dev from $(pwd)"
  qemu-io -f raw -t none -c 'read -P 0x11 0 1M' -c 'write -P 0x12 4M 1M' "$dev" |
    grep -c '^read \|^wrote ' | grep -qx 2 || return 1
  "$UQ" del -n "$(dev_id "$dev")" || return 1
  # The data file in the working directory holds the write; none appeared beside the image.
  [[ -e img.data && ! -e ../dir/img.data ]] || return 1
  qemu-io -f qcow2 -c 'read -P 0x11 0 1M' -c 'read -P 0x12 4M 1M' ../dir/img.qcow2 |
    grep -c '^read ' | grep -qx 2 || return 1
  qemu_img_check ../dir/img.qcow2
}

bitmaps_maintained() {
  local dev
  dev=$(add_device -f "$bitmaps") || return 1
  qemu-io -f raw -t none -c 'write -P 0x22 8M 1M' -c 'write -P 0x23 40M 4k' "$dev" >/dev/null ||
    return 1
  "$UQ" del -n "$(dev_id "$dev")" || return 1
  qemu_img_check "$bitmaps" || return 1
  qemu-img info --output=json "$bitmaps" | python3 -c '
import json, sys
bitmaps = json.load(sys.stdin)["format-specific"]["data"]["bitmaps"]
print(bitmaps)
assert [(b["name"], b["flags"]) for b in bitmaps] == [("b0", ["auto"]), ("b1", [])]' || return 1
  # b0 (64 KiB granules, added after qemu-io's write): exactly the device's two writes.
  "$UQ" map --bitmap b0 --output=json "$bitmaps" | python3 -c '
import json, sys
dirty = [(e["start"], e["length"]) for e in json.load(sys.stdin) if e["dirty"]]
print(dirty)
assert dirty == [(8 << 20, 1 << 20), (40 << 20, 65536)]' || return 1
  "$UQ" map --bitmap b1 --output=json "$bitmaps" | python3 -c '
import json, sys
assert not any(e["dirty"] for e in json.load(sys.stdin))'
}

bitmap_in_use_after_kill() {
  local dev id pid
  # Without recovery, so that the kernel removes the device when its daemon
  # dies (with it, the device would wait for `recover`: 18-recovery).
  dev=$(add_device -f "$bitmaps" --recovery=off) || return 1
  id=$(dev_id "$dev")
  qemu-io -f raw -t none -c 'write -P 0x24 20M 64k' "$dev" >/dev/null || return 1
  pid=$(daemon_pid "$id") || return 1
  kill -KILL "$pid"
  wait_gone "$dev" 10 || return 1
  "$UQ" del -n "$id" || return 1
  qemu-img info --output=json "$bitmaps" | python3 -c '
import json, sys
bitmaps = json.load(sys.stdin)["format-specific"]["data"]["bitmaps"]
print(bitmaps)
assert [(b["name"], b["flags"]) for b in bitmaps] == [("b0", ["in-use", "auto"]), ("b1", [])]' ||
    return 1
  qemu-img check -q "$bitmaps" || [[ $? == 3 ]] || return 1
  # Removing the inconsistent bitmap is the way out, as with QEMU.
  "$UQ" bitmap --remove "$bitmaps" b0 && qemu-img check -r leaks -q "$bitmaps"
}

check "a relative data file name is taken from add's working directory" relative_data_file_served
check "QEMU's bitmaps are maintained and stored on del; qemu-img check is clean" bitmaps_maintained
check "a daemon killed while writing leaves the enabled bitmap in use" bitmap_in_use_after_kill
cd / || exit 1
check "no device, daemon or record left" no_leftovers
finish
