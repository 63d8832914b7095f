#!/bin/bash
# bench/device.sh: the ublk device (/dev/ublkbN served by ublk-qcow2) against the kernel
# loop device on a raw file and qemu-nbd + the kernel nbd client, with fio, in ONE boot
# of the VM rig (tests/vm/run: QEMU under TCG, since this host has no ublk).
#
#   bench/device.sh                    build (-c opt), boot, measure, report (~10 min)
#   bench/device.sh --report RECORDS   only rebuild device.md/.dat/.png from saved records
#
# On the host: builds //tools:ublk-qcow2 with -c opt (--symlink_prefix=/, so the shared
# bazel-bin link is left alone), copies the binary aside (another build may replace it
# while the VM runs), boots one VM running bench/device-in-vm.sh (see there: images,
# devices, fio jobs, counters), cuts the records out of the console between its marker
# lines, and writes
#   bench/results/device.records  the raw records (input of --report)
#   bench/results/device.md       tables: throughput and ratios, CPU per I/O, memory,
#                                 write-back owed by buffered targets, targets met or not
#   bench/results/device.dat      gnuplot data;  bench/results/device.png  the chart
# Under TCG the guest's CPU is emulated: absolute numbers are ~10-50x below real
# hardware and move with the host's load; only ratios within one boot mean anything.
#
# Environment:
#   BENCH_RUNTIME   seconds per fio job (default 8), after BENCH_RAMP (default 2)
#   BENCH_BUFFERED  1: also loop without direct I/O and qemu-nbd --cache=writeback
#   BENCH_POLL_US   busy-poll window of the extra target "ours 1q poll" (default 500;
#                   0 leaves it out)
#                   (page-cache baselines, like for like with `add --cache=writeback`);
#                   0 (default): only the four targets of the issue
#   BENCH_ENCRYPTED 1: also a LUKS image (qemu-img's default cipher) served by ours and by
#                   qemu-nbd, and a table of the two (issue 18)
#   BENCH_ROWS      row ids to run (default all: rr4k1 rr4k32 rw4k1 rw4k32 sr1m4 sw1m4)
#   BENCH_REPEAT    rounds over all rows (default 1); with more, every figure is the
#                   median over the rounds and every ratio the median of the ratios
#                   taken within each round (targets of one round run back to back)
#   BENCH_DATA_MB   size of the data set and devices (default 1024)
#   BENCH_ENGINE    1 (default): afterwards, `ublk-qcow2 bench` on the same image for the
#                   4k random rows (buffered and O_DIRECT), the engine's cost without ublk
#   BENCH_ENGINE_COUNT  its requests at QD32 (default 100000; a tenth at QD1)
#   BENCH_BIN       a ublk-qcow2 binary to use instead of building one
#   BENCH_OUT       where the results go (default bench/results)
#   VM_TIMEOUT (default 1800), VM_SCRATCH_SIZE (default 10G), VM_*: see tests/vm/run
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/bench/results}
START=$(date +%s)
log() { echo "[$(($(date +%s) - START))s] $*" >&2; }

