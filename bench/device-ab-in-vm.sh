#!/bin/bash
# The guest half of bench/device-ab.sh (see there); runs inside tests/vm/run.
#   device-ab-in-vm.sh BIN...   with AB_RW, AB_BS, AB_QD, AB_ROUNDS, AB_MODE, AB_RUNTIME,
#                               AB_RATE, AB_CLUSTER
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.bash
source "$ROOT/bench/lib.bash"
cd /scratch

rw=${AB_RW:-randread} bs=${AB_BS:-4k} qd=${AB_QD:-1} rounds=${AB_ROUNDS:-3}
runtime=${AB_RUNTIME:-6}
rate=()
[[ -n ${AB_RATE:-} ]] && rate=(--rate_iops="$AB_RATE")
key="read"
[[ $rw == *write ]] && key="write"

head -c 512M /dev/urandom >data.raw
qemu-img convert -f raw -O qcow2 data.raw full.qcow2
qemu-img create -q -f qcow2 empty.qcow2 512M
sync

# job TARGET: prints "IOPS clat_us=MEAN" for one fio run on TARGET.
job() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  fio --name=ab --filename="$1" --size=512M --ioengine=io_uring --direct=1 --rw="$rw" \
    --bs="$bs" --iodepth="$qd" --runtime="$runtime" --time_based=1 --ramp_time=1 \
    --norandommap "${rate[@]}" --output-format=json |
    jq -r ".jobs[0].$key | \"\(.iops | floor) clat_us=\(.clat_ns.mean / 1000 | floor)\""
}

# ours BIN IMAGE NAME ROUND [ADD_FLAG...]: one fio run on a device serving IMAGE, with the
# daemon's CPU.
ours() {
  local bin=${1%%,*} image=$2 name=$3 round=$4 dev pid t0 t1 result flags=()
  # BIN,FLAG,FLAG: the target's own add flags (device-ab.sh)
  [[ $1 == *,* ]] && IFS=, read -r -a flags <<<"${1#*,}"
  dev=$("$bin" add -f "$image" -q 1 "${flags[@]}" "${@:5}")
  pid=$(bench_daemon_pid "$bin" "$dev")
  # (no process substitution: the guest has no /dev/fd)
  t0=$(awk '{print $14, $15}' "/proc/$pid/stat")
  result=$(job "$dev")
  t1=$(awk '{print $14, $15}' "/proc/$pid/stat")
  "$bin" del -n "${dev#/dev/ublkb}" >/dev/null
  echo "RESULT round $round $name $result utime=$((${t1% *} - ${t0% *})) stime=$((${t1#* } - ${t0#* }))"
}

loop=$(losetup -f --show --direct-io=on data.raw)
trap 'losetup -d "$loop"' EXIT
if [[ ${AB_MODE:-full} == latency ]]; then
  rw=randread bs=4k qd=1 key="read"
  # null_blk is built in (tests/vm/ublk-kernel.config) and makes /dev/nullb0 at boot.
  for ((round = 1; round <= rounds; round++)); do
    echo "RESULT round $round raw-file $(job /scratch/data.raw)"
    [[ -e /dev/nullb0 ]] && echo "RESULT round $round null_blk $(job /dev/nullb0)"
    echo "RESULT round $round loop $(job "$loop")"
    ours "$1" /scratch/full.qcow2 ours-full "$round"
    ours "$1" /scratch/empty.qcow2 ours-empty "$round"
  done
  exit 0
fi
if [[ ${AB_MODE:-full} == alloc ]]; then
  # Writes into a new empty image, with recovery (the default: metadata in the file before
  # the acknowledgement) and without; the first write to a cluster allocates it.
  for ((round = 1; round <= rounds; round++)); do
    for bin in "$@"; do
      for recovery in reissue off; do
        rm -f alloc.qcow2
        qemu-img create -q -f qcow2 -o cluster_size="${AB_CLUSTER:-64k}" alloc.qcow2 512M
        ours "$bin" /scratch/alloc.qcow2 "$(basename "$bin" | sed 's/,--/,/g')-recovery-$recovery" "$round" \
          --recovery="$recovery"
        qemu-img check -q alloc.qcow2 || echo "RESULT round $round check-failed $recovery"
      done
    done
  done
  exit 0
fi
for ((round = 1; round <= rounds; round++)); do
  echo "RESULT round $round loop $(job "$loop")"
  for bin in "$@"; do
    ours "$bin" /scratch/full.qcow2 "$(basename "$bin" | sed 's/,--/,/g')" "$round"
  done
done
