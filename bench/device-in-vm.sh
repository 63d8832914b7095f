#!/bin/bash
# bench/device-in-vm.sh: the guest half of bench/device.sh. Runs as root inside the VM
# rig (tests/vm/run); not meant for the host. bench/device.sh boots the VM with it.
#
# Prepares on /scratch, from ONE set of DATA_MB random bytes (written once, so every
# read below reads written data):
#   ours1.qcow2, ours2.qcow2, ours1p.qcow2, nbd-none.qcow2, nbd-wb.qcow2   qcow2, 64 KiB clusters,
#                                      every cluster written (qemu-img convert + copies)
#   loop-dio.raw, loop-buf.raw         the same bytes, raw
# and serves them as six block devices at once:
#   ours1     ublk-qcow2 add -f ours1.qcow2 -q 1          (/dev/ublkbN, 1 queue)
#   ours2     ublk-qcow2 add -f ours2.qcow2 -q 2          (/dev/ublkbN, 2 queues)
#   ours1p    ublk-qcow2 add -f ours1p.qcow2 -q 1 --poll-us=BENCH_POLL_US (busy-polling;
#             only when BENCH_POLL_US > 0)
#   loop      losetup --direct-io=on  loop-dio.raw        (kernel loop, O_DIRECT to the file)
#   nbd       qemu-nbd --cache=none --aio=io_uring -f qcow2 -c /dev/nbd0 nbd-none.qcow2
#   loop-buf  losetup --direct-io=off loop-buf.raw        (page cache: like our daemon)
#   nbd-wb    qemu-nbd --cache=writeback --aio=io_uring -f qcow2 -c /dev/nbd1 nbd-wb.qcow2
# (the last two only with BENCH_BUFFERED=1), and with BENCH_ENCRYPTED=1 (issue 18) a LUKS
# copy of the same bytes (qemu-img's default cipher, aes-256-xts-plain64, iter-time=10):
#   ours-enc  ublk-qcow2 add -f ours-enc.qcow2 --key-file KEY -q 1
#   nbd-enc   qemu-nbd --cache=none --aio=io_uring --object secret... -c /dev/nbd2 nbd-enc.qcow2
# Then one fio run per row
# (fio io_uring, direct=1, time_based; each target is a stonewalled job, the order
# rotates from row to row), all rows BENCH_REPEAT times over (rounds after the first
# record their row as ID~ROUND and rotate the order once more). Around each job, fio's exec_prerun/exec_postrun call this
# script with --snap, which syncs and drops the page cache (before), and records the
# device's sector counters, the whole VM's CPU counters (/proc/stat), the serving
# process's utime+stime and VmHWM/VmRSS (ours: the daemon; nbd: qemu-nbd; loop: kernel
# threads, none), and after the job how long `sync` takes (the write-back that buffered
# targets still owe).
#
# Output: progress lines, then every record (`rec|...`) between the lines
#   === device-bench records begin ===   and   === device-bench records end ===
# which bench/device.sh turns into the table. Exit status 0 only if every job ran.
#
# Environment (bench/device.sh passes these): BENCH_BIN (the ublk-qcow2 binary, a host
# path), BENCH_RUNTIME (s, default 8), BENCH_RAMP (s, default 2), BENCH_DATA_MB (1024),
# BENCH_BUFFERED (0), BENCH_POLL_US (500; 0 leaves out ours1p), BENCH_ROWS (row ids to run, default all: see ROWS below),
# BENCH_REPEAT (rounds over all rows, default 1), BENCH_ENCRYPTED (0; 1 adds the LUKS pair),
# BENCH_ENGINE (1: afterwards, `ublk-qcow2 bench` on ours1.qcow2 for the 4k random rows,
# buffered and O_DIRECT: the engine's own cost, no ublk), BENCH_ENGINE_COUNT (requests
# at QD32, default 100000; a tenth at QD1).
set -euo pipefail
export LC_ALL=C