# --- report: records -> device.md, device.dat, device.png --------------------------------
report() {  # report RECORDS HOST_NOTE
  local records=$1 host_note=$2
  mkdir -p "$OUT"
  python3 - "$records" "$OUT/device.md" "$OUT/device.dat" "$host_note" <<'PY'
import sys, collections

records_path, md_path, dat_path, host_note = sys.argv[1:5]
meta, snap, engine = {}, {}, {}
fio = collections.defaultdict(dict)  # (row, target) -> {round: fio's figures}
for line in open(records_path):
    f = line.rstrip("\n").split("|")
    if len(f) < 3 or f[0] != "rec":
        continue
    if f[1] == "meta":
        meta[f[2]] = "|".join(f[3:])
    elif f[1] == "fio":
        # Rounds after the first record their row as ID~ROUND.
        row, _, rnd = f[2].partition("~")
        target = f[3]
        fio[(row, target)][int(rnd or 0)] = dict(iops=float(f[4]), bw=float(f[5]), ios=int(f[6]),
                                  clat_us=float(f[7]) / 1000, error=int(f[8]))
    elif f[1] == "engine":
        engine[(f[2], f[3])] = dict(iops=float(f[4]), cpu=float(f[5]) + float(f[6]), count=int(f[8]))
    elif f[1] == "snap":
        phase, row, target = f[2], f[3], f[4]
        snap[(phase, row, target)] = dict(
            t=float(f[5]), rsect=int(f[6]), wsect=int(f[7]), busy=int(f[8]), total=int(f[9]),
            ticks=None if f[10] == "-" else int(f[10]),
            hwm=None if f[11] == "-" else int(f[11]),
            rss=None if f[12] == "-" else int(f[12]),
            sync=f[13], threads=f[14] if len(f) > 14 else "-")

host_note = meta.get("host_note", host_note)
targets = meta.get("targets", "ours1 ours2 loop nbd").split()
rows = []  # (id, rw, bs, qd, label) in the order they ran
for key, value in meta.items():
    if key.startswith("row_"):
        rw, bs, qd, label = value.split("|")
        rows.append((key[4:], rw, int(bs), int(qd), label))
# Request buffer per tag of `ublk-qcow2 add` (its --max-io default), for the memory bound.
BUFFER_MIB = 1.0
NAMES = {"ours1": "ours 1q", "ours2": "ours 2q", "ours1p": "ours 1q poll", "loop": "loop (dio)", "nbd": "qemu-nbd (none)",
         "loop-buf": "loop (buffered)", "nbd-wb": "qemu-nbd (writeback)",
         "ours-enc": "ours 1q LUKS", "nbd-enc": "qemu-nbd LUKS (none)"}
TICK_US = 10000  # USER_HZ = 100

def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return None
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

def row_key(row, k):
    return row if k == 0 else f"{row}~{k}"

def rounds_of(row, target):
    return fio.get((row, target), {})

repeat = max([len(v) for v in fio.values()] or [1])

def derived_round(row, target, bs):
    """Counters around one fio job: I/Os seen by the device (ramp included), CPU."""
    pre, post = snap.get(("pre", row, target)), snap.get(("post", row, target))
    if not pre or not post:
        return None
    ios = (post["rsect"] - pre["rsect"] + post["wsect"] - pre["wsect"]) * 512 / bs
    if ios <= 0:
        return None
    d = dict(ios=ios, secs=post["t"] - pre["t"])
    d["vm_us"] = (post["busy"] - pre["busy"]) * TICK_US / ios
    d["vm_cores"] = (post["busy"] - pre["busy"]) / max(1, post["total"] - pre["total"]) * int(meta.get("cpus", 2))
    d["srv_us"] = (post["ticks"] - pre["ticks"]) * TICK_US / ios if post["ticks"] is not None else None
    d["srv_cores"] = ((post["ticks"] - pre["ticks"]) / 100 / d["secs"]) if post["ticks"] is not None else None
    d["hwm"] = post["hwm"]
    # Per thread name: ticks spent during the job (io-wq workers: those alive at the end).
    def threads(x):
        if x in ("-", ""):
            return {}
        return {k: int(v) for k, v in (kv.split("=") for kv in x.split(","))}
    tp, tq = threads(pre["threads"]), threads(post["threads"])
    d["threads"] = {k: tq[k] - tp.get(k, 0) for k in tq if k != "workers"}
    d["workers"] = tq.get("workers", 0)
    sync_ms, _, sync_busy = post["sync"].partition(":")
    d["sync_s"] = int(sync_ms) / 1000 if sync_ms not in ("-", "") else 0.0
    d["iops_wb"] = ios / (d["secs"] + d["sync_s"])
    return d

def derived(row, target, bs):
    """derived_round over the row's rounds: medians; peak RSS the highest; thread ticks summed."""
    ds = [derived_round(row_key(row, k), target, bs) for k in sorted(rounds_of(row, target))]
    ds = [d for d in ds if d]
    if len(ds) <= 1:
        return ds[0] if ds else None
    d = {}
    for key in ("ios", "secs", "vm_us", "vm_cores", "srv_us", "srv_cores", "sync_s", "iops_wb"):
        vals = [x[key] for x in ds if x[key] is not None]
        d[key] = median(vals) if vals else None
    peaks = [x["hwm"] for x in ds if x["hwm"]]
    d["hwm"] = max(peaks) if peaks else None
    threads = collections.Counter()
    for x in ds:
        threads.update(x["threads"])
    d["threads"] = dict(threads)
    d["workers"] = max(x["workers"] for x in ds)
    return d

def ratio(a, b):
    return a / b if a and b else None

def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}"

