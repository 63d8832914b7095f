#!/bin/bash
# bench/scale.sh: a 16 TiB image with a full L1 table. How long `info` and an
# open take, and how much memory serving random reads across the whole image
# takes with the default metadata cache, ours against qemu-img.
#
# The image: `ublk-qcow2 create` of 16 TiB with 64 KiB clusters (an L1 of
# 32768 entries, one per 512 MiB), then one 64 KiB write in every 512 MiB, so
# every L1 entry points at an L2 table: 32768 L2 tables (2 GiB of them) and
# ~4 GiB of file. Made by our own bench verb (-w -S 512MiB), checked with
# `qemu-img check` before anything is measured.
#
# Measured, each REPEAT times (median):
#   info       `ublk-qcow2 info IMAGE` vs `qemu-img info IMAGE`: wall time, peak RSS
#   open       `bench -c 1` (open, one 4 KiB read, close) for both tools
#   snapshot   `snapshot -c` then `-d` of one snapshot, ours vs qemu-img (last: it
#              rewrites every L2 table's flags and 65536 refcounts)
#   serve      `bench -d 32 -s 4096 -S (512 MiB + 4 KiB) -c N`: every request in a
#              different L2 table, walking all 32768 of them (each read needs
#              one 4 KiB slice of its table: 128 MiB in all), so a 32 MiB
#              cache misses on the second pass too and keeps evicting; ours
#              with its default --cache-size (32 MiB), qemu-img with QEMU's
#              defaults (on Linux: L2 cache capped at 32 MiB); peak RSS and
#              RSS over time.
# Writes bench/results/scale.md and scale.png (RSS over time while serving).
#
# Usage: bench/scale.sh        (about 2-4 minutes; ~4.5 GiB in BENCH_WORK)
# Environment: BENCH_WORK (default /var/tmp/ublk-qcow2-scale; not tmpfs),
#   BENCH_BIN (skip the build), BENCH_REPEAT (default 3), BENCH_OUT,
#   BENCH_KEEP=1 (keep the image), SCALE_COUNT (requests per serve run,
#   default 65536: two passes over the L2 tables).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${BENCH_WORK:-/var/tmp/ublk-qcow2-scale}
OUT=${BENCH_OUT:-$ROOT/bench/results}
REPEAT=${BENCH_REPEAT:-3}
COUNT=${SCALE_COUNT:-65536}
L2_SPAN=$((512 * 1024 * 1024))     # guest bytes one L2 table maps (64 KiB clusters)
STEP=$((L2_SPAN + 4096))           # a new table every request, offsets drifting
START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { echo "[$(($(date +%s) - START))s] $*" >&2; }

source "$ROOT/bench/lib.bash"
bench_install qemu-img:qemu-utils qemu-io:qemu-utils gnuplot:gnuplot-nox /usr/bin/time:time python3:python3
BIN=$(bench_binary)

