#!/bin/bash
# Zero copy (add --zero-copy, issue 20; driver/zero_copy.h). Where GET_FEATURES offers
# UBLK_F_AUTO_BUF_REG and UBLK_F_USER_COPY (7.3), add uses them by default: reads and
# writes of allocated plain clusters go between the request's pages and the image file as
# fixed-buffer I/O, everything else through the engine with user copy. Checked on 7.3:
# fio crc32c verify with block sizes 4 KiB to 1 MiB on a zero-copy device and with
# --zero-copy=off (the daemon's log counts the requests served with zero copy: > 0, and 0
# with off); a compressed image and a backing-file image (the paths where the engine
# needs the bytes) read == qemu-img convert -O raw, before and after partial-cluster
# writes; qemu-img check clean after del. On 6.12 (no AUTO_BUF_REG): zero copy is not
# used, --zero-copy=on is refused in one line naming the flag, and the copy path still
# passes the fio verify.
source "$(dirname "$0")/lib.bash"

kernel=$(uname -r | cut -d. -f1,2)
echo "kernel $kernel"

# zero_copied LOG: the requests the daemon served with zero copy (summed over queues),
# from the line it logs at del ("...; with zero copy: N0, N1"); "" when it logged none
# (zero copy off).
zero_copied() {
  { grep 'served queue' "$1" || true; } | { grep -oE 'with zero copy: [0-9, ]+' || true; } |
    tr -c '0-9\n' ' ' | awk '{for (i = 1; i <= NF; i++) s += $i; n++} END {if (n) print s}'
}

# fio_job FILE SEED EXTRA...: writes with crc32c verify in five disjoint ranges at once,
# one block size each (4k, 16k, 64k, 256k random; 1M sequential), iodepth 32.
fio_job() {
  local file=$1 seed=$2
  shift 2
  fio --filename="$file" --direct=1 --ioengine=io_uring --iodepth=32 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=1 --randseed="$seed" "$@" \
    --name=b4k --rw=randwrite --bs=4k --offset=0 --size=4M \
    --name=b16k --rw=randwrite --bs=16k --offset=8M --size=8M \
    --name=b64k --rw=randwrite --bs=64k --offset=24M --size=8M \
    --name=b256k --rw=randwrite --bs=256k --offset=40M --size=16M \
    --name=b1m --rw=write --bs=1M --offset=64M --size=32M
}

# fio_verify MODE KIND: MODE auto|off|default (no --zero-copy: auto); KIND empty|prealloc.
# Two passes with different
# seeds (the second overwrites allocated clusters: zero-copy writes), del, qemu-img check,
# and qemu-img's view of the image passes the second pass's verify-only run.
fio_verify() {
  local mode=$1 kind=$2 img=$WORK/fio-$1-$2.qcow2 dev id log zc
  case $kind in
    empty) "$UQ" create -q "$img" 128M ;;
    prealloc) "$UQ" create -q -o preallocation=metadata "$img" 128M ;;
  esac
  local flag=(--zero-copy="$mode")
  [[ $mode == default ]] && flag=()
  dev=$(add_device -f "$img" "${flag[@]}") || return 1
  id=$(dev_id "$dev")
  log=/run/ublk-qcow2/$id.log
  if [[ $mode != off && $kernel == 7.3 ]]; then
    list_has "$dev" AUTO_BUF_REG && list_has "$dev" USER_COPY || { echo "zero-copy flags missing"; return 1; }
  else
    ! list_has "$dev" AUTO_BUF_REG || { echo "AUTO_BUF_REG with --zero-copy=$mode"; return 1; }
  fi
  for seed in 11 12; do
    if ! fio_job "$dev" "$seed" >"$WORK/fio-$mode-$kind-$seed.out" 2>&1; then
      tail -n 30 "$WORK/fio-$mode-$kind-$seed.out"
      echo "fio (seed $seed) failed on the device"
      return 1
    fi
    grep -qE '^ *read: IOPS=' "$WORK/fio-$mode-$kind-$seed.out" || { echo "no verify pass"; return 1; }
  done
  "$UQ" del -n "$id" || return 1
  cp "$log" "$WORK/fio-$mode-$kind.log"
  grep -E 'zero copy|served queue' "$WORK/fio-$mode-$kind.log" || true
  zc=$(zero_copied "$WORK/fio-$mode-$kind.log")
  if [[ $mode != off && $kernel == 7.3 ]]; then
    grep -q 'zero copy: on;' "$WORK/fio-$mode-$kind.log" && ((${zc:-0} > 0)) ||
      { echo "no request served with zero copy"; return 1; }
  else
    grep -q 'zero copy: off;' "$WORK/fio-$mode-$kind.log" && [[ -z $zc ]] ||
      { echo "zero copy used with --zero-copy=$mode on $kernel"; return 1; }
  fi
  qemu_img_check "$img" >"$WORK/check.out" || { cat "$WORK/check.out"; return 1; }
  qemu-img convert -f qcow2 -O raw "$img" "$WORK/image.raw"
  if ! fio_job "$WORK/image.raw" 12 --verify_only=1 >"$WORK/verify.out" 2>&1; then
    tail -n 30 "$WORK/verify.out"
    echo "fio --verify_only failed on qemu-img's raw copy"
    return 1
  fi
  echo "qemu-img check clean; fio --verify_only passes on qemu-img convert -O raw"
  rm -f "$img" "$WORK/image.raw"
}