def cell(row, target):
    rs = rounds_of(row, target).values()
    if not rs:
        return "-"
    errors = [x["error"] for x in rs if x["error"]]
    if errors:
        return f"error {errors[0]}"
    return f"{iops(row, target):.0f} ({median([x['bw'] for x in rs]) / 1048576:.1f})"

def iops(row, target):
    """Median IOPS over the rounds."""
    return median([x["iops"] for x in rounds_of(row, target).values() if not x["error"]])

def round_ratios(row, a, b):
    """a's IOPS / b's in each round both ran: targets of one round ran back to back."""
    ra, rb = rounds_of(row, a), rounds_of(row, b)
    return [ra[k]["iops"] / rb[k]["iops"] for k in sorted(ra)
            if k in rb and not ra[k]["error"] and not rb[k]["error"] and rb[k]["iops"]]

def rratio(row, a, b):
    """The median of the per-round ratios (with one round: the ratio)."""
    return median(round_ratios(row, a, b))

buffered = "loop-buf" in targets
polled = "ours1p" in targets
out = []
def w(line):
    out.append(line)
    if line.startswith("### "):
        out.append("")
        out.append("*QEMU TCG guest: absolute figures are emulation-bound; compare within this boot only.*")
w("# Device benchmark: ublk-qcow2 vs loop vs qemu-nbd, fio inside the VM rig")
w("")
w(f"Generated by bench/device.sh on {meta.get('date', '?')}: one boot of tests/vm/run "
  f"(QEMU **TCG**, {meta.get('cpus', '?')} vCPUs, {meta.get('mem_mib', '?')} MiB, guest kernel "
  f"{meta.get('kernel', '?')}; {meta.get('fio', '?')}, {meta.get('qemu_nbd', '?')}); {host_note}. "
  f"VM time in the benchmark script: {meta.get('elapsed_s', '?')} s.")
w("")
w("**The VM runs under TCG (emulated CPU): absolute numbers are far below real hardware and "
  "move with the host's load; only the ratios between targets measured in this one boot mean "
  "anything.**")
w("")
w(f"Data: {int(meta.get('data_mb', 1024))} MiB from /dev/urandom, written once; the qcow2 images "
  f"(64 KiB clusters, {int(meta.get('image_allocated', 0) or 0) / 1048576:.0f} MiB of data clusters "
  "allocated) are `qemu-img convert` of it, the raw files copies of it, so every read reads written "
  f"data. fio: `ioengine=io_uring direct=1 time_based runtime={meta.get('runtime')} "
  f"ramp_time={meta.get('ramp')} norandommap thread`, one job, each target a stonewalled job in one "
  "fio run per row (order rotated per row); `sync` + `drop_caches` before every job."
  + (f" Every row ran in {repeat} rounds (all rows, then all again; the order rotated once more "
     "per round): figures are medians over the rounds, ratios the medians of the ratios taken "
     "within each round (its targets ran back to back), CPU per I/O the median over the rounds; "
     "the table \"Rounds\" has every round's ratios." if repeat > 1 else ""))
w("")
w("Targets: " + "; ".join(f"**{NAMES[t]}** {meta.get('dev_' + t, '')}" for t in targets) + ".")
w("ours = `ublk-qcow2 add -f IMG -q 1|2` (defaults: depth 128, 32 MiB metadata cache, `--cache=none`: "
  "the daemon's host I/O is O_DIRECT); loop (dio) = `losetup "
  "--direct-io=on`; qemu-nbd (none) = `qemu-nbd --cache=none --aio=io_uring -f qcow2 -c /dev/nbd0`"
  + ("; loop (buffered) = `losetup --direct-io=off`; qemu-nbd (writeback) = `--cache=writeback "
     "--aio=io_uring`: page-cache baselines" if buffered else "")
  + (f"; ours 1q poll = `add -q 1 --poll-us={meta.get('poll_us')}`: the queue thread busy-polls its "
     "ring that long before it sleeps (a core for lower latency; off by default)." if polled else "."))
w("")
w("### Throughput: IOPS (MiB/s); ratios use ours 1q")
w("")
hdr = ["workload", "QD"] + [NAMES[t] for t in ("ours1", "ours2", "loop", "nbd")] + ["ours/loop", "ours/nbd"]
if buffered:
    hdr += [NAMES["loop-buf"], NAMES["nbd-wb"], "ours/loop-buf", "ours/nbd-wb"]
