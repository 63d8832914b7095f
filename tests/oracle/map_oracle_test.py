#!/usr/bin/python3
"""`ublk-qcow2 map` against `qemu-img map` (QEMU 7.2), byte for byte.

Each case builds images with qemu-img/qemu-io (and sparse raw files with
Python), then maps one or more of them, with and without --start-offset /
--max-length, in both output forms:

  * --output=json: stdout must be identical, and so must the exit status;
  * human: stdout identical (qemu-img stops with exit 1 at the first data
    range without a host offset, e.g. a compressed cluster, after printing
    what came before; ours must print the same and exit 1 with one stderr
    line `ublk-qcow2: IMAGE: ...`).

Usage: map_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
"""

import os
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import Case, CaseFailure  # noqa: E402

K = 1 << 10
M = 1 << 20
G = 1 << 30
TIMEOUT = 60

CASES = []


case = L.case_registry(CASES, Case)


def pattern_writes(b, img, cs, size, fmt="qcow2"):
    """Writes, zeroes and discards spread over the image, at and across
    cluster boundaries, so runs of every kind meet each other."""
    cmds = [
        ("noise", 0, cs),
        ("noise", 3 * cs + cs // 2, cs),            # two half clusters
        "write -P 0x22 %d %d" % (8 * cs, 4 * cs),    # a run of four
        "write -z %d %d" % (9 * cs, cs),             # zero, keeps its place
        "write -z %d %d" % (20 * cs, 2 * cs),        # zero, never allocated
        "write -P 0x33 %d %d" % (24 * cs, 2 * cs),
        "discard %d %d" % (25 * cs, cs),
        "write -z -u %d %d" % (11 * cs, cs),         # zero, place released
        # Guest neighbours whose host clusters are not: written in reverse
        # order, so cluster 14 lies after cluster 15 in the file.
        "write -P 0x55 %d %d" % (15 * cs, cs),
        "write -P 0x66 %d %d" % (14 * cs, cs),
    ]
    far = size - 3 * cs
    if far > 30 * cs:
        cmds.append("write -P 0x44 %d %d" % (far, 2 * cs))
    b.io(img, *cmds, fmt=fmt)


# --------------------------------------------------------------------------
# Cluster sizes


for cs in (512, 4 * K, 64 * K, 2 * M):
    def make(cs):
        @case("clusters/cs%d" % cs, "cluster_size=%d: data, zero (with and without a place), "
              "discard, a far write" % cs)
        def _(b):
            size = max(64 * M, 40 * cs)
            b.create("a.qcow2", size, opts={"cluster_size": cs})
            pattern_writes(b, "a.qcow2", cs, size)
            return [("a.qcow2", [])]
    make(cs)


for bits in (1, 64):
    def make(bits):
        @case("refcounts/r%d" % bits, "refcount_bits=%d: data, zero (with and without a place), "
              "discard, a far write; 512 B and 64 KiB clusters" % bits)
        def _(b):
            out = []
            for cs in (512, 64 * K):
                name = "r%d_cs%d.qcow2" % (bits, cs)
                size = max(16 * M, 40 * cs)
                b.create(name, size, opts={"cluster_size": cs, "refcount_bits": bits})
                pattern_writes(b, name, cs, size)
                out.append((name, []))
            return out
    make(bits)


@case("clusters/v2", "compat=0.10: no zero flag (write -z allocates zeros or leaves unallocated)")
def _(b):
    b.create("a.qcow2", 16 * M, opts={"compat": "0.10"})
    b.io("a.qcow2", "write -P 1 0 128k", "write -z 64k 64k", "write -z 1M 64k")
    return [("a.qcow2", [])]


# --------------------------------------------------------------------------
# Extended L2


@case("extl2/partial_64k", "extended_l2, 64 KiB clusters: partial subclusters, zeros, discard")
def _(b):
    b.create("a.qcow2", 8 * M, opts={"cluster_size": 64 * K, "extended_l2": "on"})
    b.io("a.qcow2", "write -P 1 4k 2k", "write -z 8k 4k", "write -P 2 63k 3k",
         "write -P 3 1M 64k", "write -z 1M 6k", "discard 1040k 8k", "write -z 3M 8k")
    return [("a.qcow2", [])]


@case("extl2/partial_16k", "extended_l2, 16 KiB clusters (512-byte subclusters, the "
      "smallest QEMU makes), unaligned writes")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 16 * K, "extended_l2": "on"})
    b.io("a.qcow2", "write -P 1 100 1000", "write -z 2048 512", "write -P 2 12k 200",
         "write -P 3 20k 8k", "write -z -u 21k 1k")
    return [("a.qcow2", [])]


@case("extl2/over_backing", "extended_l2 over a qcow2 backing file: unallocated subclusters "
      "of a mapped cluster read through")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.io("base.qcow2", "write -P 9 0 1M")
    b.create("a.qcow2", 4 * M, opts={"extended_l2": "on"}, backing="base.qcow2",
             backing_fmt="qcow2")
    b.io("a.qcow2", "write -P 1 4k 2k", "write -z 16k 4k", "write -P 2 2M 6k")
    return [("a.qcow2", [])]


