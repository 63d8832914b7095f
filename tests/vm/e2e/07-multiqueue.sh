#!/bin/bash
# Two hardware queues under concurrent load: fio writes with verification from two jobs
# (one per CPU, so both queues carry requests: those on clusters the engine has published
# stay on their queue's thread, the rest cross to queue 0's), reads it
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
  # Both queues carried requests, and queue 1 served some on its own thread
  # (published clusters) (the daemon logs its per-queue counts at exit).
  grep 'served queue' "/run/ublk-qcow2/$(dev_id "$dev").log"
  grep -qE 'queue 0: [1-9][0-9]* requests \([0-9]+ on its own thread\), queue 1: [1-9][0-9]* requests \([1-9][0-9]* on its own thread\)' \
    "/run/ublk-qcow2/$(dev_id "$dev").log"
}
check "after del: image clean, contents equal the device's, both queues used, queue 1 on its own thread" contents

# Remapping under requests on another queue's thread: on CPU 1, fio keeps reading and
# overwriting region B, mostly on queue 1's own thread once its clusters are published,
# while blkdiscard frees B over and over (each discard must wait for the requests using
# the old mapping); the freed clusters are reused by verified writes to region A on
# CPU 0. Had a write landed in a freed cluster, A would fail verification.
img2=$WORK/race.qcow2
qemu-img create -q -f qcow2 "$img2" 256M
dev2=$(add_device -f "$img2" -q 2 -d 64)
discard_race() {
  local mib=$((1 << 20))
  fio --name=b --filename="$dev2" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randrw \
    --bs=4k --offset=128M --size=16M --time_based --runtime=12 --cpus_allowed=1 \
    --output-format=terse >"$WORK/fio-b.out" 2>&1 &
  local fio_b=$! rounds=0
  sleep 2
  fio --name=a --filename="$dev2" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite \
    --bsrange=4k-64k --offset=0 --size=24M --cpus_allowed=0 --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --output-format=normal >"$WORK/fio-a.out" 2>&1 &
  local fio_a=$!
  while kill -0 "$fio_b" 2>/dev/null; do
    blkdiscard -o $((128 * mib)) -l $((16 * mib)) "$dev2"
    rounds=$((rounds + 1))
    sleep 0.3
  done
  wait "$fio_b" || { cat "$WORK/fio-b.out"; return 1; }
  wait "$fio_a" || { cat "$WORK/fio-a.out"; return 1; }
  echo "region B discarded $rounds times while in use"
  grep -E '^ *(write|read): IOPS=' "$WORK/fio-a.out"
  if grep -qiE 'verify.*(fail|bad)|crc32c.*mismatch' "$WORK/fio-a.out"; then
    cat "$WORK/fio-a.out"
    return 1
  fi
  [[ $rounds -ge 3 ]]
  "$UQ" del -n "$(dev_id "$dev2")"
  qemu_img_check "$img2"
  grep 'served queue' "/run/ublk-qcow2/$(dev_id "$dev2").log"
  grep -qE 'queue 1: [1-9][0-9]* requests \([1-9][0-9]* on its own thread\)' \
    "/run/ublk-qcow2/$(dev_id "$dev2").log"
}
check "discards of clusters in use on queue 1's thread: verified data elsewhere intact, image clean" discard_race
check "no device, daemon or record left" no_leftovers
finish
