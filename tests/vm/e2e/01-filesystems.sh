#!/bin/bash
# ext4 and XFS on a served qcow2 image survive a full cycle: add, mkfs, mount, write a
# tree of random files, umount, del (the image must then pass qemu-img check), add
# again, mount, and every file's checksum matches.
source "$(dirname "$0")/lib.bash"

roundtrip() {  # roundtrip ext4|xfs
  local fs=$1 img=$WORK/$1.qcow2 dev
  qemu-img create -q -f qcow2 "$img" 1G
  dev=$(add_device -f "$img")
  echo "served as $dev"
  case $fs in
    ext4) mkfs.ext4 -F -q "$dev" ;;
    xfs) mkfs.xfs -f -q "$dev" ;;
  esac
  mount -t "$fs" "$dev" "$MNT"
  make_tree "$MNT/tree"
  sums_of "$MNT" >"$WORK/$fs.sums"
  echo "$(wc -l <"$WORK/$fs.sums") files, $(du -sh "$MNT/tree" | cut -f1)"
  umount "$MNT"
  "$UQ" del -n "$(dev_id "$dev")"
  [[ ! -e $dev ]] || { echo "$dev still exists after del"; return 1; }
  qemu_img_check "$img"

  dev=$(add_device -f "$img")
  mount -t "$fs" "$dev" "$MNT"
  (cd "$MNT" && sha256sum --quiet -c "$WORK/$fs.sums")
  echo "all checksums match after re-adding"
  umount "$MNT"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img"
}

check "ext4: mkfs, write tree, del, check, re-add, verify" roundtrip ext4
check "xfs: mkfs, write tree, del, check, re-add, verify" roundtrip xfs
check "no device, daemon or record left" no_leftovers
finish