# --- --snap PHASE ROW TARGET DEVNAME PID: one counter record (called by fio) -------------
# Kept free of external commands where possible: under TCG every exec costs ~60 ms.
if [[ ${1:-} == --snap ]]; then
  phase=$2 row=$3 target=$4 devname=$5 pid=$6
  out=/scratch/bench/snaps
  sync_s=-
  if [[ $phase == pre ]]; then
    sync
    echo 3 >/proc/sys/vm/drop_caches
  fi
  t=$EPOCHREALTIME
  read -r -a d </sys/block/"$devname"/stat
  read -r _ u n s idle iow irq sirq steal _ </proc/stat
  busy=$((u + n + s + irq + sirq + steal))
  total=$((busy + idle + iow))
  ticks=- hwm=- rss=- threads=-
  if [[ $pid != - && -r /proc/$pid/stat ]]; then
    read -r -a st </proc/"$pid"/stat
    ticks=$((st[13] + st[14]))
    while read -r key value _; do
      case $key in VmHWM:) hwm=$value ;; VmRSS:) rss=$value ;; esac
    done </proc/"$pid"/status
    # CPU ticks per live thread, io_uring's io-wq workers (iou-wrk-*, which exit after
    # ~5 s idle) summed as one entry with their count: where the server's time goes.
    declare -A per=()
    workers=0
    for task in /proc/"$pid"/task/*; do
      read -r comm <"$task"/comm || continue
      read -r -a ts <"$task"/stat || continue
      # comm may contain spaces, which shifts the fields: count from the end instead.
      n=${#ts[@]}
      tt=$((ts[n - 52 + 13] + ts[n - 52 + 14]))
      [[ $comm == iou-wrk-* ]] && { comm=iou-wrk; workers=$((workers + 1)); }
      per[$comm]=$((${per[$comm]:-0} + tt))
    done
    threads=
    for comm in "${!per[@]}"; do threads+="${threads:+,}$comm=${per[$comm]}"; done
    threads+=",workers=$workers"
  fi
  if [[ $phase == post ]]; then
    # What the job left dirty in the page cache (buffered targets) is written back now,
    # outside the timed window: how long that takes is recorded.
    s0=$EPOCHREALTIME
    sync
    s1=$EPOCHREALTIME
    sync_s=$(( (${s1/./} - ${s0/./}) / 1000 ))  # ms
    read -r _ u n s idle iow irq sirq steal _ </proc/stat
    sync_busy=$((u + n + s + irq + sirq + steal - busy))
    sync_s="$sync_s:$sync_busy"
  fi
  echo "rec|snap|$phase|$row|$target|$t|${d[2]}|${d[6]}|$busy|$total|$ticks|$hwm|$rss|$sync_s|$threads" >>"$out"
  exit 0
fi

# --- main -------------------------------------------------------------------------------

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
RUNTIME=${BENCH_RUNTIME:-8}
RAMP=${BENCH_RAMP:-2}
DATA_MB=${BENCH_DATA_MB:-1024}
BUFFERED=${BENCH_BUFFERED:-0}
ENCRYPTED=${BENCH_ENCRYPTED:-0}
POLL_US=${BENCH_POLL_US:-500}
ENGINE=${BENCH_ENGINE:-1}
REPEAT=${BENCH_REPEAT:-1}
ENGINE_QD1=$((${BENCH_ENGINE_COUNT:-100000} / 10))
ENGINE_QD32=${BENCH_ENGINE_COUNT:-100000}
W=/scratch/bench
T0=$SECONDS

log() { echo "device-bench: [$((SECONDS - T0))s] $*"; }
die() { log "error: $*"; exit 1; }

[[ ${UBLK_IN_VM:-} == 1 ]] || die "not inside the test VM (run bench/device.sh on the host)"
BIN=${BENCH_BIN:?BENCH_BIN: the ublk-qcow2 binary}
[[ ! -x $BIN && -x /.vm-host$BIN ]] && BIN=/.vm-host$BIN
[[ -x $BIN ]] || die "no ublk-qcow2 binary at $BIN"
for tool in fio jq qemu-img qemu-nbd losetup; do
  command -v "$tool" >/dev/null || die "'$tool' not found in the guest (install it on the host)"
done
[[ -c /dev/ublk-control ]] || die "/dev/ublk-control missing"
[[ -b /dev/nbd0 && -b /dev/nbd1 ]] || die "/dev/nbd0 and /dev/nbd1 missing (kernel without nbd?)"

# Rows: id|fio rw|block size (bytes)|iodepth|label
ROWS=(
  "rr4k1|randread|4096|1|4k random read"
  "rr4k32|randread|4096|32|4k random read"
  "rw4k1|randwrite|4096|1|4k random write"
  "rw4k32|randwrite|4096|32|4k random write"
  "sr1m4|read|1048576|4|1M sequential read"
  "sw1m4|write|1048576|4|1M sequential write"
)
if [[ -n ${BENCH_ROWS:-} ]]; then
  keep=()
  for r in "${ROWS[@]}"; do [[ " $BENCH_ROWS " == *" ${r%%|*} "* ]] && keep+=("$r"); done
  ROWS=("${keep[@]}")
  ((${#ROWS[@]})) || die "BENCH_ROWS selects no row"
fi

# Targets: name|device|pid (filled in below)
declare -A DEV PID
TARGETS=(ours1 ours2 loop nbd)
((BUFFERED)) && TARGETS+=(loop-buf nbd-wb)
((POLL_US > 0)) && TARGETS+=(ours1p)
((ENCRYPTED)) && TARGETS+=(ours-enc nbd-enc)

# shellcheck disable=SC2317  # reached through the EXIT trap
cleanup() {
  set +e
  for t in ours1 ours2 ours1p ours-enc; do
    [[ -n ${DEV[$t]:-} ]] && "$BIN" del -n "${DEV[$t]#/dev/ublkb}" >/dev/null 2>&1
  done
  for t in nbd nbd-wb nbd-enc; do [[ -n ${DEV[$t]:-} ]] && qemu-nbd -d "${DEV[$t]}" >/dev/null 2>&1; done
  for t in loop loop-buf; do [[ -n ${DEV[$t]:-} ]] && losetup -d "${DEV[$t]}" 2>/dev/null; done
  return 0
}
trap cleanup EXIT

meta() { echo "rec|meta|$1|$2" >>"$W/records"; }

rm -rf "$W"
mkdir -p "$W/fio"
: >"$W/records"
: >"$W/snaps"
meta kernel "$(uname -r)"
meta cpus "$(nproc)"
meta mem_mib "$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))"
meta fio "$(fio --version)"
meta qemu_nbd "$(qemu-nbd --version | head -n1)"
meta runtime "$RUNTIME"
meta ramp "$RAMP"
meta poll_us "$POLL_US"
meta repeat "$REPEAT"
meta data_mb "$DATA_MB"
meta targets "${TARGETS[*]}"
log "kernel $(uname -r), $(nproc) CPUs; targets: ${TARGETS[*]}; ${RUNTIME}s + ${RAMP}s ramp per job"

# --- images -----------------------------------------------------------------------------
cd "$W"
s=$SECONDS
head -c "${DATA_MB}M" /dev/urandom >loop-dio.raw
meta prep_random_s $((SECONDS - s))
s=$SECONDS
qemu-img convert -t none -T none -W -f raw -O qcow2 -o cluster_size=65536 loop-dio.raw ours1.qcow2
copies=(ours2.qcow2 nbd-none.qcow2)
((BUFFERED)) && copies+=(nbd-wb.qcow2)
((POLL_US > 0)) && copies+=(ours1p.qcow2)
for c in "${copies[@]}"; do dd if=ours1.qcow2 of="$c" bs=4M iflag=direct oflag=direct status=none; done
if ((ENCRYPTED)); then
  printf 'bench-passphrase' >key
  for ((i = 0; i < 20; i++)); do  # QEMU's PBKDF2 CPU-time probe fails now and then
    qemu-img convert -t none -T none -W -f raw -O qcow2 --object secret,id=s,file=key \
      -o cluster_size=65536,encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10 \
      loop-dio.raw ours-enc.qcow2 && break
  done
  [[ -f ours-enc.qcow2 ]] || die "qemu-img could not make the LUKS image"
  dd if=ours-enc.qcow2 of=nbd-enc.qcow2 bs=4M iflag=direct oflag=direct status=none
fi
((BUFFERED)) && dd if=loop-dio.raw of=loop-buf.raw bs=4M iflag=direct oflag=direct status=none
sync
meta prep_images_s $((SECONDS - s))
meta image_du_kib "$(du -k ours1.qcow2 | cut -f1)"
meta image_allocated "$(qemu-img map --output=json ours1.qcow2 | jq '[.[] | select(.data) | .length] | add')"
log "images ready ($(du -sh "$W" | cut -f1) on /scratch)"

# --- devices ----------------------------------------------------------------------------
ROOT=$(dirname "$(dirname "$SELF")")
# shellcheck source=bench/lib.bash
source "$ROOT/bench/lib.bash"
daemon_pid() { bench_daemon_pid "$BIN" "$1"; }
DEV[ours1]=$("$BIN" add -f "$W/ours1.qcow2" -q 1)
PID[ours1]=$(daemon_pid "${DEV[ours1]}")
DEV[ours2]=$("$BIN" add -f "$W/ours2.qcow2" -q 2)
PID[ours2]=$(daemon_pid "${DEV[ours2]}")
if ((POLL_US > 0)); then
  DEV[ours1p]=$("$BIN" add -f "$W/ours1p.qcow2" -q 1 --poll-us="$POLL_US")
  PID[ours1p]=$(daemon_pid "${DEV[ours1p]}")
fi
if ((ENCRYPTED)); then
  [[ -b /dev/nbd2 ]] || die "/dev/nbd2 missing"
  DEV[ours-enc]=$("$BIN" add -f "$W/ours-enc.qcow2" -q 1 --key-file "$W/key")
  PID[ours-enc]=$(daemon_pid "${DEV[ours-enc]}")
  qemu-nbd --cache=none --aio=io_uring --object "secret,id=s,file=$W/key" --image-opts \
    --pid-file="$W/nbd-enc.pid" -c /dev/nbd2 \
    "driver=qcow2,file.filename=$W/nbd-enc.qcow2,encrypt.key-secret=s"
  DEV[nbd-enc]=/dev/nbd2
  PID[nbd-enc]=$(<"$W/nbd-enc.pid")
fi
DEV[loop]=$(losetup --direct-io=on --show -f "$W/loop-dio.raw")
PID[loop]=-
[[ $(</sys/block/"${DEV[loop]#/dev/}"/loop/dio) == 1 ]] || die "${DEV[loop]}: direct I/O did not turn on"
qemu-nbd --cache=none --aio=io_uring -f qcow2 --pid-file="$W/nbd.pid" -c /dev/nbd0 "$W/nbd-none.qcow2"
DEV[nbd]=/dev/nbd0
PID[nbd]=$(<"$W/nbd.pid")
if ((BUFFERED)); then
  DEV[loop-buf]=$(losetup --direct-io=off --show -f "$W/loop-buf.raw")
  PID[loop-buf]=-
  qemu-nbd --cache=writeback --aio=io_uring -f qcow2 --pid-file="$W/nbd-wb.pid" -c /dev/nbd1 "$W/nbd-wb.qcow2"
  DEV[nbd-wb]=/dev/nbd1
  PID[nbd-wb]=$(<"$W/nbd-wb.pid")
fi
for t in "${TARGETS[@]}"; do
  dev=${DEV[$t]}
  size=$(blockdev --getsize64 "$dev")
  ((size >= DATA_MB * 1048576)) || die "$t: $dev is $size bytes, want $((DATA_MB * 1048576))"
  hwq=(/sys/block/"${dev#/dev/}"/mq/*)
  meta "dev_$t" "$dev pid=${PID[$t]} queues=${#hwq[@]} sched=$(sed 's/.*\[\(.*\)\].*/\1/' /sys/block/"${dev#/dev/}"/queue/scheduler)"
  log "$t: $dev (pid ${PID[$t]})"
