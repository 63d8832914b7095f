#!/bin/bash
# What persistent dirty bitmaps cost a write (issue 16's target: two enabled bitmaps take at
# most 5% of the IOPS). ublk-qcow2 bench and qemu-img bench, same flags, -t none -i io_uring,
# on the same image with no bitmap and with two enabled ones (qemu-img bitmap --add): 4 KiB
# random in-place writes at depth 1 and 32 on an allocated 1 GiB image, and 4 KiB
# allocating writes at depth 32 on a fresh one. Each row: the median of BENCH_REPEAT runs
# (default 3), the images made afresh for every run, the tools and bitmap counts interleaved.
#
# Usage: bench/bitmaps.sh [BINARY] [WORKDIR]   (default: a -c opt build, /var/tmp/...)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "bitmaps: $*" >&2; }
source "$ROOT/bench/lib.bash"
bin=$(realpath "${1:-$(bench_binary)}")
work=${2:-/var/tmp/ublk-qcow2-bench-bitmaps}
repeat=${BENCH_REPEAT:-3}
mkdir -p "$work"
cd "$work"

if [[ ! -f full.qcow2 ]]; then
  log "making an allocated 1 GiB image"
  qemu-img create -q -f qcow2 -o cluster_size=64k full.qcow2 1G
  head -c 1G /dev/urandom >data.raw
  qemu-img convert -n -f raw -O qcow2 data.raw full.qcow2
  rm -f data.raw
fi

# image KIND BITMAPS: a fresh copy (allocated) or a new empty image with that many bitmaps.
image() {
  rm -f img.qcow2
  if [[ $1 == allocated ]]; then
    cp --sparse=always full.qcow2 img.qcow2
  else
    qemu-img create -q -f qcow2 -o cluster_size=64k img.qcow2 1G
  fi
  for ((b = 0; b < $2; b++)); do qemu-img bitmap --add img.qcow2 "b$b"; done
  # The copy's page cache written back now, not under the O_DIRECT run that follows.
  sync
}

# iops TOOL DEPTH COUNT: one run's IOPS on img.qcow2. The "random" offsets are a scattering
# step, as in bench/host.sh: qemu-img bench has no random mode, and 4096*100003 walks a 1 GiB
# image in a fixed pseudo-random order, one 4 KiB block per cluster-sized stride or so.
iops() {
  local flags=(-t none -i io_uring -d "$2" -c "$3" -s 4096 -S $((4096 * 100003)) -w)
  case $1 in
    ours) "$bin" bench -q "${flags[@]}" img.qcow2 | sed -n 's/^IOPS: \([0-9]*\).*/\1/p' ;;
    qemu) qemu-img bench -f qcow2 "${flags[@]}" img.qcow2 |
      awk -v n="$3" '/^Run completed in/ {printf "%.0f\n", ($4 > 0 ? n / $4 : 0)}' ;;
  esac
}

median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

printf '| workload | depth | ours, no bitmap | ours, 2 bitmaps | ours 2/0 | qemu-img, no bitmap | qemu-img, 2 bitmaps | qemu-img 2/0 |\n'
printf '|---|---:|---:|---:|---:|---:|---:|---:|\n'
for row in "allocated 1 20000 4k rand write (allocated)" "allocated 32 50000 4k rand write (allocated)" \
  "empty 32 10000 4k alloc write (empty)"; do
  read -r kind depth count name <<<"$row"
  declare -A runs=()
  for ((r = 0; r < repeat; r++)); do
    for tool in ours qemu; do
      for bitmaps in 0 2; do
        image "$kind" "$bitmaps"
        runs[$tool$bitmaps]+="$(iops "$tool" "$depth" "$count") "
      done
    done
  done
  m() { tr ' ' '\n' <<<"${runs[$1]}" | grep . | median; }
  o0=$(m ours0) o2=$(m ours2) q0=$(m qemu0) q2=$(m qemu2)
  log "$name QD$depth: ours ${runs[ours0]}/ ${runs[ours2]}, qemu-img ${runs[qemu0]}/ ${runs[qemu2]}"
  printf '| %s | %s | %s | %s | %.2f | %s | %s | %.2f |\n' "$name" "$depth" "$o0" "$o2" \
    "$(echo "$o2 / $o0" | bc -l)" "$q0" "$q2" "$(echo "$q2 / $q0" | bc -l)"
  unset runs
done
rm -f img.qcow2
