#!/bin/bash
# An encrypted (LUKS) image as a block device at queue depth, in ONE boot of the VM rig:
#   tests/vm/run bench/encrypted-in-vm.sh BIN [ROUNDS]
# (qemu-io, the host bench's peer, cannot queue requests: this is issue 18's deep-queue row.)
# A 256 MiB image of random data that qemu-img made with its default encryption
# (aes-256-xts-plain64, sha256; encrypt.iter-time=10), every cluster allocated, and a plain
# copy of it. Targets, alternating within each round:
#   ours-enc   ublk-qcow2 add --key-file KEY -f enc.qcow2 (2 queues)
#   nbd-enc    qemu-nbd --cache=none --aio=io_uring on the same kind of image, kernel nbd
#   ours-plain ublk-qcow2 add -f plain.qcow2 (2 queues): what encryption costs us
# Each writing target gets its own copy, so no target writes over another's data.
# Rows: 4k random reads and writes at QD32, 1 MiB sequential reads at QD4; fio O_DIRECT
# io_uring, BENCH_RUNTIME seconds each (default 6). Prints per round and target:
#   RESULT ROW TARGET ROUND IOPS MiB/s CPU_MS_PER_GiB   (server utime+stime per GiB moved)
# Under TCG only the ratios within one boot mean anything.
set -euo pipefail
bin=$1 rounds=${2:-2} runtime=${BENCH_RUNTIME:-6}
[[ ! -x $bin && -x /.vm-host$bin ]] && bin=/.vm-host$bin
cd /scratch
modprobe nbd 2>/dev/null || true
[[ -b /dev/nbd0 ]] || { echo "encrypted-in-vm: /dev/nbd0 missing" >&2; exit 1; }
printf 'bench-passphrase' >key
obj="secret,id=s,file=key"
head -c 256M /dev/urandom >data.raw
qemu-img convert -f raw -O qcow2 data.raw plain.qcow2
for ((i = 0; i < 20; i++)); do  # QEMU's PBKDF2 CPU-time probe fails now and then
  qemu-img convert -f raw -O qcow2 --object "$obj" \
    -o encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10 data.raw enc-ours.qcow2 &&
    break
done
[[ -f enc-ours.qcow2 ]] || { echo "encrypted-in-vm: qemu-img could not create the image" >&2; exit 1; }
cp enc-ours.qcow2 enc-nbd.qcow2
rm -f data.raw
sync

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start() {  # start TARGET: prints "DEVICE PID"
  local dev pid
  case $1 in
    ours-enc) dev=$("$bin" add --key-file key -f enc-ours.qcow2 -q 2) ;;
    ours-plain) dev=$("$bin" add -f plain.qcow2 -q 2) ;;
    nbd-enc)
      qemu-nbd --object "$obj" --image-opts --cache=none --aio=io_uring --pid-file=nbd.pid \
        -c /dev/nbd0 "driver=qcow2,file.filename=enc-nbd.qcow2,encrypt.key-secret=s"
      for _ in $(seq 50); do [[ -s nbd.pid ]] && break; sleep 0.1; done
      echo "/dev/nbd0 $(<nbd.pid)"
      return
      ;;
  esac
  pid=$("$bin" list --output=json | jq -r --arg d "$dev" '.[] | select(.device == $d) | .pid')
  echo "$dev $pid"
}

stop() {  # stop TARGET DEVICE
  if [[ $1 == nbd-enc ]]; then
    qemu-nbd -d "$2" >/dev/null
    rm -f nbd.pid
  else
    "$bin" del -n "${2#/dev/ublkb}" >/dev/null
  fi
}

run() {  # run ROW TARGET ROUND RW BS QD
  local row=$1 target=$2 round=$3 rw=$4 bs=$5 qd=$6 dev pid t0 t1 out key=read
  [[ $rw == *write ]] && key=write
  read -r dev pid <<<"$(start "$target")"
  t0=$(cpu_ticks "$pid")
  out=$(fio --name=enc --filename="$dev" --size=256M --ioengine=io_uring --direct=1 --rw="$rw" \
    --bs="$bs" --iodepth="$qd" --runtime="$runtime" --time_based=1 --norandommap \
    --output-format=json | jq -r ".jobs[0].$key | \"\(.iops | floor) \(.bw_bytes)\"")
  t1=$(cpu_ticks "$pid")
  stop "$target" "$dev"
  local iops=${out% *} bw=${out#* }
  local bytes=$((bw * runtime))
  echo "RESULT $row $target $round $iops $((bw / 1048576)) $(((t1 - t0) * 10 * 1073741824 / (bytes > 0 ? bytes : 1)))"
}

targets=(ours-enc nbd-enc ours-plain)
for ((round = 1; round <= rounds; round++)); do
  # Rotate the order each round, so no target always runs first (or last) after the others.
  order=("${targets[@]:round%3}" "${targets[@]:0:round%3}")
  for t in "${order[@]}"; do run rr4k32 "$t" "$round" randread 4k 32; done
  for t in "${order[@]}"; do run rw4k32 "$t" "$round" randwrite 4k 32; done
  for t in "${order[@]}"; do run sr1m4 "$t" "$round" read 1M 4; done
done
