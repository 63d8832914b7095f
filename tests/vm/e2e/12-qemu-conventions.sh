#!/bin/bash
# Two of QEMU's conventions the daemon must keep too (issue 22): a relative external
# data file name is relative to the working directory `add` ran in (the daemon itself
# runs in /), and QEMU's persistent bitmaps survive our writes, marked in use, with
# their clusters still referenced.
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

bitmaps_kept_in_use() {
  local dev
  dev=$(add_device -f "$bitmaps") || return 1
  qemu-io -f raw -t none -c 'write -P 0x22 8M 1M' "$dev" >/dev/null || return 1
  "$UQ" del -n "$(dev_id "$dev")" || return 1
  qemu_img_check "$bitmaps" || return 1
  qemu-img info --output=json "$bitmaps" | python3 -c '
import json, sys
bitmaps = json.load(sys.stdin)["format-specific"]["data"]["bitmaps"]
print(bitmaps)
assert sorted(b["name"] for b in bitmaps) == ["b0", "b1"]
assert all("in-use" in b["flags"] for b in bitmaps)'
}

check "a relative data file name is taken from add's working directory" relative_data_file_served
check "QEMU's bitmaps are kept, marked in use; qemu-img check is clean" bitmaps_kept_in_use
cd / || exit 1
check "no device, daemon or record left" no_leftovers
finish
