#!/bin/bash
# Compressed clusters (zlib and zstd, written by qemu-img convert -c) and extended L2
# entries (64k clusters of 32 subclusters over a backing file): the device reads exactly
# what qemu-img reads; partial writes (O_DIRECT, 512-byte aligned, inside and across
# compressed / partly allocated / zero clusters) read back through the device, and after
# del the image passes qemu-img check and qemu-img convert -O raw equals the old content
# with the writes applied. Then fio writes into the same clusters concurrently (iodepth
# 32), verified through the device and, after del, on qemu-img's copy.
source "$(dirname "$0")/lib.bash"

K=1024
C=$((64 * K))  # cluster size

# An 8 MiB raw file, one kind of content per 64k cluster (index mod 5): zeros, random
# bytes (do not compress: qemu-img stores them uncompressed), base64 text, a short
# repeated pattern, and half text / half zeros.
python3 - "$WORK/source.raw" <<'PY'
import base64, random, sys
r = random.Random(20240501)
C = 65536
out = bytearray()
for i in range(128):
    kind = i % 5
    if kind == 0:
        out += bytes(C)
    elif kind == 1:
        out += r.randbytes(C)
    elif kind == 2:
        out += base64.b64encode(r.randbytes(C * 3 // 4))
    elif kind == 3:
        out += ((b"cluster %06d " % i) * C)[:C]
    else:
        out += base64.b64encode(r.randbytes(C * 3 // 8)) + bytes(C // 2)
assert len(out) == 128 * C
open(sys.argv[1], "wb").write(out)
PY

# patch DEV EXPECTED OFFSET LENGTH: writes LENGTH random bytes at OFFSET to DEV with
# O_DIRECT (both multiples of 512) and the same bytes into the file EXPECTED.
patch() {
  local dev=$1 expected=$2 off=$3 len=$4 p=$WORK/patch
  head -c "$len" /dev/urandom >"$p"
  dd if="$p" of="$dev" bs=512 seek=$((off / 512)) oflag=direct conv=fsync,notrunc status=none
  dd if="$p" of="$expected" bs=512 seek=$((off / 512)) conv=notrunc status=none
}

# same_as_device DEV FILE: the device's bytes (O_DIRECT reads, no page cache) == FILE.
same_as_device() {
  dd if="$1" of="$WORK/device.raw" bs=1M iflag=direct status=none
  cmp "$WORK/device.raw" "$2"
  rm -f "$WORK/device.raw"
}

compressed_clusters() {  # compressed_clusters IMAGE
  local n
  n=$(qemu-img check --output=json "$1" | sed -n 's/.*"compressed-clusters": *\([0-9]*\).*/\1/p')
  echo "${n:-0}"
}

compressed() {  # compressed zlib|zstd
  local type=$1 img=$WORK/$1.qcow2 ref=$WORK/$1.ref.raw expected=$WORK/$1.expected.raw dev n
  qemu-img convert -c -f raw -O qcow2 -o compression_type="$type" "$WORK/source.raw" "$img"
  qemu-img info "$img" | grep -q "compression type: $type"
  n=$(compressed_clusters "$img")
  echo "$type image: $n compressed clusters of 128"
  ((n >= 50))
  qemu-img convert -f qcow2 -O raw "$img" "$ref"
  cmp "$ref" "$WORK/source.raw"
  dev=$(add_device -f "$img")
  same_as_device "$dev" "$ref"
  echo "$dev reads exactly qemu-img convert -O raw of the image"
  cp "$ref" "$expected"
  # Cluster kinds: i%5 == 2, 3, 4 are compressed, 1 is stored uncompressed, 0 is zero.
  patch "$dev" "$expected" $((2 * C + 4 * K)) $((4 * K))      # inside a compressed cluster
  patch "$dev" "$expected" $((3 * C + 512)) 512               # 512 bytes, not 4k-aligned
  patch "$dev" "$expected" $((7 * C + 60 * K)) $((8 * K))     # across compressed 7 and 8
  patch "$dev" "$expected" $((9 * C)) $((32 * K))             # first half of half-zero 9
  patch "$dev" "$expected" $((13 * C + 63 * K)) $((3 * K))    # compressed 13 into 14 (text)
  patch "$dev" "$expected" $((6 * C + 16 * K)) $((4 * K))     # the uncompressed one
  patch "$dev" "$expected" $((5 * C + 8 * K)) $((4 * K))      # a zero cluster
  patch "$dev" "$expected" $((22 * C)) "$C"                   # a whole compressed cluster
  patch "$dev" "$expected" $((100 * C - 1536)) $((2 * K))     # across 99 (text) and 100 (zero)
  # The same write twice into one compressed cluster, then an overlapping one.
  patch "$dev" "$expected" $((27 * C + 1 * K)) $((2 * K))
  patch "$dev" "$expected" $((27 * C + 40 * K)) $((2 * K))
  patch "$dev" "$expected" $((27 * C + 2 * K)) $((40 * K))
  same_as_device "$dev" "$expected"
  echo "the device reads back the writes and the untouched bytes around them"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img"
  qemu-img convert -f qcow2 -O raw "$img" "$WORK/$type.after.raw"
  cmp "$WORK/$type.after.raw" "$expected"
  echo "after del: qemu-img convert -O raw == old content + the writes;" \
    "$(compressed_clusters "$img") compressed clusters left"
  rm -f "$ref" "$expected" "$WORK/$type.after.raw"
}

extended_l2() {
  local base=$WORK/base.qcow2 img=$WORK/extl2.qcow2 ref=$WORK/extl2.ref.raw
  local expected=$WORK/extl2.expected.raw dev base_sum
  qemu-img convert -f raw -O qcow2 "$WORK/source.raw" "$base"
  base_sum=$(sha256sum <"$base")
  qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b "$base" -F qcow2 "$img"
  qemu-img info "$img" | grep -q 'extended l2: true'
  # Some subclusters (2k each) allocated, some zero, the rest read from the base.
  qemu-io -f qcow2 -c 'write -P 0x11 6k 4k' -c 'write -z 70k 2k' -c 'write -P 0x22 128k 64k' \
    -c 'write -P 0x33 200k 10k' -c 'write -z 512k 64k' -c 'write -P 0x44 1030k 1k' \
    -c 'write -z 2050k 4k' "$img" >/dev/null
  qemu-img map -f qcow2 "$img" >"$WORK/extl2.map"
  head -n 12 "$WORK/extl2.map"
  qemu-img convert -f qcow2 -O raw "$img" "$ref"
  dev=$(add_device -f "$img")
  same_as_device "$dev" "$ref"
  echo "$dev reads exactly qemu-img convert -O raw of the image"
  cp "$ref" "$expected"
  patch "$dev" "$expected" $((10 * K)) $((4 * K))          # unallocated subclusters of 0
  patch "$dev" "$expected" $((69 * K)) $((2 * K))          # over the zero subcluster's edge
  patch "$dev" "$expected" $((150 * K)) 512                # inside the full cluster 2
  patch "$dev" "$expected" $((250 * K)) $((8 * K))         # across clusters 3 and 4
  patch "$dev" "$expected" $((520 * K)) $((4 * K))         # inside the zero cluster 8
  patch "$dev" "$expected" $((1026 * K + 512)) $((1 * K))  # next to a 1k write, unaligned
  patch "$dev" "$expected" $((2049 * K)) $((2 * K))        # half of a zero subcluster range
  patch "$dev" "$expected" $((3 * 1024 * K + 33 * K)) $((62 * K))  # most of an unallocated cluster
  same_as_device "$dev" "$expected"
  echo "the device reads back the writes, the base's bytes and the zeros around them"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img"
  qemu-img convert -f qcow2 -O raw "$img" "$WORK/extl2.after.raw"
  cmp "$WORK/extl2.after.raw" "$expected"
  echo "after del: qemu-img convert -O raw == old content + the writes"
  [[ "$(sha256sum <"$base")" == "$base_sum" ]]
  echo "the base image is unchanged"
  rm -f "$ref" "$expected" "$WORK/extl2.after.raw"
}

# concurrent IMAGE OFFSET SIZE BS: fio random writes of BS bytes at iodepth 32 over
# [OFFSET, OFFSET+SIZE) of the device serving IMAGE, so that many writes into the same
# cluster are in flight at once, verified (crc32c) through the device; after del the image
# is clean, fio's verify-only pass accepts qemu-img's raw copy, and outside the range the
# copy still equals source.raw.
concurrent() {
  local img=$1 off=$2 size=$3 bs=$4 dev job
  job=(--direct=1 --ioengine=io_uring --iodepth=32 --verify=crc32c --do_verify=1
    --verify_fatal=1 --randrepeat=1 --randseed=77 --name=concurrent --rw=randwrite
    --bs="$bs" --offset="$off" --size="$size")
  dev=$(add_device -f "$img")
  if ! fio --filename="$dev" "${job[@]}" >"$WORK/concurrent.fio" 2>&1; then
    tail -n 20 "$WORK/concurrent.fio"
    return 1
  fi
  grep -E '^ *(write|read): IOPS=' "$WORK/concurrent.fio"
  "$UQ" del -n "$(dev_id "$dev")"
  qemu_img_check "$img"
  qemu-img convert -f qcow2 -O raw "$img" "$WORK/concurrent.raw"
  if ! fio --filename="$WORK/concurrent.raw" --verify_only=1 "${job[@]}" >"$WORK/concurrent.verify" 2>&1; then
    tail -n 20 "$WORK/concurrent.verify"
    echo "fio --verify_only failed on qemu-img convert -O raw of the image"
    return 1
  fi
  echo "fio --verify_only passes on qemu-img convert -O raw of the image"
  cmp -n "$off" "$WORK/concurrent.raw" "$WORK/source.raw"
  cmp -i $((off + size)) "$WORK/concurrent.raw" "$WORK/source.raw"
  echo "outside fio's range the image still holds the old bytes"
  rm -f "$WORK/concurrent.raw"
}

compressed_concurrent() {
  local img=$WORK/concurrent-zstd.qcow2
  qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$WORK/source.raw" "$img"
  echo "$(compressed_clusters "$img") compressed clusters before"
  # 4k writes over 64 clusters (zero, uncompressed and compressed ones).
  concurrent "$img" $((40 * C)) $((64 * C)) 4k
  echo "$(compressed_clusters "$img") compressed clusters after"
}

extl2_concurrent() {
  local img=$WORK/concurrent-extl2.qcow2
  qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b "$WORK/base.qcow2" -F qcow2 "$img"
  # 2k writes (one subcluster each) over 32 clusters of data from the base.
  concurrent "$img" $((64 * C)) $((32 * C)) 2k
}

check "zlib-compressed image: reads equal qemu-img's; partial writes; clean; contents" compressed zlib
check "zstd-compressed image: reads equal qemu-img's; partial writes; clean; contents" compressed zstd
check "extended L2 overlay over a base: reads equal qemu-img's; partial writes; clean; contents" extended_l2
check "zstd-compressed image: concurrent 4k writes into the same clusters (fio, iodepth 32)" compressed_concurrent
check "extended L2 overlay: concurrent 2k subcluster writes into the same clusters (fio, iodepth 32)" extl2_concurrent
check "no device, daemon or record left" no_leftovers
finish