if polled:
    hdr += [NAMES["ours1p"], "poll/loop", "poll/nbd"]
w("| " + " | ".join(hdr) + " |")
w("|---|---:|" + "---:|" * (len(hdr) - 2))
dat = []
for rid, rw, bs, qd, label in rows:
    cells = [label, str(qd)] + [cell(rid, t) for t in ("ours1", "ours2", "loop", "nbd")]
    cells += [fmt_ratio(rratio(rid, "ours1", "loop")),
              fmt_ratio(rratio(rid, "ours1", "nbd"))]
    if buffered:
        cells += [cell(rid, "loop-buf"), cell(rid, "nbd-wb"),
                  fmt_ratio(rratio(rid, "ours1", "loop-buf")),
                  fmt_ratio(rratio(rid, "ours1", "nbd-wb"))]
    if polled:
        cells += [cell(rid, "ours1p"),
                  fmt_ratio(rratio(rid, "ours1p", "loop")),
                  fmt_ratio(rratio(rid, "ours1p", "nbd"))]
    w("| " + " | ".join(cells) + " |")
    vals = []
    for t in ("ours1", "ours2", "loop", "nbd", "loop-buf", "nbd-wb"):
        v = iops(rid, t)
        vals.append(f"{v:.0f}" if v else "NaN")
    for t in ("ours1", "ours2", "loop", "nbd", "loop-buf", "nbd-wb"):
        d = derived(rid, t, bs)
        vals.append(f"{d['vm_us']:.1f}" if d else "NaN")
    v, d = iops(rid, "ours1p"), derived(rid, "ours1p", bs)
    vals += [f"{v:.0f}" if v else "NaN", f"{d['vm_us']:.1f}" if d else "NaN"]
    dat.append(f'"{label} QD{qd}" ' + " ".join(vals))
w("")
encrypted = "ours-enc" in targets
if encrypted:
    w("### Encrypted: a LUKS copy of the image (aes-256-xts-plain64, QEMU's default)")
    w("")
    w("ours = `add --key-file KEY -q 1`; qemu-nbd = `--cache=none --aio=io_uring --object secret "
      "--image-opts`. The last column is what encryption costs ours (against ours 1q on the plain "
      "image).")
    w("")
    w("| workload | QD | " + NAMES["ours-enc"] + " | " + NAMES["nbd-enc"] +
      " | ours LUKS / qemu-nbd LUKS | ours LUKS / ours plain |")
    w("|---|---:|---:|---:|---:|---:|")
    for rid, rw, bs, qd, label in rows:
        w(f"| {label} | {qd} | {cell(rid, 'ours-enc')} | {cell(rid, 'nbd-enc')} | "
          f"{fmt_ratio(rratio(rid, 'ours-enc', 'nbd-enc'))} | "
          f"{fmt_ratio(rratio(rid, 'ours-enc', 'ours1'))} |")
    w("")
if repeat > 1:
    w("### Rounds: every round's ratios, in the order the rounds ran")
    w("")
    pairs = [("ours1", "loop"), ("ours1", "nbd")] + ([("ours1p", "loop")] if polled else [])
    w("| workload | QD | " + " | ".join(f"{NAMES[a]} / {NAMES[b]}" for a, b in pairs) + " |")
    w("|---|---:|" + "---|" * len(pairs))
    for rid, rw, bs, qd, label in rows:
        w(f"| {label} | {qd} | " + " | ".join(
            " / ".join(f"{x:.2f}" for x in round_ratios(rid, a, b)) or "-" for a, b in pairs) + " |")
    w("")
w("### CPU per I/O (µs of emulated CPU time; I/Os counted by the device, ramp included)")
w("")
w("Serving process = `utime+stime` of the ublk-qcow2 daemon (all its threads) or of qemu-nbd, "
  "from /proc/PID/stat; loop has none (kernel threads). Whole VM = busy time of both vCPUs "
  "(/proc/stat): fio, kernel, server. In parentheses: cores busy.")
w("")
srv_t = [t for t in ("ours1", "ours2", "ours1p", "ours-enc", "nbd", "nbd-wb", "nbd-enc")
         if t in targets]