mkdir -p "$WORK" "$OUT"
cd "$WORK"
if [[ ${BENCH_KEEP:-0} != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
IMG=$WORK/big.qcow2

if [[ ! -f $IMG ]] || ! qemu-img check -q "$IMG" 2>/dev/null; then
  rm -f "$IMG"
  log "creating a 16 TiB image and writing one cluster per L2 table (32768 writes)"
  "$BIN" create -q -o cluster_size=65536 "$IMG" 16T
  t0=$(date +%s.%N)
  "$BIN" bench -q -w --pattern=0x5a -t none -i io_uring -d 32 -c 32768 -s 65536 -S "$L2_SPAN" "$IMG" >/dev/null
  FILL_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  log "filled in ${FILL_S}s; qemu-img check"
  qemu-img check "$IMG" >"$WORK/check.txt"
else
  FILL_S="(image kept from an earlier run)"
  qemu-img check "$IMG" >"$WORK/check.txt"
fi
L1_USED=$(python3 - "$IMG" <<'EOF'
import struct, sys
with open(sys.argv[1], 'rb') as f:
    h = f.read(48)
    l1_size, l1_off = struct.unpack('>IQ', h[36:48])
    f.seek(l1_off)
    l1 = f.read(l1_size * 8)
used = sum(1 for i in range(l1_size) if struct.unpack_from('>Q', l1, i * 8)[0] & 0x00fffffffffffe00)
print(f"{used} {l1_size}")
EOF
)
FILE_BYTES=$(stat -c %s "$IMG")
log "L1 entries in use / L1 size: $L1_USED; file $((FILE_BYTES >> 20)) MiB"

# measure NAME CMD...: runs CMD REPEAT times under /usr/bin/time; prints
# "median_wall_s median_peak_rss_kib".
measure() {
  local name=$1 i
  shift
  : >"$WORK/m.$name"
  for ((i = 0; i < REPEAT; i++)); do
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "%e %M" -o "$WORK/t.$name" "$@" >/dev/null
    cat "$WORK/t.$name" >>"$WORK/m.$name"
  done
  local mid=$(((REPEAT + 1) / 2))
  echo "$(sort -n -k1,1 "$WORK/m.$name" | sed -n "${mid}p" | cut -d' ' -f1)" \
    "$(sort -n -k2,2 "$WORK/m.$name" | sed -n "${mid}p" | cut -d' ' -f2)"
}

# sample_rss PID FILE: VmRSS (KiB) every 0.1 s while PID lives.
sample_rss() {
  local pid=$1 file=$2 t0 rss
  t0=$(date +%s.%N)
  while rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null) && [[ -n $rss ]]; do
    echo "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}') $rss" >>"$file"
    sleep 0.1
  done
}

# serve NAME CMD...: one run with RSS sampling (for the plot), then measure.
serve() {
  local name=$1 pid
  shift
  : >"$WORK/rss.$name"
  "$@" >"$WORK/out.$name" &
  pid=$!
  sample_rss "$pid" "$WORK/rss.$name"
  wait "$pid"
  measure "$name" "$@"
}

SERVE_FLAGS=(-t none -i io_uring -d 32 -s 4096 -S "$STEP" -c "$COUNT")
log "info (x$REPEAT each)"
read -r INFO_OURS_S INFO_OURS_KIB < <(measure info-ours "$BIN" info "$IMG")
read -r INFO_QEMU_S INFO_QEMU_KIB < <(measure info-qemu qemu-img info "$IMG")
log "open + one read"
read -r OPEN_OURS_S OPEN_OURS_KIB < <(measure open-ours "$BIN" bench -q -t none -i io_uring -c 1 "$IMG")
read -r OPEN_QEMU_S OPEN_QEMU_KIB < <(measure open-qemu qemu-img bench -t none -i io_uring -c 1 "$IMG")
log "serving $COUNT reads, one per L2 table"
read -r SERVE_OURS_S SERVE_OURS_KIB < <(serve ours "$BIN" bench -q "${SERVE_FLAGS[@]}" "$IMG")
read -r SERVE_QEMU_S SERVE_QEMU_KIB < <(serve qemu qemu-img bench "${SERVE_FLAGS[@]}" "$IMG")
log "ours with --cache-size=256M (where the bound moves with the option)"
read -r SERVE_BIG_S SERVE_BIG_KIB < <(serve ours-256m "$BIN" bench -q --cache-size=256M "${SERVE_FLAGS[@]}" "$IMG")

# Snapshots last, as they change the image: each run creates a snapshot and
# deletes it again, so every run starts from the same image. Creating one
# raises the refcount of every L2 table and data cluster (65536 here) and
# clears the COPIED flag in every L2 table; deleting undoes both.
log "snapshot create and delete (x$REPEAT each, ours and qemu-img alternating)"
: >"$WORK/m.snap-c-ours"; : >"$WORK/m.snap-d-ours"; : >"$WORK/m.snap-c-qemu"; : >"$WORK/m.snap-d-qemu"
for ((i = 0; i < REPEAT; i++)); do
  for tool in ours qemu; do
    if [[ $tool == ours ]]; then snap=("$BIN" snapshot); else snap=(qemu-img snapshot); fi
    for op in c d; do
      sync
      echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
      /usr/bin/time -f "%e %M" -o "$WORK/t.snap" "${snap[@]}" "-$op" scale-snap "$IMG" >/dev/null
      cat "$WORK/t.snap" >>"$WORK/m.snap-$op-$tool"
    done
  done
done
median_of() {
  local mid=$(((REPEAT + 1) / 2))
  echo "$(sort -n -k1,1 "$WORK/m.$1" | sed -n "${mid}p" | cut -d' ' -f1)" \
    "$(sort -n -k2,2 "$WORK/m.$1" | sed -n "${mid}p" | cut -d' ' -f2)"
}
read -r SNAPC_OURS_S SNAPC_OURS_KIB < <(median_of snap-c-ours)
read -r SNAPD_OURS_S SNAPD_OURS_KIB < <(median_of snap-d-ours)
read -r SNAPC_QEMU_S SNAPC_QEMU_KIB < <(median_of snap-c-qemu)
read -r SNAPD_QEMU_S SNAPD_QEMU_KIB < <(median_of snap-d-qemu)
qemu-img check "$IMG" >"$WORK/check-after.txt" 2>&1 || { cat "$WORK/check-after.txt" >&2; exit 1; }
[[ -z $(qemu-img snapshot -l "$IMG") ]] || { echo "scale.sh: snapshots left behind" >&2; exit 1; }

mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
iops() { awk -v n="$COUNT" -v s="$1" 'BEGIN {printf "%.0f", n / s}'; }
ELAPSED=$(($(date +%s) - START))

{
  echo "# Scale: a 16 TiB image with a full L1"
  echo
  echo "Generated by bench/scale.sh on $(date -u +%Y-%m-%d) ($(nproc) cores, kernel $(uname -r)," \
    "$(qemu-img --version | head -1)); ${ELAPSED}s in all. Median of $REPEAT runs;" \
    "page cache dropped before each. Wall time and peak RSS from \`/usr/bin/time\`. Host load average" \
    "$LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end (other work on the cores slows both tools)."
  echo
  echo "Image: 16 TiB virtual, 64 KiB clusters, L1 entries in use / L1 size: ${L1_USED/ / / };" \
    "file $((FILE_BYTES >> 20)) MiB (one 64 KiB data cluster and one 64 KiB L2 table per 512 MiB);" \
    "made in ${FILL_S} s by \`ublk-qcow2 bench -w -S 512MiB -c 32768\`; \`qemu-img check\`:" \
    "$(grep -E 'No errors|allocated' "$WORK/check.txt" | tr '\n' ' ')"
  echo
  echo "| what | ours: time (s) | ours: peak RSS (MiB) | qemu-img: time (s) | qemu-img: peak RSS (MiB) |"
  echo "|---|--:|--:|--:|--:|"
  echo "| \`info\` | $INFO_OURS_S | $(mib "$INFO_OURS_KIB") | $INFO_QEMU_S | $(mib "$INFO_QEMU_KIB") |"
  echo "| open, one 4 KiB read, close (\`bench -c 1\`) | $OPEN_OURS_S | $(mib "$OPEN_OURS_KIB") | $OPEN_QEMU_S | $(mib "$OPEN_QEMU_KIB") |"
  echo "| $COUNT reads, each in another L2 table, depth 32 | $SERVE_OURS_S ($(iops "$SERVE_OURS_S") IOPS) | $(mib "$SERVE_OURS_KIB") | $SERVE_QEMU_S ($(iops "$SERVE_QEMU_S") IOPS) | $(mib "$SERVE_QEMU_KIB") |"
  echo "| the same, ours with \`--cache-size=256M\` | $SERVE_BIG_S ($(iops "$SERVE_BIG_S") IOPS) | $(mib "$SERVE_BIG_KIB") | | |"
  echo "| \`snapshot -c\` (32768 L2 tables and 32768 data clusters to reference) | $SNAPC_OURS_S | $(mib "$SNAPC_OURS_KIB") | $SNAPC_QEMU_S | $(mib "$SNAPC_QEMU_KIB") |"
  echo "| \`snapshot -d\` of it | $SNAPD_OURS_S | $(mib "$SNAPD_OURS_KIB") | $SNAPD_QEMU_S | $(mib "$SNAPD_QEMU_KIB") |"
  echo
  echo "Serve flags (both tools): \`bench ${SERVE_FLAGS[*]} IMAGE\` (step = 512 MiB + 4 KiB: every request" \
    "lands in the next L2 table, so 32768 tables are walked and the cache cannot hold them)."
  echo "Ours keeps at most --cache-size bytes of L2 slices (default 32 MiB: 8192 slices of 4 KiB) plus a fixed" \
    "amount (binary, ring, 32 request buffers of 4 KiB, the 256 KiB L1), whatever the image size: the bound is" \
    "the option, not the 2 GiB of L2 tables in this image. qemu-img runs with QEMU's defaults: on Linux the L2" \
    "cache is as large as the image needs, capped at 32 MiB, so here both tools hold 32 MiB of L2 metadata."
  echo
  echo "Snapshots: \`ublk-qcow2 snapshot -c|-d scale-snap IMAGE\` against \`qemu-img snapshot -c|-d\`, each run" \
    "creating one and deleting it again (the tools alternating), after the serve rows; \`qemu-img check\` after" \
    "all of them: $(grep -E 'No errors|errors were found' "$WORK/check-after.txt" | head -1)"
  echo
  echo "![RSS over time while serving](scale.png)"
} >"$OUT/scale.md"

gnuplot <<EOF
set terminal pngcairo size 900,480
set output "$OUT/scale.png"
set title "RSS while serving $COUNT reads across a 16 TiB image (one L2 table per read)"
set xlabel "seconds"
set ylabel "RSS (MiB)"
set key top left
set grid
plot "$WORK/rss.ours" using 1:(\$2/1024) with lines lw 2 title "ublk-qcow2 bench (default --cache-size=32M)", \
     "$WORK/rss.ours-256m" using 1:(\$2/1024) with lines lw 2 title "ublk-qcow2 bench --cache-size=256M", \
     "$WORK/rss.qemu" using 1:(\$2/1024) with lines lw 2 title "qemu-img bench (defaults)"
EOF
cat "$OUT/scale.md"
log "wrote $OUT/scale.md and $OUT/scale.png"
