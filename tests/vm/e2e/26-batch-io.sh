#!/bin/bash
# Batch I/O commands (add --batch-io, issue 20; "Batch commands" in driver/queue.h). Where
# GET_FEATURES offers UBLK_F_BATCH_IO (7.3), the queues ready their tags with one
# PREP_IO_CMDS, take requests from a multishot FETCH_IO_CMDS and complete them with
# COMMIT_IO_CMDS: the device has the flag, fio's crc32c verify passes at iodepth 32 with
# block sizes 4 KiB to 1 MiB, with and without zero copy, ext4 on it survives a remount
# with its files intact, a writer's fio verify passes across two SIGKILLs of the daemon
# and `recover` (the new daemon readies the tags with PREP again), `del --force` under a
# fio load returns promptly with the daemon gone and the image closed cleanly (the
# kernel ends the fetch with ABORT while requests are being served; their commits still
# go out), qemu-img check is clean, and upgrade is refused in one line. Where the kernel lacks it (6.12) --batch-io is refused in one line
# naming the flag, and nothing is left.
source "$(dirname "$0")/lib.bash"

batch_fio() {  # batch_fio ZERO_COPY
  local img=$WORK/batch-$1.qcow2 dev id rc=0
  "$UQ" create -q "$img" 256M || return 1
  dev=$(add_device -f "$img" --batch-io --zero-copy="$1") || return 1
  id=$(dev_id "$dev")
  list_has "$dev" BATCH_IO || { echo "no BATCH_IO flag"; rc=1; }
  if ((rc == 0)) && ! fio --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=1 \
    --name=b4k --rw=randwrite --bs=4k --offset=0 --size=8M \
    --name=b64k --rw=randwrite --bs=64k --offset=16M --size=16M \
    --name=b1m --rw=write --bs=1M --offset=64M --size=64M \
    >"$WORK/fio-batch-$1.out" 2>&1; then
    tail -n 20 "$WORK/fio-batch-$1.out"
    rc=1
  fi
  "$UQ" del -n "$id" || return 1
  ((rc == 0)) || return 1
  qemu_img_check "$img"
}

batch_ext4() {
  local img=$WORK/batch-fs.qcow2 dev id mnt=$WORK/mnt-batch before after
  "$UQ" create -q "$img" 256M || return 1
  dev=$(add_device -f "$img" --batch-io) || return 1
  id=$(dev_id "$dev")
  mkfs.ext4 -q -F "$dev" || return 1
  mkdir -p "$mnt" && mount "$dev" "$mnt" || return 1
  make_tree "$mnt/t"
  before=$(sums_of "$mnt/t")
  umount "$mnt" && mount "$dev" "$mnt" || return 1
  after=$(sums_of "$mnt/t")
  umount "$mnt"
  [[ $before == "$after" ]] || { echo "files changed across a remount"; return 1; }
  e2fsck -fn "$dev" >"$WORK/fsck-batch.out" 2>&1 || { cat "$WORK/fsck-batch.out"; return 1; }
  expect_error "upgrade of a --batch-io device refused" 1 "$UQ" upgrade -n "$id"
  "$UQ" del -n "$id" || return 1
  qemu_img_check "$img"
}

batch_recover() {
  local img=$WORK/batch-rec.qcow2 dev id fio_pid k
  "$UQ" create -q "$img" 256M || return 1
  dev=$(add_device -f "$img" --batch-io) || return 1
  id=$(dev_id "$dev")
  fio_verify_start "$dev" 48M
  for k in 1 2; do
    wait_writes "$id" 300 120 || { kill "$fio_pid"; return 1; }
    kill_and_recover "$id" "$dev" || { kill "$fio_pid"; return 1; }
    list_has "$dev" BATCH_IO || { kill "$fio_pid"; echo "no BATCH_IO flag"; return 1; }
  done
  fio_verify_finish "$dev" 48M "the last recover" || return 1
  "$UQ" del -n "$id" || return 1
  qemu_img_check "$img"
}

batch_del_under_load() {
  local img=$WORK/batch-load.qcow2 dev id pid load_pid rc=0 i state
  "$UQ" create -q "$img" 256M || return 1
  dev=$(add_device -f "$img" --batch-io -d 64) || return 1
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  fio --name=load --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32 \
    --rw=randwrite --bs=4k --size=128M --time_based --runtime=120 >"$WORK/batch-load.fio" 2>&1 &
  load_pid=$!
  wait_writes "$id" 500 60 || { kill "$load_pid"; return 1; }
  "$UQ" del --force -n "$id" || rc=$?
  for ((i = 0; i < 200; i++)); do
    state=$(ps -o stat= -p "$load_pid" 2>/dev/null || true)
    [[ -z $state || $state == Z* ]] && break
    sleep 0.1
  done
  if [[ -n $state && $state != Z* ]]; then
    kill -KILL "$load_pid"
    echo "fio still running 20 s after del"
    return 1
  fi
  wait "$load_pid" || true
  ((rc == 0)) || { echo "del exited $rc"; return 1; }
  wait_gone "/proc/$pid" 5 || { echo "daemon $pid still running"; return 1; }
  [[ ! -e $dev && ! -e /run/ublk-qcow2/$id.json ]] || { echo "device or record left"; return 1; }
  grep -q 'image closed cleanly' "/run/ublk-qcow2/$id.log" || return 1
  echo "del --force under load: fio ended, daemon gone, image closed cleanly"
  qemu_img_check "$img"
}

if kernel_has BATCH_IO; then
  check "batch commands: fio verify 4k-1M, zero copy" batch_fio on
  check "batch commands: fio verify 4k-1M, no zero copy" batch_fio off
  check "batch commands: ext4, remount, fsck, upgrade refused" batch_ext4
  check "batch commands: fio verify across 2 SIGKILL + recover" batch_recover
  check "batch commands: del --force under fio load" batch_del_under_load
else
  img=$WORK/refused.qcow2
  "$UQ" create -q "$img" 16M
  before=$(count_block_devices)
  expect_error "--batch-io refused without UBLK_F_BATCH_IO" 1 "$UQ" add -f "$img" --batch-io
  check "nothing left" test "$(count_block_devices)" -eq "$before"
fi
check "nothing left" no_leftovers
finish
