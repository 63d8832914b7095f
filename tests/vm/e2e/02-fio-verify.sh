#!/bin/bash
# fio writes with crc32c verification through the device (io_uring, O_DIRECT, iodepth
# 32): random 4k writes and random 1M writes at the same time, with 1 and 2 hardware
# queues, on an empty image and on a preallocated one (preallocation=metadata). After
# each run: del, qemu-img check clean, and QEMU's view of the image (qemu-img convert
# -O raw) passes fio's verify-only pass with the same job, so the bytes qemu-img reads
# are the bytes fio wrote, and holds nothing but zeros outside the ranges fio wrote.
source "$(dirname "$0")/lib.bash"

# fio_job FILE EXTRA...: the job. Two jobs at once in disjoint ranges, one pinned to each
# CPU (with 2 queues each CPU maps to its own hardware queue). Fixed seeds so that a
# verify-only run regenerates the same offsets and data. EXTRA options are global: they
# go before the first --name (options after a --name belong to that job only).
fio_job() {
  local file=$1
  shift
  fio --filename="$file" --direct=1 --ioengine=io_uring --iodepth=32 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=1 --randseed=4242 "$@" \
    --name=rand4k --rw=randwrite --bs=4k --offset=0 --size=8M --cpus_allowed=0 \
    --name=rand1m --rw=randwrite --bs=1M --offset=96M --size=32M --cpus_allowed=1
}

allocated_clusters() {  # allocated_clusters IMAGE
  local n
  n=$(qemu-img check --output=json "$1" | sed -n 's/.*"allocated-clusters": *\([0-9]*\).*/\1/p')
  echo "${n:-0}"
}

# run KIND QUEUES: KIND is empty or prealloc.
run() {
  local kind=$1 q=$2 img=$WORK/$1-q$2.qcow2 dev id before after t0=$SECONDS
  case $kind in
    empty) "$UQ" create -q "$img" 256M ;;
    prealloc) "$UQ" create -q -o preallocation=metadata "$img" 256M ;;
  esac
  before=$(allocated_clusters "$img")
  dev=$(add_device -f "$img" -q "$q" -d 64)
  id=$(dev_id "$dev")
  echo "$kind image served as $dev with $(ls "/sys/block/ublkb$id/mq" | wc -l) hardware queue(s)"
  [[ $(ls "/sys/block/ublkb$id/mq" | wc -l) == "$q" ]]
  if ! fio_job "$dev" >"$WORK/$kind-q$q.fio" 2>&1; then
    tail -n 30 "$WORK/$kind-q$q.fio"
    echo "fio failed on the device"
    return 1
  fi
  grep -E '^ *(write|read): IOPS=' "$WORK/$kind-q$q.fio"
  grep -qE '^ *read: IOPS=' "$WORK/$kind-q$q.fio"   # the verify pass ran
  "$UQ" del -n "$id"
  [[ ! -e $dev ]]
  if ((q == 2)); then
    grep 'served queue' "/run/ublk-qcow2/$id.log"
    grep -qE 'queue 0: [1-9][0-9]* requests \([0-9]+ on its own thread\), queue 1: [1-9][0-9]* requests' "/run/ublk-qcow2/$id.log"
  fi
  qemu_img_check "$img" >"$WORK/check.out" || { cat "$WORK/check.out"; return 1; }
  grep -E 'allocated|errors' "$WORK/check.out"
  # QEMU's view of the data: fio verifies it (same job, verify only, no writes).
  qemu-img convert -f qcow2 -O raw "$img" "$WORK/image.raw"
  if ! fio_job "$WORK/image.raw" --verify_only=1 >"$WORK/$kind-q$q.verify" 2>&1; then
    tail -n 30 "$WORK/$kind-q$q.verify"
    echo "fio --verify_only failed on qemu-img's raw copy of the image"
    return 1
  fi
  echo "fio --verify_only passes on qemu-img convert -O raw of the image"
  # ... and outside fio's ranges it reads zeros (convert leaves holes for zeros).
  qemu-img map --output=json -f raw "$WORK/image.raw" | python3 -c '
import json, sys
M = 1 << 20
ranges = [(0, 8 * M), (96 * M, 128 * M)]   # the jobs: rand4k, rand1m
data = [(e["start"], e["start"] + e["length"]) for e in json.load(sys.stdin) if e["data"]]
stray = [d for d in data if not any(a <= d[0] and d[1] <= b for a, b in ranges)]
print("data extents of the raw copy: %d, outside fio'"'"'s ranges: %s" % (len(data), stray or "none"))
sys.exit(1 if stray or not data else 0)'
  # Once: the oracle itself works (one flipped byte makes the verify-only run fail).
  if [[ $kind == empty && $q == 1 ]]; then
    printf '\xff' | dd of="$WORK/image.raw" bs=1 seek=5000 conv=notrunc status=none
    if fio_job "$WORK/image.raw" --verify_only=1 >"$WORK/oracle.verify" 2>&1; then
      echo "fio --verify_only missed a corrupted byte"
      return 1
    fi
    echo "(and it fails once a byte is corrupted)"
  fi
  after=$(allocated_clusters "$img")
  echo "allocated clusters: before $before, after $after ($((SECONDS - t0)) s)"
  # Preallocated: every cluster already has a host cluster, writes go in place.
  if [[ $kind == prealloc ]]; then ((after == before)); fi
  rm -f "$WORK/image.raw" "$img"
}

for kind in empty prealloc; do
  for q in 1 2; do
    check "$kind image, $q queue(s): fio randwrite 4k + 1M, iodepth 32, crc32c verify; qemu-img view verified" \
      run "$kind" "$q"
  done
done
check "no device, daemon or record left" no_leftovers
finish