hdr = ["workload", "QD"] + [f"server: {NAMES[t]}" for t in srv_t] + [f"VM: {NAMES[t]}" for t in targets]
w("| " + " | ".join(hdr) + " |")
w("|---|---:|" + "---:|" * (len(hdr) - 2))
for rid, rw, bs, qd, label in rows:
    cells = [label, str(qd)]
    for t in srv_t:
        d = derived(rid, t, bs)
        cells.append(f"{d['srv_us']:.0f} ({d['srv_cores']:.2f})" if d and d["srv_us"] is not None else "-")
    for t in targets:
        d = derived(rid, t, bs)
        cells.append(f"{d['vm_us']:.0f} ({d['vm_cores']:.2f})" if d else "-")
    w("| " + " | ".join(cells) + " |")
w("")
w("### Where the serving process's CPU goes (share of its utime+stime, by thread name)")
w("")
w("`iou-wrk` = io_uring's io-wq worker threads (requests the kernel could not complete inline, "
  "e.g. buffered I/O that would block), counted while alive at the end of the job (they exit "
  "after ~5 s idle), with their number in brackets.")
w("")
w("| workload | QD | " + " | ".join(NAMES[t] for t in srv_t) + " |")
w("|---|---:|" + "---:|" * len(srv_t))
for rid, rw, bs, qd, label in rows:
    cells = [label, str(qd)]
    for t in srv_t:
        d = derived(rid, t, bs)
        total = sum(max(0, v) for v in d["threads"].values()) if d else 0
        if not total:
            cells.append("-")
            continue
        parts = sorted(((v, k) for k, v in d["threads"].items() if v > 0), reverse=True)
        cells.append(", ".join(f"{k} {100 * v / total:.0f}%" + (f" [{d['workers']}]" if k == "iou-wrk" else "")
                               for v, k in parts if 100 * v / total >= 1))
    w("| " + " | ".join(cells) + " |")
w("")
w("### Memory: peak RSS (VmHWM, MiB) of the serving process after each row"
  + (" of the first round" if repeat > 1 else ""))
w("")
if repeat > 1:
    w("Later rounds only add to it (the peak over all rounds is under Targets): blk-mq hands "
      "out every tag in time, and each tag's buffer is touched as far as its largest request.")
    w("")
mem_t = [t for t in ("ours1", "ours2", "ours1p", "ours-enc", "nbd", "nbd-wb", "nbd-enc")
         if t in targets]
w("| after row | " + " | ".join(NAMES[t] for t in mem_t) + " |")
w("|---|" + "---:|" * len(mem_t))
for rid, rw, bs, qd, label in rows:
    cells = [f"{label} QD{qd}"]
    for t in mem_t:
        d = derived_round(rid, t, bs)
        cells.append(f"{d['hwm'] / 1024:.1f}" if d and d["hwm"] else "-")
    w("| " + " | ".join(cells) + " |")
w("")
writes = [r for r in rows if "write" in r[1]]
if writes:
    w("### Writes, counting the write-back they leave behind")
    w("")
    w("`sync` right after each job (outside fio's window) writes back what buffered targets left "
      "in the page cache. \"IOPS incl. write-back\" = I/Os seen by the device / (job time "
      "including ramp + that sync).")
    w("")
    w("| workload | QD | " + " | ".join(f"{NAMES[t]}: sync s / IOPS incl. write-back" for t in targets) + " |")
    w("|---|---:|" + "---:|" * len(targets))
    for rid, rw, bs, qd, label in writes:
        cells = [label, str(qd)]
        for t in targets:
            d = derived(rid, t, bs)
            cells.append(f"{d['sync_s']:.1f} / {d['iops_wb']:.0f}" if d else "-")
        w("| " + " | ".join(cells) + " |")
    w("")

