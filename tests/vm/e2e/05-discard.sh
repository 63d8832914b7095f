#!/bin/bash
# Discard and write-zeroes through the device: blkdiscard frees clusters in the image
# (qemu-img map shows less data), blkdiscard -z reads back as zeros, the queue limits
# advertise the cluster size, fstrim on a mounted ext4 gives the clusters of deleted files
# back (qemu-img check counts fewer allocated clusters), and the image stays consistent
# (qemu-img check).
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

allocated_clusters() {  # allocated_clusters IMAGE: qemu-img check's count
  local n
  n=$(qemu-img check --output=json "$1" | sed -n 's/.*"allocated-clusters": *\([0-9]*\).*/\1/p')
  echo "${n:-0}"
}

# ext4 (mounted without -o discard, so only fstrim discards): files written, deleted,
# fstrim; the deleted files' clusters are freed and the kept files are intact.
fstrim_ext4() {
  local img=$WORK/fstrim.qcow2 dev before after freed i
  qemu-img create -q -f qcow2 "$img" 256M
  dev=$(add_device -f "$img")
  mkfs.ext4 -F -q -E nodiscard "$dev"
  mount -t ext4 -o nodiscard "$dev" "$MNT"
  make_tree "$MNT/keep"
  mkdir "$MNT/gone"
  for i in 1 2 3 4; do head -c $((10 * 1024 * 1024)) /dev/urandom >"$MNT/gone/big$i"; done
  make_tree "$MNT/gone/tree"
  sums_of "$MNT/keep" >"$WORK/keep.sums"
  umount "$MNT"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img" >/dev/null
  before=$(allocated_clusters "$img")

  dev=$(add_device -f "$img")
  mount -t ext4 -o nodiscard "$dev" "$MNT"
  rm -rf "$MNT/gone"
  sync
  fstrim -v "$MNT"
  (cd "$MNT/keep" && sha256sum --quiet -c "$WORK/keep.sums")
  echo "kept files intact after fstrim"
  umount "$MNT"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img"
  after=$(allocated_clusters "$img")
  freed=$(((before - after) * 65536))
  echo "allocated clusters: before $before, after fstrim $after ($((freed / 1024 / 1024)) MiB freed;" \
    "about 45 MiB of files deleted)"
  ((freed >= 36 * 1024 * 1024))
  # Mounted again after del, the kept files still check out.
  dev=$(add_device -f "$img")
  mount -t ext4 -o ro "$dev" "$MNT"
  (cd "$MNT/keep" && sha256sum --quiet -c "$WORK/keep.sums")
  umount "$MNT"
  "$UQ" del -n "$(dev_id "$dev")"
}
check "ext4: delete files, fstrim frees their clusters (qemu-img check), image clean" fstrim_ext4
check "no device, daemon or record left" no_leftovers
finish
