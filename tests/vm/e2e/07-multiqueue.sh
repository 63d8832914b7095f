#!/bin/bash
# Two hardware queues under concurrent load: fio writes with verification from two jobs
# (one per CPU, so both queues carry requests that cross to queue 0's thread), reads it
# all back and verifies; then the image passes qemu-img check and its contents equal
# what the device showed.
source "$(dirname "$0")/lib.bash"

img=$WORK/mq.qcow2
qemu-img create -q -f qcow2 "$img" 256M
dev=$(add_device -f "$img" -q 2 -d 64)

fio_verify() {
  echo "served as $dev with $(ls /sys/block/$(basename "$dev")/mq | wc -l) hardware queues"
  fio --name=mq --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 \
    --rw=randwrite --bs=4k,64k --bsrange=4k-128k --size=32M --offset_increment=64M \
    --numjobs=2 --cpus_allowed=0,1 --cpus_allowed_policy=split \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting \
    --output-format=normal >"$WORK/fio.out" 2>&1
  grep -E '^ *(write|read): IOPS=' "$WORK/fio.out"
  ! grep -qiE 'verify.*(fail|bad)|crc32c.*mismatch' "$WORK/fio.out"
}
check "fio: 2 jobs on 2 CPUs, random writes of 4k-128k, verified (crc32c)" fio_verify

contents() {
  qemu-img convert -f raw -O raw "$dev" "$WORK/device.raw"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img"
  qemu-img convert -f qcow2 -O raw "$img" "$WORK/image.raw"
  cmp "$WORK/device.raw" "$WORK/image.raw"
  echo "device contents == image contents"
  # Both queues carried requests (the daemon logs its per-queue counts at exit).
  grep 'served queue' "/run/ublk-qcow2/$(dev_id "$dev").log"
  grep -qE 'queue 0: [1-9][0-9]* requests, queue 1: [1-9][0-9]* requests' "/run/ublk-qcow2/$(dev_id "$dev").log"
}
check "after del: image clean, contents equal the device's, both queues used" contents
check "no device, daemon or record left" no_leftovers
finish
