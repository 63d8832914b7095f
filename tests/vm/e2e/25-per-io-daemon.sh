#!/bin/bash
# Per-I/O daemons (add --nthreads, issue 20; DeviceOptions::threads_per_queue). Where
# GET_FEATURES offers UBLK_F_PER_IO_DAEMON (7.3), `add -q 1 --nthreads 2` serves one queue
# from two threads, each fetching every other tag: the device has the flag, fio's crc32c
# verify passes at iodepth 32 with and without zero copy, both threads served requests
# (the daemon's log counts them per lane at del), and qemu-img check is clean. Where the
# kernel lacks it (6.12) the option is refused in one line naming the flag, and nothing is
# left. Either way --nthreads that is not a multiple of --queues is an error.
source "$(dirname "$0")/lib.bash"

# lane_requests LOG: "N0 N1 ..." requests per lane from the del line
# ("served queue 0.0: N requests (...), queue 0.1: M requests (...)").
lane_requests() {
  grep -oE 'queue [0-9]+\.[0-9]+: [0-9]+ requests' "$1" | awk '{print $3}' | tr '\n' ' '
}

two_lanes() {  # two_lanes ZERO_COPY
  local img=$WORK/lanes-$1.qcow2 dev id log counts n rc=0
  "$UQ" create -q "$img" 256M || return 1
  dev=$(add_device -f "$img" -q 1 --nthreads 2 --zero-copy="$1") || return 1
  id=$(dev_id "$dev")
  log=/run/ublk-qcow2/$id.log
  serve_two_lanes "$dev" "$1" || rc=1
  "$UQ" del -n "$id" || return 1
  ((rc == 0)) || return 1
  counts=$(lane_requests "$log")
  echo "requests per lane: $counts"
  n=$(wc -w <<<"$counts")
  ((n == 2)) || { echo "wanted two lanes in the log"; return 1; }
  for c in $counts; do ((c > 0)) || { echo "a lane served nothing"; return 1; }; done
  qemu_img_check "$img"
}

serve_two_lanes() {  # serve_two_lanes DEV NAME: the flag, two queue threads, fio verify
  local dev=$1 threads
  list_has "$dev" PER_IO_DAEMON || { echo "no PER_IO_DAEMON flag"; return 1; }
  # Lane 0 runs on queue 0's thread (ublk-q0, made first: the image lives there).
  threads=$(ps -T -p "$(daemon_pid "$(dev_id "$dev")")" -o comm= | tr '\n' ' ')
  [[ " $threads " == *" ublk-q0 "* && " $threads " == *" ublk-q0.1 "* ]] ||
    { echo "threads: $threads"; return 1; }
  if ! fio --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32 --numjobs=2 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=1 --group_reporting \
    --name=w --rw=randwrite --bs=4k --size=32M --offset_increment=64M \
    >"$WORK/fio-$2.out" 2>&1; then
    tail -n 20 "$WORK/fio-$2.out"
    return 1
  fi
}

expect_error "--nthreads 3 -q 2 (not a multiple)" 1 \
  "$UQ" add -f /dev/null -q 2 --nthreads 3
if kernel_has PER_IO_DAEMON; then
  check "one queue, two threads: fio verify, both lanes serve, check clean" two_lanes auto
  check "the same without zero copy" two_lanes off
else
  img=$WORK/refused.qcow2
  "$UQ" create -q "$img" 16M
  before=$(count_block_devices)
  expect_error "--nthreads 2 refused without UBLK_F_PER_IO_DAEMON" 1 \
    "$UQ" add -f "$img" -q 1 --nthreads 2
  check "nothing left" test "$(count_block_devices)" -eq "$before"
fi
check "nothing left" no_leftovers
finish
