#!/bin/bash
# `ublk-qcow2 resize -n ID` on a running device (issue 17), through the daemon's control
# socket. The test branches on what the kernel reports (`features --output=json`), never on
# its version: where UPDATE_SIZE is offered (7.3), an ext4 filesystem is grown while mounted
# (resize -n +256M, resize2fs) and a file written past the old end survives del and a second
# add, the image is clean and has the new size; a shrink needs --shrink and then shrinks both;
# verified fio writes on two queues survive rounds of grow and shrink.
# Where it is not (6.12), resize -n fails with one line naming UBLK_F_UPDATE_SIZE, exit 1, and
# neither the device nor the image changes.
source "$(dirname "$0")/lib.bash"

"$UQ" features --output=json >"$WORK/features.json"
offered() { python3 -c 'import json,sys; sys.exit("UPDATE_SIZE" not in json.load(open(sys.argv[1]))["features"])' "$WORK/features.json"; }
if offered; then update_size=yes; else update_size=no; fi
echo "kernel $(uname -r): UPDATE_SIZE offered: $update_size"

MiB=$((1024 * 1024))
img=$WORK/disk.qcow2
qemu-img create -q -f qcow2 "$img" 512M
dev=$("$UQ" add -f "$img")
id=$(dev_id "$dev")
sock=/run/ublk-qcow2/$id.sock

socket_is_private() {
  stat -c '%F %a %U' "$sock"
  [[ $(stat -c '%F %a %U' "$sock") == "socket 600 root" ]]
}
check "the daemon listens on $sock (a socket, mode 600, root's)" socket_is_private

virtual_size() { qemu-img info --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])'; }
virtual_size_is() {  # virtual_size_is IMAGE BYTES
  echo "virtual-size: $(virtual_size "$1")"
  (($(virtual_size "$1") == $2))
}
list_size() {
  "$UQ" list --output=json | python3 -c 'import json,sys
print([d["size"] for d in json.load(sys.stdin) if d["id"] == int(sys.argv[1])][0])' "$1"
}

