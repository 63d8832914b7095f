#!/bin/bash
# Zero copy on vs off (add --zero-copy), in ONE boot of the VM rig (7.3: AUTO_BUF_REG):
#   VM_KERNEL_VERSION=7.3 tests/vm/run bench/zero-copy-in-vm.sh BIN [ROUNDS]
# A 512 MiB qcow2 image of random data (every cluster allocated, so after the first
# touch every read and write qualifies for zero copy), served with `add -q 1`, and
# fio O_DIRECT io_uring: 4k random reads at QD32, 1 MiB sequential reads and writes at
# QD4, each BENCH_RUNTIME seconds (default 6). Targets alternate within each round: on,
# off, and loop (the kernel loop device with direct I/O on the same data as a raw file,
# the in-kernel bar zero copy aims at).
# Prints per round and target:
#   RESULT ROW TARGET ROUND IOPS MiB/s CPU_MS_PER_GiB   (daemon utime+stime per GiB moved;
#                                                        "-" for loop, whose work is kernel's)
# Under TCG only the ratios within one boot mean anything.
set -euo pipefail
bin=$1 rounds=${2:-2} runtime=${BENCH_RUNTIME:-6}
cd /scratch
head -c 512M /dev/urandom >data.raw
qemu-img convert -f raw -O qcow2 data.raw full.qcow2
sync

run() {  # run ROW MODE ROUND RW BS QD
  local row=$1 mode=$2 round=$3 rw=$4 bs=$5 qd=$6 dev pid t0 t1 out key=read
  [[ $rw == *write ]] && key=write
  if [[ $mode == loop ]]; then
    dev=$(losetup --direct-io=on --show -f data.raw)
    out=$(fio --name=zc --filename="$dev" --size=512M --ioengine=io_uring --direct=1 --rw="$rw" \
      --bs="$bs" --iodepth="$qd" --runtime="$runtime" --time_based=1 --norandommap \
      --output-format=json | jq -r ".jobs[0].$key | \"\(.iops | floor) \(.bw_bytes)\"")
    losetup -d "$dev"
    echo "RESULT $row loop $round ${out% *} $((${out#* } / 1048576)) -"
    return
  fi
  dev=$("$bin" add -f full.qcow2 -q 1 --zero-copy="$mode")
  pid=$("$bin" list --output=json | jq -r --arg d "$dev" '.[] | select(.device == $d) | .pid')
  # Touch the whole device first: the engine publishes every cluster's mapping.
  dd if="$dev" of=/dev/null bs=1M iflag=direct status=none
  t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  out=$(fio --name=zc --filename="$dev" --size=512M --ioengine=io_uring --direct=1 --rw="$rw" \
    --bs="$bs" --iodepth="$qd" --runtime="$runtime" --time_based=1 --norandommap \
    --output-format=json | jq -r ".jobs[0].$key | \"\(.iops | floor) \(.bw_bytes)\"")
  t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  "$bin" del -n "${dev#/dev/ublkb}" >/dev/null
  local iops=${out% *} bw=${out#* }
  local bytes=$((bw * runtime))
  echo "RESULT $row $mode $round $iops $((bw / 1048576)) $(((t1 - t0) * 10 * 1073741824 / (bytes > 0 ? bytes : 1)))"
}

for ((round = 1; round <= rounds; round++)); do
  for mode in on off loop; do run rr4k32 "$mode" "$round" randread 4k 32; done
  for mode in on off loop; do run sr1m4 "$mode" "$round" read 1M 4; done
  for mode in on off loop; do run sw1m4 "$mode" "$round" write 1M 4; done
done
