#!/bin/bash
# bench/host.sh: ublk-qcow2 bench vs qemu-img bench vs fio on raw, on this host
# (no ublk device involved: the engine and its io_uring ring, as the device
# path drives them).
#
# For every row it runs, one after the other on the same image state:
#   ours      ublk-qcow2 bench -t none -i io_uring FLAGS IMAGE
#   ours poll the same with --poll-us=BENCH_POLL_US (adaptive busy-polling)
#   qemu-img  qemu-img bench   -t none -i io_uring FLAGS IMAGE   (same FLAGS)
#   fio       fio --ioengine=io_uring --direct=1 on a raw file with the same
#             data: the limit of the disk.
# and writes bench/results/host.md (table, ratios, exact commands) and
# bench/results/host.png (bar chart, gnuplot).
#
# "Random" rows use a scattering step instead of random offsets, because
# qemu-img bench has no random mode: -S 4096*100003 walks a 1 GiB image in a
# permutation of its 4 KiB blocks (100003 is prime, so coprime with the
# block count). Ours and qemu-img thus send the very same offsets; fio uses
# rw=randread/randwrite.
#
# Usage: bench/host.sh            (about 3-4 minutes after the build)
# Environment:
#   BENCH_WORK    scratch directory for images (default /var/tmp/ublk-qcow2-bench;
#                 needs ~6 GiB; O_DIRECT must work there: not tmpfs)
#   BENCH_REPEAT  runs per tool and row, median reported (default 3)
#   BENCH_SCALE   multiplies every request count (default 1; 0.1 for a smoke run)
#   BENCH_BIN     a ublk-qcow2 binary to use instead of building one (-c opt)
#   BENCH_KEEP    1: keep the images afterwards
#   BENCH_OUT     where host.md/host.png go (default bench/results)
#   BENCH_POLL_US the "ours poll" column's --poll-us (default 50; 0 leaves it out)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${BENCH_WORK:-/var/tmp/ublk-qcow2-bench}
OUT=${BENCH_OUT:-$ROOT/bench/results}
REPEAT=${BENCH_REPEAT:-3}
SCALE=${BENCH_SCALE:-1}
POLL_US=${BENCH_POLL_US:-50}
IMAGE_MB=1024     # the data images; the random step below assumes 1 GiB
COMP_MB=128       # the compressed image
PATTERN=0xa5      # the byte every write carries
SCATTER=$((4096 * 100003))
START=$(date +%s)

log() { echo "[$(($(date +%s) - START))s] $*" >&2; }

source "$ROOT/bench/lib.bash"
bench_install fio:fio gnuplot:gnuplot-nox qemu-img:qemu-utils qemu-io:qemu-utils python3:python3 \
  /usr/bin/time:time
BIN=$(bench_binary)
BENCH_START=$(date +%s)