# same_as_qemu DEV IMAGE: the device's bytes == qemu-img convert -O raw of IMAGE (which
# the daemon has open: qemu-img reads it with -U).
same_as_qemu() {
  qemu-img convert -U -O raw "$2" "$WORK/qemu.raw" || return 1
  dd if="$1" of="$WORK/dev.raw" bs=1M iflag=direct status=none || return 1
  cmp "$WORK/qemu.raw" "$WORK/dev.raw" || { echo "device != qemu-img convert -O raw"; return 1; }
}

# engine_paths KIND: KIND compressed|backing. The device reads what QEMU reads, twice (the
# second read finds the clusters the first published), then partial-cluster writes (into
# compressed clusters, over the backing file: copy-on-write through the engine), reads
# again (the new clusters with zero copy), del, check, and QEMU reads the same bytes.
engine_paths() {
  local kind=$1 img=$WORK/$1.qcow2 dev id zc
  qemu-img create -q -f raw "$WORK/src.raw" 32M
  qemu-io -f raw -c 'write -P 0x11 0 8M' -c 'write -P 0x22 12M 3M' -c 'write -P 0x33 20M 64k' \
    "$WORK/src.raw" >/dev/null
  case $kind in
    compressed) qemu-img convert -q -c -f raw -O qcow2 "$WORK/src.raw" "$img" ;;
    backing)
      qemu-img convert -q -f raw -O qcow2 "$WORK/src.raw" "$WORK/base.qcow2"
      qemu-img create -q -f qcow2 -b "$WORK/base.qcow2" -F qcow2 "$img"
      qemu-io -f qcow2 -c 'write -P 0x44 4M 1M' "$img" >/dev/null  # some data of its own
      ;;
  esac
  dev=$(add_device -f "$img") || return 1
  id=$(dev_id "$dev")
  same_as_qemu "$dev" "$img" || return 1
  same_as_qemu "$dev" "$img" || return 1
  qemu-io -f raw -t none -c 'write -P 0x55 4100k 8k' -c 'write -P 0x66 12M 4k' \
    -c 'write -P 0x77 20M 512' -c 'write -P 0x88 30M 64k' "$dev" >/dev/null || return 1
  same_as_qemu "$dev" "$img" || return 1
  # 1 MiB reads span compressed (or backing) clusters: the engine's. The cluster written
  # whole at 30M is the image's own now: read alone, it goes with zero copy.
  qemu-io -f raw -t none -c 'read -P 0x88 30M 64k' -c 'read -P 0x88 30M 64k' "$dev" |
    grep -c '^read ' | grep -qx 2 || { echo "the new cluster does not read back"; return 1; }
  "$UQ" del -n "$id" || return 1
  cp "/run/ublk-qcow2/$id.log" "$WORK/$kind.log"
  grep -E 'zero copy|served queue' "$WORK/$kind.log" || true
  zc=$(zero_copied "$WORK/$kind.log")
  if [[ $kernel == 7.3 ]]; then
    ((${zc:-0} > 0)) || { echo "no request served with zero copy"; return 1; }
  fi
  qemu_img_check "$img" >"$WORK/check.out" || { cat "$WORK/check.out"; return 1; }
  qemu-img convert -O raw "$img" "$WORK/qemu.raw"
  qemu-io -f raw -c 'read -P 0x55 4100k 8k' -c 'read -P 0x66 12M 4k' -c 'read -P 0x77 20M 512' \
    -c 'read -P 0x88 30M 64k' -c 'read -P 0x33 20972032 65024' "$WORK/qemu.raw" |
    grep -c '^read ' | grep -qx 5 || { echo "QEMU does not read the writes back"; return 1; }
  echo "device == qemu-img convert -O raw before and after the writes; check clean"
  rm -f "$WORK"/*.raw "$img" "$WORK/base.qcow2"
}

case $kernel in
  7.3)
    check "7.3: --zero-copy=auto: zero copy used; fio verify 4k..1M, empty image; qemu-img view verified" \
      fio_verify auto empty
    check "7.3: the same with add's default (no --zero-copy) on a preallocated image (writes in place from the start)" \
      fio_verify default prealloc
    check "7.3: --zero-copy=off: not used; fio verify 4k..1M; qemu-img view verified" \
      fio_verify off empty
    check "7.3: zero-copy device, compressed image: reads == qemu-img, COW writes" \
      engine_paths compressed
    check "7.3: zero-copy device, backing file: reads == qemu-img, COW writes" \
      engine_paths backing
    on_works() {
      local dev
      dev=$(add_device -f "$WORK/on.qcow2" --zero-copy=on) || return 1
      list_has "$dev" AUTO_BUF_REG
      "$UQ" del -n "$(dev_id "$dev")"
    }
    qemu-img create -q -f qcow2 "$WORK/on.qcow2" 16M
    check "7.3: --zero-copy=on accepted" on_works
    ;;
  6.12)
    qemu-img create -q -f qcow2 "$WORK/on.qcow2" 16M
    expect_error "6.12: add --zero-copy=on refused in one line, exit 1" 1 \
      "$UQ" add -f "$WORK/on.qcow2" --zero-copy=on
    check "6.12: the error names UBLK_F_AUTO_BUF_REG" bash -c \
      "'$UQ' add -f '$WORK/on.qcow2' --zero-copy=on 2>&1 | grep -q UBLK_F_AUTO_BUF_REG"
    check "6.12: nothing created by the refused add" no_leftovers
    check "6.12: default add does not use zero copy; fio verify 4k..1M passes" \
      fio_verify default empty
    check "6.12: compressed image: reads == qemu-img, COW writes" engine_paths compressed
    ;;
  *)
    check "a kernel this test knows (6.12 or 7.3; got $kernel)" false
    ;;
esac
check "no device, daemon or record left" no_leftovers
finish