if engine:
    w("### The engine alone: `ublk-qcow2 bench` on the same image, no ublk")
    w("")
    w("After the rows above, in the same boot: `ublk-qcow2 bench -q -i io_uring --random -s 4096 "
      "-d QD [-w] ours1.qcow2` with `-t writeback` (buffered) and "
      "`-t none` (O_DIRECT, as the daemon opens images by default); CPU = user+sys of the process, minus that of a one-request run "
      "(start-up, open, close), / requests. The daemon's CPU per I/O "
      "(ours 1q, from the table above) minus the O_DIRECT engine's is what the ublk round trip "
      "costs.")
    w("")
    w("| workload | QD | engine buffered: IOPS / µs CPU per req | engine O_DIRECT: IOPS / µs CPU per req "
      "| device ours 1q: IOPS / daemon µs per I/O | daemon − engine O_DIRECT (µs) |")
    w("|---|---:|---:|---:|---:|---:|")
    for rid, rw, bs, qd, label in rows:
        b, n = engine.get((rid, "writeback")), engine.get((rid, "none"))
        if not b and not n:
            continue
        def per_req(x, mode):
            start = engine.get(("start", mode))
            return (x["cpu"] - (start["cpu"] if start else 0)) * 1e6 / x["count"]
        def e(x, mode):
            return f"{x['iops']:.0f} / {per_req(x, mode):.0f}" if x else "-"
        d = derived(rid, "ours1", bs)
        dev = f"{iops(rid, 'ours1'):.0f} / {d['srv_us']:.0f}" if d and d["srv_us"] is not None else "-"
        diff = f"{d['srv_us'] - per_req(n, 'none'):.0f}" if d and n and d["srv_us"] is not None else "-"
        w(f"| {label} | {qd} | {e(b, 'writeback')} | {e(n, 'none')} | {dev} | {diff} |")
    w("")

# Targets from the issue.
w("### Targets (from the issue; checked here, not by tests)")
w("")
rand = [r for r in rows if r[1] in ("randread", "randwrite") and r[2] == 4096]
def verdict(rs, other, want, ours="ours1"):
    got = [(r, rratio(r[0], ours, other)) for r in rs]
    got = [(r, x) for r, x in got if x is not None]
    if not got:
        return "not measured"
    met = sum(1 for _, x in got if x >= want)
    detail = ", ".join(f"{r[4]} QD{r[3]} {x:.2f}x" for r, x in got)
    return f"**{'met' if met == len(got) else 'NOT met'}**: {met} of {len(got)} rows reach it ({detail})"
w(f"- ours ≥ 3x qemu-nbd (cache=none) IOPS on 4k random I/O: {verdict(rand, 'nbd', 3.0)}.")
if buffered:
    w(f"  Against qemu-nbd with the page cache (like for like): {verdict(rand, 'nbd-wb', 3.0)}.")
rr = [r for r in rand if r[1] == "randread"]
w(f"- ours ≥ 0.9x loop (direct I/O) on 4k random reads: {verdict(rr, 'loop', 0.9)}.")
if buffered:
    w(f"  Against buffered loop: {verdict(rr, 'loop-buf', 0.9)}.")
if polled:
    w(f"  With --poll-us={meta.get('poll_us')} (ours 1q poll): {verdict(rr, 'loop', 0.9, 'ours1p')}; "
      f"against qemu-nbd on 4k random I/O: {verdict(rand, 'nbd', 3.0, 'ours1p')}.")
for t, q in (("ours1", 1), ("ours2", 2), ("ours1p", 1)):
    if t not in targets:
        continue
    peaks = [derived(r[0], t, r[2]) for r in rows]
    peaks = [d["hwm"] for d in peaks if d and d["hwm"]]
    if peaks:
        bound = 32 + q * 128 * BUFFER_MIB
        w(f"- memory, {NAMES[t]}: peak RSS {max(peaks) / 1024:.1f} MiB; bound = 32 MiB cache + "
          f"{q} x 128 tags x {BUFFER_MIB * 1024:.0f} KiB buffers = {bound:.0f} MiB (+ the binary): "
          f"{'within' if max(peaks) / 1024 <= bound + 16 else 'ABOVE'}.")
w("")
extra = [(k, v) for k, v in meta.items() if k.startswith(("log_", "final_mem_", "prep_"))]
if extra:
    w("Also recorded: " + "; ".join(f"{k} = `{v}`" for k, v in extra) + ".")
    w("")
open(md_path, "w").write("\n".join(out))
open(dat_path, "w").write(
    "# label, IOPS: ours1 ours2 loop nbd loop-buf nbd-wb, then VM CPU us/IO in the same order, "
    "then ours1p IOPS and VM CPU us/IO\n"
    + "\n".join(dat) + "\n")
