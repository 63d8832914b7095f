#!/bin/bash
# Discard and write-zeroes through the device: blkdiscard frees clusters in the image
# (qemu-img map shows less data), blkdiscard -z reads back as zeros, the queue limits
# advertise the cluster size, and the image stays consistent (qemu-img check).
source "$(dirname "$0")/lib.bash"

img=$WORK/discard.qcow2
qemu-img create -q -f qcow2 "$img" 256M

data_bytes() {
  qemu-img map --output=json -f qcow2 "$img" |
    python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'
}

dev=$(add_device -f "$img")
id=$(dev_id "$dev")

limits() {
  local q=/sys/block/ublkb$id/queue
  echo "discard_granularity=$(<$q/discard_granularity) discard_max_bytes=$(<$q/discard_max_bytes)" \
    "write_zeroes_max_bytes=$(<$q/write_zeroes_max_bytes) physical_block_size=$(<$q/physical_block_size)" \
    "optimal_io_size=$(<$q/optimal_io_size) write_cache=$(<$q/write_cache) fua=$(<$q/fua)"
  [[ $(<$q/discard_granularity) == 65536 && $(<$q/write_zeroes_max_bytes) -gt 0 ]]
  [[ $(<$q/physical_block_size) == 4096 && $(<$q/optimal_io_size) == 65536 ]]
  [[ $(<$q/write_cache) == "write back" && $(<$q/fua) == 1 ]]
}
check "queue limits: discard granularity = cluster size, write cache + FUA" limits

fill() {
  dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none
  "$UQ" del -n "$id"
  before=$(data_bytes)
  echo "data after writing 64 MiB: $before bytes"
  ((before >= 64 * 1024 * 1024))
}
check "write 64 MiB" fill
before=$(data_bytes)

discard() {
  dev=$(add_device -f "$img")
  blkdiscard -o 0 -l 32M "$dev"
  # Write-zeroes (no unmap required): must read back as zeros.
  blkdiscard -z -o 48M -l 8M "$dev"
  dd if="$dev" of="$WORK/zeroed" bs=1M skip=48 count=8 iflag=direct status=none
  cmp -n $((8 * 1024 * 1024)) "$WORK/zeroed" /dev/zero
  echo "write-zeroed range reads as zeros"
  # The untouched range keeps its data (not zeros).
  dd if="$dev" of="$WORK/kept" bs=1M skip=40 count=1 iflag=direct status=none
  ! cmp -s -n 1048576 "$WORK/kept" /dev/zero
  "$UQ" del -n "$(dev_id "$dev")"
  local after
  after=$(data_bytes)
  echo "data bytes: before $before, after discarding 32 MiB: $after"
  ((after <= before - 32 * 1024 * 1024))
}
check "blkdiscard frees clusters; blkdiscard -z reads as zeros" discard
check "qemu-img check clean" qemu_img_check "$img"

whole() {
  dev=$(add_device -f "$img")
  blkdiscard "$dev"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img"
  echo "data bytes after discarding everything: $(data_bytes)"
  (($(data_bytes) == 0))
}
check "blkdiscard of the whole device leaves no data, image clean" whole
check "no device, daemon or record left" no_leftovers
finish
