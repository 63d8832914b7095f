#!/bin/bash
# bench/device-ab.sh: several ublk-qcow2 binaries against each other (and loop) on one fio
# workload, in turn, round after round, inside ONE boot of the VM rig. For A/B tests of a
# change: under TCG only comparisons within one boot mean anything, and the spread of the
# rounds shows the noise.
#
#   bench/device-ab.sh [-r RW] [-b BS] [-q QD] [-R IOPS] [-n ROUNDS] [-m MODE] BIN[,FLAG...]...
#
#   -r  fio --rw: randread (default), randwrite, read, write
#   -b  fio --bs (default 4k)      -q  fio --iodepth (default 1)
#   -R  fio --rate_iops (default: as fast as it goes)
#   -n  rounds (default 3)         -m  full (default): a 512 MiB image of random data;
#                                      latency: the QD1 breakdown instead (see below);
#                                      alloc: -r writes into a new empty 512 MiB image per
#                                      run, each BIN with --recovery=reissue and =off
#   -C  alloc's cluster size (default 64k; 4k makes most of a run's writes allocate)
# Each BIN is served with `add -q 1` and its FLAGs (`add` flags, e.g. ,--nthreads=2; the
# target's name shows them), defaults otherwise, on a copy-free qcow2 image of
# 512 MiB of random data (64 KiB clusters); loop is `losetup --direct-io=on` on the raw
# file it was converted from. Prints one line per round and target:
#   RESULT round N TARGET IOPS [utime=TICKS stime=TICKS]   (daemon CPU, USER_HZ 100)
# and at the end, per target, the IOPS of every round.
#
# -m latency: fio 4k random reads at depth 1 on the raw file itself, null_blk, loop,
# ours on the full image and ours on an empty one (zeros, no host I/O), with fio's mean
# completion latency: where a QD1 request's time goes (docs/benchmarks.md, "Device": QD1
# is wake-ups). Uses the first BIN only.
#
# Environment: BENCH_RUNTIME seconds per job (default 6, after 1 s ramp), VM_*: see
# tests/vm/run. Copy binaries aside first if a build may replace them meanwhile.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
rw=randread bs=4k qd=1 rounds=3 mode=full rate= cluster=64k
while getopts "r:b:q:R:n:m:C:" opt; do
  case $opt in
    r) rw=$OPTARG ;;
    b) bs=$OPTARG ;;
    q) qd=$OPTARG ;;
    R) rate=$OPTARG ;;
    n) rounds=$OPTARG ;;
    m) mode=$OPTARG ;;
    C) cluster=$OPTARG ;;
    *) sed -n '2,29p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if (($# == 0)); then
  sed -n '2,29p' "$0" >&2
  exit 2
fi
bins=()
for b in "$@"; do
  # BIN[,ADD_FLAG...]: add flags of this target, e.g. /var/tmp/bins/after,--nthreads=2
  path=${b%%,*}
  [[ -x $path ]] || { echo "device-ab: $path is not an executable" >&2; exit 2; }
  bins+=("$(cd "$(dirname "$path")" && pwd)/$(basename "$path")${b#"$path"}")
done

VM_ENV_AB_RW=$rw VM_ENV_AB_BS=$bs VM_ENV_AB_QD=$qd VM_ENV_AB_ROUNDS=$rounds VM_ENV_AB_RATE=$rate \
  VM_ENV_AB_MODE=$mode VM_ENV_AB_RUNTIME=${BENCH_RUNTIME:-6} VM_ENV_AB_CLUSTER=$cluster \
  "$ROOT/tests/vm/run" "$ROOT/bench/device-ab-in-vm.sh" "${bins[@]}" |
  tee /dev/stderr | grep -a '^RESULT' | awk '
    { key = $4; v[key] = v[key] (v[key] == "" ? "" : " / ") $5; if (!(key in seen)) { seen[key] = 1; order[++n] = key } }
    END { print ""; for (i = 1; i <= n; i++) printf "%-28s %s\n", order[i], v[order[i]] }'