PY
  local buffered_plot=""
  grep -q '^rec|meta|targets|.*loop-buf' "$records" &&
    buffered_plot=', "" using 6 title "loop (buffered)", "" using 7 title "qemu-nbd (writeback)"'
  local buffered_cpu=""
  grep -q '^rec|meta|targets|.*loop-buf' "$records" &&
    buffered_cpu=', "" using 12 title "loop (buffered)", "" using 13 title "qemu-nbd (writeback)"'
  local polled_plot="" polled_cpu=""
  if grep -q '^rec|meta|targets|.*ours1p' "$records"; then
    polled_plot=', "" using 14 title "ours 1q poll"'
    polled_cpu=', "" using 15 title "ours 1q poll"'
  fi
  gnuplot <<EOF
set terminal pngcairo size 1400,900 font ",9" noenhanced
set output "$OUT/device.png"
set multiplot layout 2,1 title "fio io_uring direct=1 on the block device, inside a QEMU TCG VM (one boot: compare within a group only)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set logscale y
set grid ytics
set key outside right top vertical
set xtics scale 0
set ylabel "IOPS (log)"
set title "Throughput"
plot "$OUT/device.dat" using 2:xtic(1) title "ours 1q", "" using 3 title "ours 2q", \
     "" using 4 title "loop (dio)", "" using 5 title "qemu-nbd (none)"$buffered_plot$polled_plot
set ylabel "µs CPU per I/O (log)"
set title "Whole-VM CPU time per I/O (fio + kernel + server)"
plot "$OUT/device.dat" using 8:xtic(1) title "ours 1q", "" using 9 title "ours 2q", \
     "" using 10 title "loop (dio)", "" using 11 title "qemu-nbd (none)"$buffered_cpu$polled_cpu
unset multiplot
EOF
  log "wrote $OUT/device.md, device.dat, device.png"
}

if [[ ${1:-} == --report ]]; then
  [[ -r ${2:-} ]] || { echo "usage: bench/device.sh --report RECORDS" >&2; exit 2; }
  report "$2" "${3:-host load average not recorded}"
  cat "$OUT/device.md"
  exit 0
fi

# --- tools ---
source "$ROOT/bench/lib.bash"
bench_install fio:fio jq:jq gnuplot:gnuplot-nox qemu-img:qemu-utils qemu-nbd:qemu-utils python3:python3

work=$(mktemp -d "${TMPDIR:-/tmp}/ublk-device-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

src=$(bench_binary)
# The name matters: `del` and `list` recognise daemons by their command name.
mkdir -p "$work/bin"
cp "$src" "$work/bin/ublk-qcow2"

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "host load average $load_start; booting the VM"
export VM_TIMEOUT=${VM_TIMEOUT:-1800}
export VM_SCRATCH_SIZE=${VM_SCRATCH_SIZE:-10G}
export VM_ENV_BENCH_BIN=$work/bin/ublk-qcow2
for v in BENCH_RUNTIME BENCH_RAMP BENCH_DATA_MB BENCH_BUFFERED BENCH_POLL_US BENCH_ROWS BENCH_REPEAT BENCH_ENGINE BENCH_ENGINE_COUNT BENCH_ENCRYPTED; do
  [[ -n ${!v:-} ]] && export "VM_ENV_$v=${!v}"
done
vm_start=$(date +%s)
set +e
"$ROOT/tests/vm/run" bench/device-in-vm.sh 2>&1 | tee "$work/console.log"
status=${PIPESTATUS[0]}
set -e
vm_s=$(($(date +%s) - vm_start))
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

records=$work/records
sed -n '/^=== device-bench records begin ===$/,/^=== device-bench records end ===$/p' \
  "$work/console.log" | grep '^rec|' >"$records" || true
echo "rec|meta|date|$(date -u +%Y-%m-%d)" >>"$records"
if ! grep -q '^rec|fio|' "$records"; then
  echo "device.sh: the VM produced no results (status $status)" >&2
  exit 1
fi
mkdir -p "$OUT"
cp "$records" "$OUT/device.records"
host_note="host: $(nproc) cores, load average $load_start at boot and $load_end at the end; the VM ran ${vm_s} s"
echo "rec|meta|host_note|$host_note" >>"$OUT/device.records"
report "$OUT/device.records" "$host_note"
cat "$OUT/device.md"
((status == 0)) || { echo "device.sh: the in-VM part failed (status $status); results above are partial" >&2; exit 1; }