done

# --- runs -------------------------------------------------------------------------------
cd /tmp
failed=0
for ((k = 0; k < REPEAT; k++)); do
  for ((r = 0; r < ${#ROWS[@]}; r++)); do
    IFS='|' read -r id rw bs qd label <<<"${ROWS[r]}"
    if ((k == 0)); then
      meta "row_$id" "$rw|$bs|$qd|$label"
    else
      id="$id~$k"
    fi
    # Rotate who goes first, so drift in the host's load spreads over the targets.
    order=()
    n=${#TARGETS[@]}
    for ((i = 0; i < n; i++)); do order+=("${TARGETS[(i + r + k) % n]}"); done
    job=$W/fio/$id.fio
    {
      echo "[global]"
      echo "ioengine=io_uring"
      echo "direct=1"
      echo "thread=1"
      echo "rw=$rw"
      echo "bs=$bs"
      echo "iodepth=$qd"
      echo "size=${DATA_MB}M"
      echo "time_based=1"
      echo "runtime=$RUNTIME"
      echo "ramp_time=$RAMP"
      echo "norandommap=1"
      echo "randrepeat=0"
      for t in "${order[@]}"; do
        dn=${DEV[$t]#/dev/}
        echo
        echo "[$t]"
        echo "stonewall"
        echo "filename=${DEV[$t]}"
        echo "exec_prerun=/bin/bash $SELF --snap pre $id $t $dn ${PID[$t]}"
        echo "exec_postrun=/bin/bash $SELF --snap post $id $t $dn ${PID[$t]}"
      done
    } >"$job"
    log "row $id ($label, QD$qd; round $((k + 1)) of $REPEAT): ${order[*]}"
    if ! fio --eta=never --output-format=json --output="$W/fio/$id.json" "$job" >"$W/fio/$id.out" 2>&1; then
      log "fio failed on row $id:"
      tail -n 20 "$W/fio/$id.out"
      failed=1
      continue
    fi
    # One line per job: IOPS, bytes/s, I/Os (read + write), mean completion latency, error.
    # (fio puts "Saving output of prerun ..." lines above the JSON in the same file.)
    sed -n '/^{/,$p' "$W/fio/$id.json" >"$W/fio/$id.clean.json"
    jq -r --arg row "$id" '.jobs[] |
      "rec|fio|\($row)|\(.jobname)|\(.read.iops + .write.iops)|\(.read.bw_bytes + .write.bw_bytes)|\(.read.total_ios + .write.total_ios)|\(if .read.total_ios > 0 then .read.clat_ns.mean else .write.clat_ns.mean end)|\(.error)"' \
      "$W/fio/$id.clean.json" >>"$W/records"
    # (No process substitution: the guest's /dev has no /dev/fd.)
    while IFS='|' read -r _ _ _ t iops _; do log "  $t: $(printf '%.0f' "$iops") IOPS"; done \
      <<<"$(grep "^rec|fio|$id|" "$W/records")"
  done
done

# Peak memory once more, then the daemons' own account of their queues.
for t in ours1 ours2 ours1p ours-enc nbd nbd-wb nbd-enc; do
  [[ -n ${PID[$t]:-} && -r /proc/${PID[$t]}/status ]] || continue
  meta "final_mem_$t" "$(grep -E '^Vm(HWM|RSS)' /proc/"${PID[$t]}"/status | tr -s ' \t' ' ' | paste -sd' ')"
done
for t in ours1 ours2 ours1p ours-enc; do
  [[ -n ${DEV[$t]:-} ]] || continue
  id=${DEV[$t]#/dev/ublkb}
  "$BIN" del -n "$id"
  DEV[$t]=
  meta "log_$t" "$(grep -E 'served queue|queue 0:' /run/ublk-qcow2/"$id".log 2>/dev/null | tail -n 2 | paste -sd' ' || true)"
done

# --- the engine alone: ublk-qcow2 bench on ours1.qcow2 (no ublk in the path) -------------
# Same image, same 4k random rows, buffered (-t writeback) and O_DIRECT (-t none, as
# the daemon opens images by default): what the engine and its file I/O cost per request, so that
# the daemon's CPU per I/O above splits into engine + ublk round trip. After `del`, as
# the daemon holds the image's lock.
if ((ENGINE)); then
  TIMEFORMAT='%3U %3S %3R'
  # Start-up and open/close cost (one request), subtracted in the report.
  for mode in writeback none; do
    { time "$BIN" bench -q -t "$mode" -i io_uring -c 1 -d 1 -s 4096 "$W/ours1.qcow2" >/dev/null 2>&1; } 2>"$W/engine.time"
    read -r user sys real <"$W/engine.time"
    echo "rec|engine|start|$mode|0|$user|$sys|$real|1|1" >>"$W/records"
  done
  for spec in "rr4k1|1|${ENGINE_QD1}|" "rr4k32|32|${ENGINE_QD32}|" "rw4k1|1|${ENGINE_QD1}|-w" "rw4k32|32|${ENGINE_QD32}|-w"; do
    IFS='|' read -r id qd count wflag <<<"$spec"
    for mode in writeback none; do
      sync
      echo 3 >/proc/sys/vm/drop_caches
      args=(bench -q -t "$mode" -i io_uring --random -c "$count" -d "$qd" -s 4096)
      [[ -n $wflag ]] && args+=(-w --pattern=0xa5)
      if { time "$BIN" "${args[@]}" "$W/ours1.qcow2" >"$W/engine.out" 2>&1; } 2>"$W/engine.time"; then
        iops=$(awk '/^IOPS:/ {gsub(",", "", $2); print $2}' "$W/engine.out")
        read -r user sys real <"$W/engine.time"
        echo "rec|engine|$id|$mode|$iops|$user|$sys|$real|$count|$qd" >>"$W/records"
        log "engine alone $id -t $mode: $iops IOPS, ${user}s user + ${sys}s sys for $count requests"
      else
        log "engine alone $id -t $mode failed: $(tail -n 3 "$W/engine.out")"
        failed=1
      fi
    done
  done
fi
meta elapsed_s $((SECONDS - T0))

echo "=== device-bench records begin ==="
cat "$W/records" "$W/snaps"
echo "=== device-bench records end ==="
log "done in $((SECONDS - T0))s"
exit "$failed"
