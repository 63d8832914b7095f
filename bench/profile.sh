#!/bin/bash
# bench/profile.sh: where ublk-qcow2 bench spends its time, next to qemu-img
# bench doing the same requests.
#
#   bench/profile.sh IMAGE BENCH-FLAGS...
#   e.g. bench/profile.sh full-2M-xl2.qcow2 -c 20000 -d 32 -S 409612288 -w --pattern=0xa5
#
# Both run with -t none -i io_uring. Prints, for each, the CPU time per
# request (task-clock: user + system, the number that survives a noisy shared
# machine better than IOPS), then perf's top symbols and DSO shares for ours
# (perf record -e cpu-clock: software sampling, which works in VMs without
# hardware counters). Where perf cannot sample at all, falls back to
# valgrind --tool=callgrind on the same run (slow: use a small -c).
# Writes runs ON the image: profile writes on a scratch copy.
#
# Environment: BENCH_BIN (default: the -c opt build, as host.sh makes it),
# PROFILE_OUT (default /tmp/ublk-qcow2-profile: perf.data, callgrind.out).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { sed -n '2,16p' "$0" >&2; exit 2; }
IMAGE=$1
shift
OUT=${PROFILE_OUT:-/tmp/ublk-qcow2-profile}
mkdir -p "$OUT"
BIN=${BENCH_BIN:-$(cd "$ROOT" && bazel info -c opt bazel-bin 2>/dev/null)/tools/ublk-qcow2}
[[ -x $BIN ]] || { echo "no binary at $BIN (run bench/host.sh once, or set BENCH_BIN)" >&2; exit 1; }

count=75000  # qemu-img's default
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == -c ]] && count=${args[i + 1]}
done

# cpu_per_request NAME CMD...: runs CMD under perf stat, prints its line.
cpu_per_request() {
  local name=$1
  shift
  local ms
  ms=$(perf stat -x, -e task-clock -o "$OUT/stat.$name" -- "$@" >"$OUT/out.$name" 2>&1 &&
    awk -F, '/task-clock/ {print $1}' "$OUT/stat.$name")
  local seconds
  seconds=$(awk '/Run completed in/ {print $4}' "$OUT/out.$name")
  awk -v n="$count" -v ms="$ms" -v s="$seconds" -v who="$name" 'BEGIN {
    printf "%-9s %8.0f IOPS  %6.1f us CPU/request  (CPU busy %3.0f%% of the run)\n",
      who, n / s, ms * 1000 / n, ms / 10 / s }'
}

if perf stat -e task-clock true >/dev/null 2>&1; then
  cpu_per_request ours "$BIN" bench -t none -i io_uring "$@" "$IMAGE"
  cpu_per_request qemu-img qemu-img bench -t none -i io_uring "$@" "$IMAGE"
  echo
  echo "== ours: perf record -e cpu-clock -g"
  perf record -q -e cpu-clock -g -o "$OUT/perf.data" -- \
    "$BIN" bench -q -t none -i io_uring "$@" "$IMAGE" >/dev/null 2>&1
  perf report -i "$OUT/perf.data" --stdio --no-children --sort dso -g none 2>/dev/null |
    grep -E '^ +[0-9]' | head -6
  echo
  perf report -i "$OUT/perf.data" --stdio --no-children --sort dso,symbol -g none 2>/dev/null |
    grep -E '^ +[0-9]' | head -25 | cut -c1-150
  echo
  echo "(call graphs: perf report -i $OUT/perf.data --no-children -G)"
else
  echo "perf cannot sample here; valgrind --tool=callgrind instead (slow)"
  valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
    "$BIN" bench -t none -i io_uring "$@" "$IMAGE" 2>/dev/null
  callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | head -40
fi