# --- images ---
mkdir -p "$WORK" "$OUT"
cd "$WORK"
if [[ ${BENCH_KEEP:-0} != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
rm -f ./*.qcow2 ./*.raw

log "preparing images in $WORK"
# Random data, so reads hit written clusters (never-written ones flatter
# everything), and base64 text, which deflate shrinks to ~76%, so
# qemu-img convert -c really stores compressed clusters.
head -c "${IMAGE_MB}M" /dev/urandom >data.raw
head -c "$((COMP_MB * 3 / 4))M" /dev/urandom | base64 -w 0 | head -c "${COMP_MB}M" >text.raw
cp data.raw fio.raw  # fio's write target; data.raw stays pristine for reads

declare -A CLUSTER_OPTS=([64k]="cluster_size=64k" [2M-xl2]="cluster_size=2M,extended_l2=on")
CLUSTERS=(64k 2M-xl2)
for c in "${CLUSTERS[@]}"; do
  qemu-img convert -f raw -O qcow2 -o "${CLUSTER_OPTS[$c]}" data.raw "full-$c.qcow2"
  qemu-img convert -c -f raw -O qcow2 -o "${CLUSTER_OPTS[$c]}" text.raw "comp-$c.qcow2"
done
# Write back now: gigabytes of dirty pages flushing during the first rows
# would slow whoever runs first.
sync

# A fresh image for an allocating run: empty, or empty over a backing file.
fresh() {  # CLUSTER KIND NAME
  local backing=()
  [[ $2 == backing ]] && backing=(-b "full-$1.qcow2" -F qcow2)
  rm -f "$3"
  qemu-img create -q -f qcow2 -o "${CLUSTER_OPTS[$1]}" "${backing[@]}" "$3" "${IMAGE_MB}M"
}

# --- runners: each prints IOPS ---
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# The runners print "IOPS CPU": CPU = the process's user + system time per
# request in µs (/usr/bin/time; 10 ms resolution, so ~0.5% of these runs).
cpu_per_request() {  # COUNT: reads $WORK/cpu.txt
  awk -v n="$1" '{printf "%.1f\n", ($1 + $2) * 1e6 / n}' "$WORK/cpu.txt"
}
run_ours() {  # COUNT FLAGS... IMAGE
  local count=$1 iops
  shift
  iops=$(/usr/bin/time -f '%U %S' -o "$WORK/cpu.txt" "$BIN" bench -q -t none -i io_uring "$@" |
    awk '/^IOPS:/ {gsub(",", "", $2); print $2}')
  echo "$iops $(cpu_per_request "$count")"
}
run_ours_poll() {  # COUNT FLAGS... IMAGE
  local count=$1
  shift
  run_ours "$count" --poll-us="$POLL_US" "$@"
}
run_qemu() {  # COUNT FLAGS... IMAGE
  local count=$1
  shift
  local iops
  iops=$(/usr/bin/time -f '%U %S' -o "$WORK/cpu.txt" qemu-img bench -t none -i io_uring "$@" |
    awk -v n="$count" '/^Run completed in/ {printf "%.0f\n", ($4 > 0 ? n / $4 : 0)}')
  echo "$iops $(cpu_per_request "$count")"
}
run_fio() {  # COUNT RW BS DEPTH FILE
  fio --name=bench --filename="$5" --ioengine=io_uring --direct=1 --rw="$2" --bs="$3" \
    --iodepth="$4" --number_ios="$1" --size="$(stat -c %s "$5")" --norandommap \
    --randrepeat=1 --output-format=json |
    python3 -c 'import json, sys
j = json.load(sys.stdin)["jobs"][0]
print(round(j["read"]["iops"] + j["write"]["iops"]))'
}

ROWS=()     # "cluster|workload|depth|ours|qemu|fio|fio target applies|ours poll|ours CPU|qemu CPU"
COMMANDS=() # the exact commands of the first repetition
DATA=$OUT/host.dat
: >"$DATA"

# row CLUSTER LABEL KIND COUNT DEPTH SIZE STEP FIO_RW FIO_FILE
#   KIND: read (full image), write (full image, in place), alloc-empty,
#   alloc-backing (fresh image per run), comp (compressed image).
row() {
  local c=$1 label=$2 kind=$3 count=$4 depth=$5 size=$6 step=$7 fio_rw=$8 fio_file=$9
  count=$(awk -v n="$count" -v s="$SCALE" 'BEGIN {n = int(n * s); print (n < 1 ? 1 : n)}')
  local flags=(-c "$count" -d "$depth" -s "$size")
  [[ $step != - ]] && flags+=(-S "$step")
  [[ $kind == write || $kind == alloc-* ]] && flags+=(-w "--pattern=$PATTERN")
  local ours=() qemu=() fio=() poll=() image i image_note
  case $kind in
    read | write) image_note="full-$c.qcow2, every cluster written" ;;
    comp) image_note="comp-$c.qcow2, qemu-img convert -c" ;;
    alloc-empty) image_note="a new empty image per run; new.raw: a new sparse file per run" ;;
    alloc-backing) image_note="a new empty image over full-$c.qcow2 per run; new.raw: a new sparse file per run" ;;
  esac
  for ((i = 0; i < REPEAT; i++)); do
    case $kind in
      read | write) image=full-$c.qcow2 ;;
      comp) image=comp-$c.qcow2 ;;
      alloc-empty) image=alloc.qcow2; fresh "$c" empty "$image" ;;
      alloc-backing) image=alloc.qcow2; fresh "$c" backing "$image" ;;
    esac
    # Alternate who goes first, so drift in the machine's load hits both.
    if ((i % 2 == 0)); then
      ours+=("$(run_ours "$count" "${flags[@]}" "$image")")
      [[ $kind == alloc-* ]] && fresh "$c" "${kind#alloc-}" "$image"
      qemu+=("$(run_qemu "$count" "${flags[@]}" "$image")")
    else
      qemu+=("$(run_qemu "$count" "${flags[@]}" "$image")")
      [[ $kind == alloc-* ]] && fresh "$c" "${kind#alloc-}" "$image"
      ours+=("$(run_ours "$count" "${flags[@]}" "$image")")
    fi
    if ((POLL_US > 0)); then
      [[ $kind == alloc-* ]] && fresh "$c" "${kind#alloc-}" "$image"
      poll+=("$(run_ours_poll "$count" "${flags[@]}" "$image")")
    fi
    # Allocating rows: fio too writes a new (sparse) file, so that the file
    # system allocates its blocks as it does for the new image's clusters.
    [[ $fio_file == new.raw ]] && rm -f new.raw && truncate -s "${IMAGE_MB}M" new.raw
    fio+=("$(run_fio "$count" "$fio_rw" "$size" "$depth" "$fio_file")")
  done
  if [[ $c == "${CLUSTERS[0]}" ]]; then
    COMMANDS+=("# $label, depth $depth (IMAGE: $image_note)"
      "ublk-qcow2 bench -q -t none -i io_uring ${flags[*]} IMAGE"
      "qemu-img bench -t none -i io_uring ${flags[*]} IMAGE"
      "fio --name=bench --filename=$fio_file --ioengine=io_uring --direct=1 --rw=$fio_rw --bs=$size --iodepth=$depth --number_ios=$count --norandommap --randrepeat=1")
  fi
  local o q f p=- applies=no oc qc
  o=$(printf '%s\n' "${ours[@]}" | cut -d' ' -f1 | median)
  oc=$(printf '%s\n' "${ours[@]}" | cut -d' ' -f2 | median)
  ((POLL_US > 0)) && p=$(printf '%s\n' "${poll[@]}" | cut -d' ' -f1 | median)
  q=$(printf '%s\n' "${qemu[@]}" | cut -d' ' -f1 | median)
  qc=$(printf '%s\n' "${qemu[@]}" | cut -d' ' -f2 | median)
  f=$(printf '%s\n' "${fio[@]}" | median)
  [[ $kind == read || $kind == write ]] && applies=yes
  ROWS+=("$c|$label|$depth|$o|$q|$f|$applies|$p|$oc|$qc")
  printf '"%s %s QD%s" %s %s %s %s\n' "$c" "$label" "$depth" "$o" "$q" "$f" "${p/-/NaN}" >>"$DATA"
  log "$c $label QD$depth: ours $o, qemu-img $q, fio $f, ours poll $p IOPS; CPU µs/request ours $oc, qemu-img $qc"
}

FOUR_K=4096
SIXTY_FOUR_K=65536
for c in "${CLUSTERS[@]}"; do
  row "$c" "4k rand read" read 20000 1 $FOUR_K $SCATTER randread data.raw
  row "$c" "4k rand read" read 60000 32 $FOUR_K $SCATTER randread data.raw
  row "$c" "4k rand write (allocated)" write 10000 1 $FOUR_K $SCATTER randwrite fio.raw
  row "$c" "4k rand write (allocated)" write 40000 32 $FOUR_K $SCATTER randwrite fio.raw
  row "$c" "4k alloc write (empty)" alloc-empty 20000 32 $FOUR_K - write new.raw
  row "$c" "64k alloc write (empty)" alloc-empty 4000 32 $SIXTY_FOUR_K - write new.raw
  row "$c" "4k alloc write (backing)" alloc-backing 20000 32 $FOUR_K - write new.raw
  row "$c" "64k alloc write (backing)" alloc-backing 4000 32 $SIXTY_FOUR_K - write new.raw
  row "$c" "64k read (compressed)" comp 2000 32 $SIXTY_FOUR_K - read text.raw
done
ELAPSED=$(($(date +%s) - BENCH_START))

# --- report ---
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
{
  echo "# Host benchmark: ublk-qcow2 bench vs qemu-img bench vs fio (raw)"
  echo
  echo "Generated by bench/host.sh on $(date -u +%Y-%m-%d) ($(nproc) cores, kernel $(uname -r)," \
    "$(qemu-img --version | head -1), $(fio --version)); ${ELAPSED}s for images and runs (build excluded)," \
    "BENCH_REPEAT=$REPEAT (median), BENCH_SCALE=$SCALE. IOPS; all runs -t none (O_DIRECT)," \
    "-i io_uring. Images: ${IMAGE_MB} MiB of random data (compressed: ${COMP_MB} MiB of base64 text)."
  echo
  echo "| clusters | workload | depth | ours | qemu-img | fio raw | ours/qemu-img | ours/fio | fio/qemu-img | ≥1.3x qemu-img | ≥0.8x fio | ours poll | poll/qemu-img | poll/fio |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|---:|---:|---:|"
  below=0
  for r in "${ROWS[@]}"; do
    IFS='|' read -r c label depth o q f applies p oc qc <<<"$r"
    rq=$(ratio "$o" "$q")
    rf=$(ratio "$o" "$f")
    fq=$(ratio "$f" "$q")
    [[ $applies == yes ]] && below=$((below + $(awk -v r="$fq" 'BEGIN {print (r < 1.3) ? 1 : 0}')))
    mq=$(awk -v r="$rq" 'BEGIN {print (r >= 1.3) ? "yes" : "no"}')
    mf="n/a"
    [[ $applies == yes ]] && mf=$(awk -v r="$rf" 'BEGIN {print (r >= 0.8) ? "yes" : "no"}')
    pq=- pf=-
    [[ $p != - ]] && pq=$(ratio "$p" "$q") && pf=$(ratio "$p" "$f")
    echo "| $c | $label | $depth | $o | $q | $f | $rq | $rf | $fq | $mq | $mf | $p | $pq | $pf |"
  done
  echo
  echo "fio/qemu-img: how far past qemu-img the disk itself goes. fio does nothing but the I/O," \
    "on a raw file: for the reads and in-place writes the image's data, where it is the limit;" \
    "it is below 1.3 on $below of the 8 such rows, where ≥ 1.3x qemu-img would mean beating fio" \
    "on the raw file. For the allocating rows fio writes a new sparse file, whose blocks the file" \
    "system allocates write by write; our image grows ahead by fallocate (\`--preallocate\`," \
    "64 MiB), so ours may pass fio there."
  echo
  echo "CPU per request, in µs of user + system time of the whole process (median of $REPEAT):" \
    "where the disk sets the pace, what each tool spends to keep up with it."
  echo
  echo "| clusters | workload | depth | ours | qemu-img | ours/qemu-img |"
  echo "|---|---|---:|---:|---:|---:|"
  for r in "${ROWS[@]}"; do
    IFS='|' read -r c label depth o q f applies p oc qc <<<"$r"
    echo "| $c | $label | $depth | $oc | $qc | $(ratio "$oc" "$qc") |"
  done
  echo
  if ((POLL_US > 0)); then
    echo "ours poll = the same \`ublk-qcow2 bench\` with \`--poll-us=$POLL_US\`: the ring is busy-polled" \
      "for up to $POLL_US µs (adaptive window) before the thread sleeps; off by default (and in the" \
      "ours column), as it keeps a core busy. The targets are checked on the ours column."
    echo
  fi
  echo "Commands of the 64k rows (the 2M-xl2 rows are the same on the 2 MiB-cluster images):"
  echo
  echo '```'
  printf '%s\n' "${COMMANDS[@]}"
  echo '```'
} >"$OUT/host.md"

poll_plot=""
((POLL_US > 0)) && poll_plot=", \"\" using 5 title \"ublk-qcow2 bench --poll-us=$POLL_US\""
gnuplot <<EOF
set terminal pngcairo size 1400,750 font ",9" noenhanced
set output "$OUT/host.png"
set title "IOPS, O_DIRECT + io_uring, median of $REPEAT (log scale; fio on a raw file = the disk's limit)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set logscale y
set yrange [100:1000000]
set ylabel "IOPS"
set grid ytics
set key top center horizontal
set rmargin 24
set bmargin 11
set xtics rotate by -35 scale 0
plot "$DATA" using 2:xtic(1) title "ublk-qcow2 bench", \
     "" using 3 title "qemu-img bench", \
     "" using 4 title "fio (raw)"$poll_plot
EOF
log "wrote $OUT/host.md and $OUT/host.png (measuring took ${ELAPSED}s)"
cat "$OUT/host.md"