# --------------------------------------------------------------------------
# Compressed


@case("compress/clusters", "compressed clusters among data (human form fails as qemu-img's)")
def _(b):
    b.create("a.qcow2", 8 * M)
    b.io("a.qcow2", "write -c -P 1 0 64k", "write -c -P 2 64k 64k", "write -P 3 128k 64k",
         "write -c -P 4 1M 64k")
    return [("a.qcow2", []), ("a.qcow2", ["--start-offset=128k", "--max-length=64k"])]


# --------------------------------------------------------------------------
# Backing chains


@case("backing/chain3_raw_base", "raw sparse base (holes), qcow2 mid, qcow2 top: depth 0..2")
def _(b):
    b.raw("base.raw", 8 * M, [(0, b"\x01" * (64 * K)), (1 * M, b"\x02" * 4096),
                              (5 * M + 512, b"\x03" * 100)])
    b.create("mid.qcow2", 8 * M, backing="base.raw", backing_fmt="raw")
    b.io("mid.qcow2", "write -P 3 512k 64k", "write -z 2M 64k", "discard 3M 64k")
    b.create("top.qcow2", 8 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 5 0 4k", "write -z 1M 4k", "write -P 6 6M 128k")
    return [("top.qcow2", []), ("mid.qcow2", []), ("base.raw", ["-f", "raw"])]


@case("backing/chain3_mixed_short", "qcow2 base, raw mid, qcow2 top, each shorter than the one "
      "above (zeros past a short backing file's end)")
def _(b):
    b.create("base.qcow2", 2 * M)
    b.io("base.qcow2", "write -P 1 0 1M")
    b.raw("mid.raw", 3 * M, [(1536 * K, b"\x07" * 8192)])
    b.create("mid2.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.create("top.qcow2", 8 * M, backing="mid.raw", backing_fmt="raw")
    b.io("top.qcow2", "write -P 5 2M 64k")
    b.create("top2.qcow2", 6 * M, backing="mid2.qcow2", backing_fmt="qcow2")
    b.io("top2.qcow2", "write -P 5 3M 64k", "write -z 5M 64k")
    return [("top.qcow2", []), ("top2.qcow2", [])]


@case("backing/short_qcow2_unaligned", "backing file whose size ends inside a cluster")
def _(b):
    b.create("base.qcow2", 1 * M + 1536)
    b.io("base.qcow2", "write -P 1 960k 64k")
    b.create("top.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    return [("top.qcow2", [])]


@case("backing/short_raw_odd", "raw backing file of an odd size (QEMU rounds it up to 512)")
def _(b):
    b.raw("base.raw", 1000 * 1000 + 7, [(0, b"\x01" * 5000), (999 * 1000, b"\x02" * 1007)])
    b.create("top.qcow2", 2 * M, backing="base.raw", backing_fmt="raw")
    b.io("top.qcow2", "write -P 5 64k 4k")
    return [("top.qcow2", [])]


# --------------------------------------------------------------------------
# External data files


@case("datafile/raw", "data_file_raw=on: offsets in the data file")
def _(b):
    b.create("a.qcow2", 8 * M, opts={"data_file": "a.data", "data_file_raw": "on"})
    b.io("a.qcow2", "write -P 1 0 64k", "write -P 2 1M 128k", "write -z 1088k 64k")
    return [("a.qcow2", [])]


@case("datafile/not_raw", "data file without data_file_raw: zeros, discards")
def _(b):
    b.create("a.qcow2", 8 * M, opts={"data_file": "a.data"})
    b.io("a.qcow2", "write -P 1 0 192k", "write -z 64k 64k", "discard 128k 64k",
         "write -P 2 4M 4k")
    return [("a.qcow2", [])]


# --------------------------------------------------------------------------
# Preallocation


@case("prealloc/metadata", "preallocation=metadata: mapped holes read as data+zero")
def _(b):
    b.create("a.qcow2", 16 * M, opts={"preallocation": "metadata"})
    b.io("a.qcow2", "write -P 1 64k 4k", "write -P 2 8M 1M")
    return [("a.qcow2", [])]


@case("prealloc/metadata_512", "preallocation=metadata with 512-byte clusters")
def _(b):
    b.create("a.qcow2", 2 * M, opts={"preallocation": "metadata", "cluster_size": 512})
    b.io("a.qcow2", "write -P 1 10k 20k")
    return [("a.qcow2", [])]


@case("prealloc/kinds", "preallocation=metadata with extended L2 and with a raw data file; "
      "falloc and full (mapped, allocated: data)")
def _(b):
    b.create("e.qcow2", 4 * M, opts={"preallocation": "metadata", "extended_l2": "on"})
    b.io("e.qcow2", "write -P 1 4k 2k")
    b.create("d.qcow2", 4 * M, opts={"preallocation": "metadata", "data_file": "d.raw",
                                     "data_file_raw": "on"})
    b.io("d.qcow2", "write -P 1 64k 4k")
    b.create("fa.qcow2", 8 * M, opts={"preallocation": "falloc"})
    b.create("fu.qcow2", 8 * M, opts={"preallocation": "full"})
    return [("e.qcow2", []), ("d.qcow2", []), ("fa.qcow2", []), ("fu.qcow2", [])]


# --------------------------------------------------------------------------
# Other image kinds


@case("other/snapshot_zstd", "an internal snapshot (shared clusters), then writes and a discard; "
      "zstd compressed clusters")
def _(b):
    b.create("s.qcow2", 4 * M)
    b.io("s.qcow2", "write -P 1 0 128k")
    b.snapshot("s.qcow2", "s1")
    b.io("s.qcow2", "write -P 2 64k 64k", "discard 0 64k")
    b.create("z.qcow2", 4 * M, opts={"compression_type": "zstd"})
    b.io("z.qcow2", "write -c -P 1 0 64k", "write -P 2 1M 64k")
    return [("s.qcow2", []), ("s.qcow2", ["-f", "raw"]), ("z.qcow2", [])]


# --------------------------------------------------------------------------
# Ranges, sizes


@case("range/offsets", "--start-offset / --max-length aligned, unaligned, past the end")
def _(b):
    b.create("a.qcow2", 16 * M, opts={"cluster_size": 4096})
    pattern_writes(b, "a.qcow2", 4096, 16 * M)
    views = []
    for args in (["--start-offset=4096"], ["--start-offset=1000"],
                 ["--start-offset=3000", "--max-length=100000"],
                 ["--max-length=12345"], ["--start-offset=40960", "--max-length=4096"],
                 ["--start-offset=%d" % (16 * M)], ["--start-offset=%d" % (20 * M)],
                 ["--max-length=0"], ["--start-offset=%d" % (16 * M - 10), "--max-length=100"],
                 ["--start-offset=64k", "--max-length=1M"]):
        views.append(("a.qcow2", args))
    return views


@case("range/raw_offsets", "a sparse raw image, unaligned ranges")
def _(b):
    b.raw("a.raw", 5 * M, [(4096, b"\x01" * 8192), (3 * M, b"\x02" * 10)])
    return [("a.raw", ["-f", "raw"]), ("a.raw", ["-f", "raw", "--start-offset=5000"]),
            ("a.raw", ["-f", "raw", "--start-offset=6000", "--max-length=3000000"])]


@case("size/odd", "virtual sizes that end inside a cluster and inside a sector")
def _(b):
    b.create("a.qcow2", 1000 * 1000 + 1024)
    b.io("a.qcow2", "write -P 1 960k 17000", "write -z 999936 1024")
    b.create("b.qcow2", 12345 * 512, opts={"cluster_size": 2 * M})
    b.io("b.qcow2", "write -P 1 0 4k")
    return [("a.qcow2", []), ("b.qcow2", [])]


@case("size/empty", "a zero-size image")
def _(b):
    b.create("a.qcow2", 0)
    return [("a.qcow2", []), ("a.qcow2", ["--start-offset=512"])]


@case("size/sparse_1t", "a 1 TiB image with a few writes (must be fast)")
def _(b):
    b.create("a.qcow2", 1 << 40)
    b.io("a.qcow2", "write -P 1 0 64k", "write -P 2 %d 64k" % (600 * G),
         "write -z %d 1M" % ((1 << 40) - M))
    return [("a.qcow2", [])]


# --------------------------------------------------------------------------


def compare(binary, b, log, image, args, form):
    out_flag = ["--output=json"] if form == "json" else []
    q = L.run([L.QEMU_IMG, "map"] + out_flag + args + [image], b.cwd, log, timeout=TIMEOUT)
    o = L.run([binary, "map"] + out_flag + args + [image], b.cwd, log, timeout=TIMEOUT)
    what = "map %s %s" % (" ".join(out_flag + args), image)
    if o.rc != q.rc:
        return ["%s: exit %s, qemu-img exit %d (stderr %r)" % (what, o.describe(), q.rc,
                                                                o.err[-300:])]
    problems = []
    if o.out != q.out:
        problems.append("%s: stdout differs\n--- qemu-img\n%s--- ours\n%s" % (
            what, q.out[:3000], o.out[:3000]))
    if q.rc != 0:
        lines = o.err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("ublk-qcow2: %s: " % image):
            problems.append("%s: stderr is not one line 'ublk-qcow2: %s: ...': %r"
                            % (what, image, o.err[:300]))
    return problems


def run_case(c, workdir, log, binary):
    b = L.Builder(workdir, log, sum(map(ord, c.name)))
    views = c.fn(b)
    problems = []
    for image, args in views:
        for form in ("json", "human"):
            problems += compare(binary, b, log, image, args, form)
    if problems:
        raise CaseFailure("\n".join(problems))
    return "%d map(s)" % (2 * len(views))


if __name__ == "__main__":
    sys.exit(L.run_suite("map_oracle", CASES, sys.argv[1:], run_case))