if [[ $update_size == yes ]]; then
  filesystem_before() {
    # No blocks reserved for root: the free space df shows is all there is.
    mkfs.ext4 -q -F -m 0 "$dev"
    mount "$dev" "$MNT"
    head -c $((8 * MiB)) /dev/urandom >"$MNT/before"
    # Take nearly all the old free space (unwritten extents: no data written), so that
    # the file written after the grow has to go past the old end.
    local free
    free=$(df -B1 --output=avail "$MNT" | tail -1)
    fallocate -l $((free - 4 * MiB)) "$MNT/filler"
    sync
    df -h "$MNT" | tail -1
  }
  check "mkfs.ext4, mount, a file, the old space filled" filesystem_before

  old=$(blockdev --getsize64 "$dev")
  live_grow() {
    local t0 t1
    t0=$(date +%s%N)
    "$UQ" resize -n "$id" +256M
    t1=$(date +%s%N)
    echo "live grow took $(((t1 - t0) / 1000000)) ms (resize -n, wall clock in the VM)"
    grep 'resized' "/run/ublk-qcow2/$id.log"
  }
  check "resize -n $id +256M on the mounted device" live_grow
  grew() {
    local new
    new=$(blockdev --getsize64 "$dev")
    echo "blockdev --getsize64: $old -> $new"
    ((new == old + 256 * MiB))
    echo "list: $(list_size "$id")"
    (($(list_size "$id") == new))
  }
  check "the block device grew by 256 MiB (list agrees)" grew
  grow_ext4() {
    # resize2fs opens the mounted device for writing: the rig's kernels allow it
    # (CONFIG_BLK_DEV_WRITE_MOUNTED, as Debian's kernels do).
    resize2fs "$dev"
    df -h "$MNT" | tail -1
    (($(df -B1 --output=size "$MNT" | tail -1) > 700 * MiB))
  }
  check "resize2fs grows the mounted ext4" grow_ext4
  past_old_end() {
    df -h "$MNT" | tail -1
    head -c $((32 * MiB)) /dev/urandom >"$MNT/after"
    sync
    # Where the file went: at least one extent past the old end (in filesystem blocks).
    filefrag -v "$MNT/after" | awk -v end=$((old / $(stat -fc %S "$MNT"))) '
      $1 ~ /^[0-9]+:$/ { sub(/\.\./, " ", $4); split($4, p, " "); if (p[1] + 0 >= end) past = 1 }
      END { print past ? "extents past the old end" : "no extent past the old end"; exit !past }'
    dd if="$dev" of=/dev/null bs=1M skip=$((old / MiB + 255)) count=1 iflag=direct status=none
  }
  check "a file written past the old end, the device's new last MiB reads" past_old_end
  sums=$(cd "$MNT" && sha256sum before after)
  check "sync, umount, del" bash -c "sync && umount '$MNT' && '$UQ' del -n '$id'"
  check "qemu-img check is clean" qemu_img_check "$img"
  check "the image's virtual size is 768 MiB" virtual_size_is "$img" $((768 * MiB))
  read_back() {
    local dev2
    dev2=$("$UQ" add -f "$img")
    (($(blockdev --getsize64 "$dev2") == 768 * MiB))
    e2fsck -fn "$dev2"
    mount -o ro "$dev2" "$MNT"
    (cd "$MNT" && sha256sum -c <<<"$sums")
    umount "$MNT"
    "$UQ" del -n "$(dev_id "$dev2")"
  }
  check "added again: 768 MiB, e2fsck clean, both files read back" read_back

  # Shrinking: refused without --shrink (nothing changes), then done with it.
  img2=$WORK/shrink.qcow2
  qemu-img create -q -f qcow2 "$img2" 256M
  qemu-io -c 'write -P 0x5a 0 64M' -c 'write -P 0x6b 200M 8M' "$img2" >/dev/null
  dev=$("$UQ" add -f "$img2")
  id=$(dev_id "$dev")
  expect_error "resize -n $id -128M without --shrink: one line, exit 1" 1 "$UQ" resize -n "$id" -- -128M
  size_is() {  # size_is BYTES: the device's size
    echo "blockdev --getsize64: $(blockdev --getsize64 "$dev")"
    (($(blockdev --getsize64 "$dev") == $1))
  }
  check "the device is still 256 MiB" size_is $((256 * MiB))
  live_shrink() {
    "$UQ" resize -n "$id" --shrink -- -128M
    (($(blockdev --getsize64 "$dev") == 128 * MiB))
    (($(list_size "$id") == 128 * MiB))
    head -c $((64 * MiB)) /dev/zero | tr '\0' '\132' >"$WORK/pattern"  # 0x5a
    cmp -n $((64 * MiB)) "$WORK/pattern" "$dev"
  }
  check "resize -n $id --shrink -128M: 128 MiB, the data below kept" live_shrink
  check "del" "$UQ" del -n "$id"
  check "qemu-img check is clean after the shrink" qemu_img_check "$img2"
  check "the image's virtual size is 128 MiB" virtual_size_is "$img2" $((128 * MiB))

  # Under load: fio writes with crc32c verification on two queues while the device grows
  # and shrinks back, round after round, until fio is done; every block reads back right.
  img3=$WORK/load.qcow2
  qemu-img create -q -f qcow2 "$img3" 128M
  dev=$("$UQ" add -f "$img3" -q 2 -d 64)
  id=$(dev_id "$dev")
  resize_under_load() {
    fio --name=load --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 \
      --rw=randwrite --bsrange=4k-64k --size=32M --offset_increment=64M --numjobs=2 \
      --cpus_allowed=0,1 --cpus_allowed_policy=split \
      --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting \
      --output-format=normal >"$WORK/fio.out" 2>&1 &
    local fio_pid=$! rounds=0 rc=0
    while kill -0 "$fio_pid" 2>/dev/null; do
      "$UQ" resize -q -n "$id" +64M || { wait "$fio_pid"; return 1; }
      "$UQ" resize -q -n "$id" --shrink -- -64M || { wait "$fio_pid"; return 1; }
      rounds=$((rounds + 1))
    done
    wait "$fio_pid" || rc=$?
    grep -E '^ *(write|read): IOPS=' "$WORK/fio.out"
    echo "$rounds rounds of resize -n +64M / --shrink -64M while fio ran"
    grep 'resized' "/run/ublk-qcow2/$id.log" | tail -2
    ((rc == 0)) && ! grep -qiE 'verify.*(fail|bad)|crc32c.*mismatch' "$WORK/fio.out"
    ((rounds >= 1)) && (($(blockdev --getsize64 "$dev") == 128 * MiB))
  }
  check "fio (2 queues, verified) while resize -n grows and shrinks back: 128 MiB" resize_under_load
  check "del" "$UQ" del -n "$id"
  check "qemu-img check is clean after resizing under load" qemu_img_check "$img3"
  check "the image's virtual size is 128 MiB" virtual_size_is "$img3" $((128 * MiB))
else
  old=$(blockdev --getsize64 "$dev")
  refused() {
    local err rc=0
    err=$("$UQ" resize -n "$id" +256M 2>&1 >/dev/null) || rc=$?
    echo "$err (exit $rc)"
    ((rc == 1)) && [[ $(grep -c '' <<<"$err") == 1 ]] &&
      [[ $err == "ublk-qcow2: device $id: live resize needs UBLK_F_UPDATE_SIZE (Linux 6.16+), which this kernel's ublk does not offer" ]]
  }
  check "resize -n $id +256M: one line naming UBLK_F_UPDATE_SIZE, exit 1" refused
  unchanged() {
    echo "blockdev --getsize64: $(blockdev --getsize64 "$dev"), list: $(list_size "$id")"
    (($(blockdev --getsize64 "$dev") == old)) && (($(list_size "$id") == old))
  }
  check "the device's size is unchanged" unchanged
  check "del" "$UQ" del -n "$id"
  check "qemu-img check is clean" qemu_img_check "$img"
  check "the image's virtual size is still 512 MiB" virtual_size_is "$img" $((512 * MiB))
fi

# Both kernels: errors before any daemon is asked.
expect_error "resize -n of a device that does not exist: one line, exit 1" 1 "$UQ" resize -n 77 +1M
expect_error "resize -n with an IMAGE too: usage, exit 2" 2 "$UQ" resize -n 0 "$img" +1M
check "no device, daemon, record or socket left" no_leftovers
finish
