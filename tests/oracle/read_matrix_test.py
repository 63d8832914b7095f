#!/usr/bin/python3
"""The read-path oracle matrix: for each image case, build the image with
qemu-img / qemu-io, then

  * `qemu-img convert -O raw IMG` vs `ublk-qcow2 convert -O raw IMG`:
    same file size and the same bytes (byte for byte; for huge sparse images
    over every data extent of either output, plus every range `qemu-img map`
    reports as data, plus seeded random spots);
  * `qemu-img info --output=json IMG` vs `ublk-qcow2 info --output=json IMG`
    (and with --backing-chain for images with a backing file): the same keys
    and values, field by field (actual-size included: ours runs right after).

Usage: read_matrix_test.py BINARY [--group G]... [--case SUBSTR]... [--list] [--keep]
One JUnit <testcase> per image case goes to $XML_OUTPUT_FILE.
"""

import json
import os
import random
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import Case, CaseFailure, SetupError  # noqa: E402

K = 1024
M = K * K
G = K * M
T = K * G


class Ctx:
    def __init__(self, workdir, log, binary, seed):
        self.cwd = workdir
        self.log = log
        self.binary = binary
        self.b = L.Builder(workdir, log, seed)


# --------------------------------------------------------------------------
# The check every case ends with

# A huge sparse image with a few writes: qemu-img converts it in well under a
# second; ours may take this long at most (generous for a loaded 2-core CI box).
LARGE_CONVERT_SECONDS = 15


def check(ctx, image, chain=False, large=False, map_check=False):
    log, cwd = ctx.log, ctx.cwd
    problems = []
    os.makedirs(os.path.join(cwd, "out"), exist_ok=True)
    q_out, o_out = "out/qemu.raw", "out/ours.raw"

    q = L.run([L.QEMU_IMG, "convert", "-O", "raw", image, q_out], cwd, log, timeout=240)
    if q.rc != 0:
        raise SetupError("qemu-img convert failed (%s): %s" % (q.describe(), q.err.strip()))
    q_alloc = os.stat(os.path.join(cwd, q_out)).st_blocks * 512
    max_alloc = max(256 * M, 4 * q_alloc) if large else 2 * G
    o = L.run([ctx.binary, "convert", "-O", "raw", image, o_out], cwd, log,
              timeout=120 if large else 60, watch=o_out, max_alloc=max_alloc)
    if o.rc != 0 or o.timed_out or o.killed_reason:
        problems.append("our convert failed (%s): %s" % (o.describe(), o.err.strip()[:400]))
    elif not os.path.exists(os.path.join(cwd, o_out)):
        problems.append("our convert exited 0 but wrote no %s" % o_out)
    else:
        if o.err.strip():
            log("note: our convert printed on stderr although it succeeded")
        o_alloc = os.stat(os.path.join(cwd, o_out)).st_blocks * 512
        log("output allocation: qemu %d bytes, ours %d bytes" % (q_alloc, o_alloc))
        extra = []
        if map_check:
            extra = map_ranges(ctx, image)
        try:
            L.compare_raw(os.path.join(cwd, q_out), os.path.join(cwd, o_out), extra)
            if map_check:
                spot_check(ctx, os.path.join(cwd, q_out), os.path.join(cwd, o_out))
            log("convert: identical (%d bytes)" % os.path.getsize(os.path.join(cwd, q_out)))
        except CaseFailure as e:
            problems.append("convert: " + str(e))
        if large and o.elapsed > LARGE_CONVERT_SECONDS:
            problems.append("our convert of a sparse %d-byte image took %.1f s (qemu-img: %.2f s;"
                            " limit %d s): it must skip unallocated ranges, not scan them"
                            % (os.path.getsize(os.path.join(cwd, q_out)), o.elapsed,
                               q.elapsed, LARGE_CONVERT_SECONDS))
        if large and o_alloc > max(64 * M, 2 * q_alloc + 16 * M):
            problems.append("our raw output is not sparse: %d bytes allocated, qemu's %d"
                            % (o_alloc, q_alloc))
    # Free the space before the next case (large outputs are sparse anyway).
    for f in (q_out, o_out):
        try:
            os.unlink(os.path.join(cwd, f))
        except FileNotFoundError:
            pass

    variants = [[]] + ([["--backing-chain"]] if chain else [])
    for extra_args in variants:
        problems += compare_info(ctx, image, extra_args)
    if problems:
        raise CaseFailure("\n".join(problems))


def compare_info(ctx, image, extra_args):
    label = "info" + "".join(" " + a for a in extra_args)
    q = L.run([L.QEMU_IMG, "info", "--output=json"] + extra_args + [image], ctx.cwd, ctx.log)
    o = L.run([ctx.binary, "info", "--output=json"] + extra_args + [image], ctx.cwd, ctx.log)
    if q.rc != 0:
        raise SetupError("qemu-img info failed: %s" % q.err.strip())
    if o.rc != 0 or o.timed_out:
        return ["%s: ours failed (%s): %s" % (label, o.describe(), o.err.strip()[:400])]
    expected = json.loads(q.out)
    try:
        got = json.loads(o.out)
    except ValueError as e:
        return ["%s: our output is not JSON (%s): %r" % (label, e, o.out[:300])]
    diffs = L.compare_json(expected, got)
    if diffs:
        ctx.log("qemu %s: %s" % (label, json.dumps(expected, sort_keys=True)))
        ctx.log("ours %s: %s" % (label, json.dumps(got, sort_keys=True)))
        return ["%s: %s" % (label, d) for d in diffs]
    ctx.log("%s: identical" % label)
    return []


def map_ranges(ctx, image):
    """Ranges `qemu-img map` reports as data (or explicit zero) in the image."""
    res = L.must([L.QEMU_IMG, "map", "--output=json", image], ctx.cwd, ctx.log)
    out = []
    for e in json.loads(res.out):
        if e.get("data") or (e.get("zero") and e.get("depth", 0) == 0 and e.get("present")):
            out.append((e["start"], e["start"] + e["length"]))
    ctx.log("qemu-img map: %d data/zero ranges, %d bytes" % (
        len(out), sum(e - s for s, e in out)))
    # Keep the explicit ranges bounded (all of them are small in our cases).
    total = 0
    bounded = []
    for s, e in out:
        if total + (e - s) > 512 * M:
            break
        bounded.append((s, e))
        total += e - s
    return bounded


def spot_check(ctx, q_path, o_path, n=64, size=4096):
    rng = random.Random(1234)
    total = os.path.getsize(q_path)
    with open(q_path, "rb") as fq, open(o_path, "rb") as fo:
        for _ in range(n):
            off = rng.randrange(0, max(1, total - size))
            fq.seek(off)
            fo.seek(off)
            a, b = fq.read(size), fo.read(size)
            if a != b:
                raise CaseFailure("random spot at %d differs" % off)
    ctx.log("spot check: %d random %d-byte reads identical" % (n, size))


def inside(size, writes):
    """Drops writes that do not fit in [0, size)."""
    out = []
    for w in writes:
        if isinstance(w, tuple):
            off, length = w[1], w[2]
        else:
            parts = w.split()
            off, length = int(parts[-2]), int(parts[-1])
        if off >= 0 and length > 0 and off + length <= size:
            out.append(w)
    return out


# --------------------------------------------------------------------------
# Cases

CASES = []


def case(group, name, doc=""):
    def deco(fn):
        CASES.append(Case(name, group, fn, doc))
        return fn
    return deco


def add(group, name, fn, doc=""):
    CASES.append(Case(name, group, fn, doc))


# -- cluster sizes x compat ------------------------------------------------

FMT_SIZES = {512: 200 * K + 1536, 4 * K: 5 * M + 1536, 64 * K: 520 * M + 3584,
             2 * M: 9 * M + 2560}


def fmt_case(cs, compat):
    def fn(ctx):
        b = ctx.b
        size = FMT_SIZES[cs]
        l2cov = cs * cs // 8  # bytes one L2 table maps
        b.create("t.qcow2", size, opts={"cluster_size": cs, "compat": compat})
        writes = [
            ("noise", cs - 100, 300),                     # crosses cluster 0/1
            "write -P 0x11 %d %d" % (3 * cs + 1, 2 * cs + 17),  # unaligned, several clusters
            ("noise", l2cov - 777, 2000),                 # crosses the first L2 boundary
            ("noise", 2 * l2cov - 5000, 9000),            # and the second
            ("noise", 3 * l2cov + cs // 2, 3 * cs),
            "write -P 0x22 %d %d" % (size - cs - 300, 200),
            ("noise", size - 1000, 1000),                 # the partial last cluster
            "write -z %d %d" % (cs - 50, 100),            # unaligned zero in written data
            "write -z %d %d" % (3 * cs, cs),              # aligned zero of a whole cluster
            "discard %d %d" % (4 * cs, cs),               # aligned discard
            ("noise", 3 * cs + cs // 2, cs),              # overwrite across the zeroed one
            "write -z -u %d %d" % (l2cov - cs, cs),       # zero with unmap
        ]
        if size > 300 * M:
            writes.append(("noise", 300 * M - 12345, 70000))
        b.io("t.qcow2", *inside(size, writes))
        check(ctx, "t.qcow2")
    return fn


for _cs in (512, 4 * K, 64 * K, 2 * M):
    for _compat in ("0.10", "1.1"):
        add("formats", "cluster%d_compat%s" % (_cs, _compat), fmt_case(_cs, _compat),
            "cluster_size=%d compat=%s, unaligned writes across clusters and L2 tables"
            % (_cs, _compat))


def empty_case(cs, compat):
    def fn(ctx):
        ctx.b.create("t.qcow2", 3 * M + 512, opts={"cluster_size": cs, "compat": compat})
        check(ctx, "t.qcow2")
    return fn


for _cs in (512, 2 * M):
    add("formats", "empty_cluster%d" % _cs, empty_case(_cs, "1.1"),
        "freshly created image, nothing written")


@case("formats", "zero_size", "virtual size 0")
def _(ctx):
    ctx.b.create("t.qcow2", 0)
    check(ctx, "t.qcow2")


@case("formats", "plain_convert_noise", "qemu-img convert (no -c) of a noisy raw file")
def _(ctx):
    b = ctx.b
    size = 3 * M + 512
    b.raw("src.raw", size, [(0, b.rng.randbytes(M)), (2 * M, b.rng.randbytes(M + 512))])
    b.qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4096", "src.raw", "t.qcow2")
    check(ctx, "t.qcow2")


# -- refcount widths --------------------------------------------------------

def refcount_case(bits):
    def fn(ctx):
        b = ctx.b
        size = 16 * M + 512
        b.create("t.qcow2", size, opts={"cluster_size": 4096, "refcount_bits": bits})
        b.io("t.qcow2", ("noise", 100, 20000), "write -P 0x5a %d %d" % (5 * M - 3, 70000),
             "write -z 8192 4096", "discard 12288 4096", ("noise", size - 5000, 5000),
             ("noise", 9 * M + 4000, 3 * M))
        if bits > 1:
            b.snapshot("t.qcow2", "s1")
            b.io("t.qcow2", ("noise", 50, 9000), "write -z %d 8192" % (9 * M + 8192))
        check(ctx, "t.qcow2")
    return fn


for _bits in (1, 2, 4, 8, 16, 32, 64):
    add("refcount", "refcount_bits%d" % _bits, refcount_case(_bits),
        "compat 1.1, refcount_bits=%d%s" % (_bits, "" if _bits == 1 else ", one snapshot"))


# -- extended L2 ------------------------------------------------------------

def extl2_case(cs, backing):
    def fn(ctx):
        b = ctx.b
        sc = cs // 32
        size = 6 * cs + 1536
        bk = None
        if backing == "qcow2":
            b.create("base.qcow2", size, opts={"cluster_size": 64 * K})
            b.io("base.qcow2", ("noise", 0, size))
            bk = ("base.qcow2", "qcow2")
        elif backing == "raw":
            b.raw("base.raw", size, [(0, b.rng.randbytes(size))])
            bk = ("base.raw", "raw")
        b.create("t.qcow2", size, opts={"cluster_size": cs, "extended_l2": "on"},
                 backing=bk and bk[0], backing_fmt=bk and bk[1])
        b.io("t.qcow2", *inside(size, [
            ("noise", sc * 3 + 7, max(1, sc // 3)),          # smaller than a subcluster
            "write -P 0x33 %d %d" % (sc * 5 - 100, 200),    # across a subcluster boundary
            "write -z %d %d" % (cs + sc * 2, sc * 2),       # zero 2 subclusters, new cluster
            "write -z %d %d" % (sc * 10 + 13, sc),          # unaligned zero
            "write -z -u %d %d" % (2 * cs + sc * 4, sc * 3),
            "discard %d %d" % (2 * cs + sc * 8, sc * 2),    # subcluster discard
            "write -P 0x44 %d %d" % (3 * cs, cs),            # a whole cluster ...
            "write -z %d %d" % (3 * cs + sc, sc),            # ... then zero a subcluster
            "discard %d %d" % (3 * cs + 4 * sc, 2 * sc),     # ... and discard two
            "discard %d %d" % (4 * cs, cs),                  # whole-cluster discard
            ("noise", 5 * cs - 50, 100),                     # across clusters
            ("noise", size - 300, 300),                      # end of the image
            "write -P 0x66 %d %d" % (4 * cs + sc * 7 + 1, 10),  # into the discarded cluster
        ]))
        check(ctx, "t.qcow2", chain=backing is not None)
    return fn


for _cs in (16 * K, 64 * K, 2 * M):
    add("extl2", "extl2_cluster%d_qcow2_backing" % _cs, extl2_case(_cs, "qcow2"),
        "extended_l2=on cluster_size=%d over a qcow2 backing full of noise" % _cs)
add("extl2", "extl2_cluster64k_raw_backing", extl2_case(64 * K, "raw"),
    "extended_l2=on over a raw backing file")
add("extl2", "extl2_cluster32k_no_backing", extl2_case(32 * K, None),
    "extended_l2=on without backing: unallocated subclusters read zeros")


# -- compression ------------------------------------------------------------

def compress_source(b, cs, nclusters, tail):
    """A raw file mixing compressible, incompressible, zero and one-byte clusters."""
    size = nclusters * cs + tail
    chunks = []
    kinds = ["text", "random", "zero", "byte", "half", "text", "random"]
    for i in range(nclusters + 1):
        off = i * cs
        n = min(cs, size - off)
        if n <= 0:
            break
        kind = kinds[i % len(kinds)]
        if kind == "text":
            chunks.append((off, L.compressible(b.rng, n)))
        elif kind == "random":
            chunks.append((off, b.rng.randbytes(n)))
        elif kind == "byte":
            chunks.append((off, bytes([0x80 + i % 64]) * n))
        elif kind == "half":
            chunks.append((off, L.compressible(b.rng, n // 2) + b.rng.randbytes(n - n // 2)))
    # The partial last cluster is compressible text.
    b.raw("src.raw", size, chunks + [(nclusters * cs, L.compressible(b.rng, tail))])
    return size


def compress_case(cs, ctype, compat="1.1"):
    def fn(ctx):
        b = ctx.b
        n = {4 * K: 40, 64 * K: 20, 2 * M: 5}[cs]
        compress_source(b, cs, n, 1536 if cs > 4 * K else 2560)
        b.qemu_img("convert", "-c", "-O", "qcow2", "-o",
                   "compression_type=%s,cluster_size=%d,compat=%s" % (ctype, cs, compat),
                   "src.raw", "t.qcow2")
        check(ctx, "t.qcow2")
    return fn


for _ctype in ("zlib", "zstd"):
    for _cs in (4 * K, 64 * K, 2 * M):
        add("compress", "convert_c_%s_cluster%d" % (_ctype, _cs), compress_case(_cs, _ctype),
            "qemu-img convert -c compression_type=%s cluster_size=%d" % (_ctype, _cs))
add("compress", "convert_c_zlib_cluster64k_compat010", compress_case(64 * K, "zlib", "0.10"),
    "compressed v2 image")


def compress_mixed_case(ctype):
    def fn(ctx):
        b = ctx.b
        cs = 64 * K
        size = compress_source(b, cs, 20, 1536)
        b.qemu_img("convert", "-c", "-O", "qcow2", "-o",
                   "compression_type=%s,cluster_size=%d" % (ctype, cs), "src.raw", "t.qcow2")
        b.io("t.qcow2",
             ("noise", 100, 1000),                      # partial write into a compressed cluster
             "write -P 0x77 %d %d" % (5 * cs - 10, 20),  # across two compressed clusters
             "write -z %d %d" % (7 * cs, cs),           # zero a compressed cluster
             "write -z %d %d" % (8 * cs + 100, 100),    # partial zero in a compressed cluster
             "discard %d %d" % (12 * cs, cs),           # discard a compressed cluster
             ("noise", 14 * cs, cs),                    # full overwrite
             # write -c needs an unallocated cluster: 9 and 16 are zero in src.raw
             "write -c -P 0x12 %d %d" % (9 * cs, cs),   # new compressed cluster (compressible)
             "write -c -s %s %d %d" % (b.noise_file(cs), 16 * cs, cs),  # incompressible
             ("noise", size - 10, 10))
        check(ctx, "t.qcow2")
    return fn


add("compress", "mixed_compressed_and_plain_zlib", compress_mixed_case("zlib"),
    "compressed image, then partial/full overwrites, zero, discard, write -c")
add("compress", "mixed_compressed_and_plain_zstd", compress_mixed_case("zstd"),
    "same with zstd")


@case("compress", "write_c_over_backing", "qemu-io write -c in an overlay (4k clusters)")
def _(ctx):
    b = ctx.b
    size = 2 * M
    b.create("base.qcow2", size)
    b.io("base.qcow2", ("noise", 0, size))
    b.create("t.qcow2", size, opts={"cluster_size": 4096}, backing="base.qcow2",
             backing_fmt="qcow2")
    b.io("t.qcow2", "write -c -P 0x21 0 4096", "write -c -P 0x22 8192 8192",
         "write -c -s %s 65536 4096" % b.noise_file(4096),
         "write -c -s %s %d 4096" % (b.noise_file(4096), size - 4096),
         ("noise", 9000, 100))
    check(ctx, "t.qcow2", chain=True)


# -- backing chains ---------------------------------------------------------

@case("backing", "chain_raw_qcow2_qcow2", "raw base <- qcow2 mid <- qcow2 top, overlapping writes")
def _(ctx):
    b = ctx.b
    size = 4 * M
    b.raw("base.raw", size, [(0, b.rng.randbytes(M)), (2 * M, b.rng.randbytes(2 * M))])
    b.create("mid.qcow2", size, opts={"cluster_size": 64 * K}, backing="base.raw",
             backing_fmt="raw")
    b.io("mid.qcow2", ("noise", 100 * K, 300 * K), "write -P 0x55 %d 5000" % (M + 1000),
         "write -z %d %d" % (2 * M, 64 * K), "discard %d %d" % (3 * M, 128 * K),
         ("noise", 3 * M + 64 * K - 7, 20))
    b.create("top.qcow2", size, opts={"cluster_size": 16 * K}, backing="mid.qcow2",
             backing_fmt="qcow2")
    b.io("top.qcow2", ("noise", 200 * K, 200 * K),
         "write -z %d 10000" % (2 * M + 512 * K),      # zero over base data, unaligned
         "write -z %d %d" % (3 * M + 512 * K, 64 * K),  # zero over base data, aligned
         "write -z -u %d %d" % (M + 512 * K, 32 * K),
         "discard %d %d" % (2 * M + 768 * K, 32 * K),
         "write -P 0x66 %d 3" % (3 * M + 64 * K - 2))
    check(ctx, "top.qcow2", chain=True)


@case("backing", "chain_qcow2_qcow2_qcow2", "three qcow2 levels, mixed cluster sizes and compat")
def _(ctx):
    b = ctx.b
    size = 3 * M + 512
    b.create("base.qcow2", size, opts={"cluster_size": 512, "compat": "0.10"})
    b.io("base.qcow2", ("noise", 0, size))
    b.create("mid.qcow2", size, opts={"cluster_size": 64 * K}, backing="base.qcow2",
             backing_fmt="qcow2")
    b.io("mid.qcow2", ("noise", 1000, 100 * K), "write -z %d %d" % (M, 128 * K),
         "discard %d %d" % (2 * M, 64 * K), "write -P 0x31 %d 700" % (size - 700))
    b.create("top.qcow2", size, opts={"cluster_size": 4 * K}, backing="mid.qcow2",
             backing_fmt="qcow2")
    b.io("top.qcow2", ("noise", 50 * K, 100 * K), "write -z %d 5000" % (M + 100 * K),
         "write -z %d %d" % (2 * M + 128 * K, 8 * K), "discard %d %d" % (40 * K, 8 * K),
         "write -P 0x32 %d 100" % (M + 64 * K - 50))
    check(ctx, "top.qcow2", chain=True)


@case("backing", "short_qcow2_backing", "backing 1 MiB under a 4 MiB overlay: zeros past its end")
def _(ctx):
    b = ctx.b
    b.create("base.qcow2", M)
    b.io("base.qcow2", ("noise", 0, M))
    b.create("top.qcow2", 4 * M, opts={"cluster_size": 64 * K}, backing="base.qcow2",
             backing_fmt="qcow2")
    b.io("top.qcow2", ("noise", M - 1000, 3000),     # straddles the base's end (COW past it)
         "write -P 0x41 %d 10" % (2 * M + 5))
    check(ctx, "top.qcow2", chain=True)


@case("backing", "short_raw_backing_odd_size",
      "raw backing of 1 MiB + 1000 bytes (not a sector multiple) under a 3 MiB overlay")
def _(ctx):
    b = ctx.b
    b.raw("base.raw", M + 1000, [(0, b.rng.randbytes(M + 1000))])
    b.create("top.qcow2", 3 * M, opts={"cluster_size": 4 * K}, backing="base.raw",
             backing_fmt="raw")
    b.io("top.qcow2", ("noise", M - 100, 50), "write -P 0x42 %d 10" % (M + 2000))
    check(ctx, "top.qcow2", chain=True)


@case("backing", "relative_backing_paths",
      "images in subdirectories, backing names relative to the image's directory")
def _(ctx):
    b = ctx.b
    size = 2 * M
    b.mkdir("lower")
    b.mkdir("img")
    b.create("lower/base.qcow2", size)
    b.io("lower/base.qcow2", ("noise", 0, size))
    b.create("img/mid.qcow2", size, backing="../lower/base.qcow2", backing_fmt="qcow2")
    b.io("img/mid.qcow2", ("noise", 64 * K, 64 * K))
    b.create("img/top.qcow2", size, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("img/top.qcow2", "write -P 0x43 %d 1000" % (100 * K), "write -z %d 4096" % M)
    check(ctx, "img/top.qcow2", chain=True)


@case("backing", "absolute_backing_path", "backing given as an absolute path")
def _(ctx):
    b = ctx.b
    b.create("base.qcow2", M)
    b.io("base.qcow2", ("noise", 0, M))
    b.create("top.qcow2", M, backing=b.path("base.qcow2"), backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 0x44 1000 1000")
    check(ctx, "top.qcow2", chain=True)


def strip_backing_format(path):
    L.rewrite_extensions(path, lambda exts: [e for e in exts if e[0] != L.EXT_BACKING_FORMAT])


def nofmt_case(base_fmt):
    def fn(ctx):
        b = ctx.b
        size = 2 * M
        if base_fmt == "qcow2":
            b.create("base.img", size)
            b.io("base.img", ("noise", 0, size))
        else:
            b.raw("base.img", size, [(0, b.rng.randbytes(size))])
        b.create("top.qcow2", size, backing="base.img", backing_fmt=base_fmt)
        b.io("top.qcow2", "write -P 0x45 %d 3000" % (64 * K - 1000))
        strip_backing_format(b.path("top.qcow2"))
        if any(t == L.EXT_BACKING_FORMAT for t, _, _ in L.header_extensions(b.path("top.qcow2"))):
            raise SetupError("backing format extension still present")
        check(ctx, "top.qcow2", chain=True)
    return fn


add("backing", "no_backing_format_qcow2", nofmt_case("qcow2"),
    "backing format extension removed: the qcow2 backing file must be probed")
add("backing", "no_backing_format_raw", nofmt_case("raw"),
    "backing format extension removed: the raw backing file must be probed")


@case("backing", "v2_overlay_zero_over_backing",
      "compat 0.10 overlay: write -z / discard over backing data (no zero flag in v2)")
def _(ctx):
    b = ctx.b
    size = 2 * M
    b.create("base.qcow2", size, opts={"compat": "0.10"})
    b.io("base.qcow2", ("noise", 0, size))
    b.create("top.qcow2", size, opts={"compat": "0.10", "cluster_size": 4096},
             backing="base.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -z 8192 8192", "write -z 20000 1000", "write -z -u 65536 4096",
         "discard 131072 8192", ("noise", 200000, 100))
    check(ctx, "top.qcow2", chain=True)


# -- v2 zero writes -----------------------------------------------------------

@case("v2", "v2_zero_writes_no_backing", "compat 0.10 write -z / -z -u / discard, no backing")
def _(ctx):
    b = ctx.b
    size = 4 * M + 512
    b.create("t.qcow2", size, opts={"compat": "0.10"})
    b.io("t.qcow2", ("noise", 0, M), "write -z %d %d" % (64 * K, 64 * K),
         "write -z %d 3000" % (200 * K + 7), "write -z -u %d %d" % (256 * K, 128 * K),
         "discard %d %d" % (512 * K, 64 * K), "write -z %d %d" % (2 * M, 64 * K),
         ("noise", size - 512, 512))
    check(ctx, "t.qcow2")


@case("v2", "v2_zero_writes_cluster512", "compat 0.10, 512-byte clusters, zero writes")
def _(ctx):
    b = ctx.b
    size = 100 * K
    b.create("t.qcow2", size, opts={"compat": "0.10", "cluster_size": 512})
    b.io("t.qcow2", ("noise", 0, size), "write -z 1024 512", "write -z 3000 100",
         "write -z %d %d" % (32 * K - 512, 1024), "discard 8192 1024")
    check(ctx, "t.qcow2")


# -- external data files ------------------------------------------------------

def datafile_case(raw_flag, absolute=False):
    def fn(ctx):
        b = ctx.b
        size = 8 * M + 1536
        opts = {"data_file": "t.data", "cluster_size": 64 * K}
        if raw_flag:
            opts["data_file_raw"] = "on"
        image = "t.qcow2"
        if absolute:
            # QEMU 7.2 opens a relative data file name relative to the *cwd*,
            # not to the image's directory, so a relative name in a
            # subdirectory is ambiguous; an absolute name is not.
            b.mkdir("img")
            image = "img/t.qcow2"
            opts["data_file"] = b.path("img/t.data")
        b.create(image, size, opts=opts)
        b.io(image, ("noise", 1000, 200 * K), "write -P 0x46 %d 5000" % (3 * M - 10),
             "write -z %d %d" % (64 * K, 64 * K), "write -z %d 100" % (150 * K),
             "discard %d %d" % (128 * K, 64 * K), ("noise", size - 700, 700))
        check(ctx, image)
    return fn


add("datafile", "data_file", datafile_case(False), "external data file, data_file_raw=off")
add("datafile", "data_file_raw", datafile_case(True), "external data file, data_file_raw=on")
add("datafile", "data_file_absolute_in_subdir", datafile_case(False, absolute=True),
    "image in a subdirectory, data file named by an absolute path")
add("datafile", "data_file_raw_absolute_in_subdir", datafile_case(True, absolute=True),
    "the same with data_file_raw=on")


# -- internal snapshots -------------------------------------------------------

@case("snapshots", "snapshots_between_writes", "two snapshots between writes; active state read")
def _(ctx):
    b = ctx.b
    size = 8 * M
    b.create("t.qcow2", size)
    b.io("t.qcow2", ("noise", 0, 2 * M), "write -P 0x51 %d %d" % (4 * M, M))
    b.snapshot("t.qcow2", "s1")
    b.io("t.qcow2", ("noise", M - 100, 200 * K), "write -z %d %d" % (4 * M, 64 * K),
         "discard %d %d" % (4 * M + 128 * K, 128 * K))
    b.snapshot("t.qcow2", "second snapshot")
    b.io("t.qcow2", ("noise", 6 * M, 70 * K), "write -z 0 1000")
    check(ctx, "t.qcow2")


@case("snapshots", "snapshots_cluster512_many", "512-byte clusters, five snapshots")
def _(ctx):
    b = ctx.b
    size = 300 * K
    b.create("t.qcow2", size, opts={"cluster_size": 512})
    for i in range(5):
        b.io("t.qcow2", ("noise", i * 33 * K + 100, 40 * K), "write -z %d 1024" % (i * 2048))
        b.snapshot("t.qcow2", "snap%d" % i)
    b.io("t.qcow2", ("noise", 250 * K, 10 * K))
    check(ctx, "t.qcow2")


@case("snapshots", "snapshot_delete_and_apply", "snapshots deleted and applied (qemu-img -d/-a)")
def _(ctx):
    b = ctx.b
    size = 4 * M
    b.create("t.qcow2", size)
    b.io("t.qcow2", ("noise", 0, M))
    b.snapshot("t.qcow2", "a")
    b.io("t.qcow2", ("noise", 512 * K, M))
    b.snapshot("t.qcow2", "b")
    b.io("t.qcow2", "write -P 0x52 0 %d" % (3 * M))
    b.snapshot("t.qcow2", "c")
    b.qemu_img("snapshot", "-d", "b", "t.qcow2")
    b.qemu_img("snapshot", "-a", "a", "t.qcow2")
    b.io("t.qcow2", "write -P 0x53 %d 100" % (2 * M))
    check(ctx, "t.qcow2")


@case("snapshots", "snapshot_over_compressed", "snapshot of a compressed image, then overwrites")
def _(ctx):
    b = ctx.b
    compress_source(b, 64 * K, 10, 512)
    b.qemu_img("convert", "-c", "-O", "qcow2", "src.raw", "t.qcow2")
    b.snapshot("t.qcow2", "s")
    b.io("t.qcow2", ("noise", 100, 1000), "write -z %d %d" % (64 * K, 64 * K))
    check(ctx, "t.qcow2")


@case("snapshots", "snapshot_vm_state_size_huge",
      "VM state sizes 2^64-1 and 2^63 (patched): qemu-img prints them signed in JSON")
def _(ctx):
    b = ctx.b
    b.create("t.qcow2", 4 * M)
    b.io("t.qcow2", ("noise", 0, 100 * K))
    b.snapshot("t.qcow2", "s1")
    b.snapshot("t.qcow2", "s2")
    p = b.path("t.qcow2")
    for entry, size in zip(L.snapshot_entries(p), (2**64 - 1, 2**63)):
        if L.read_be(p, entry + 36, 4) < 8:
            raise SetupError("snapshot entry without the 64-bit VM state size")
        L.write_be(p, entry + 40, 8, size)
    check(ctx, "t.qcow2")


# -- persistent dirty bitmaps -------------------------------------------------------
# info lists them under format-specific.data.bitmaps; the data reads as usual.

def bitmap_case(create_opts, bitmaps, size=64 * M, patch=None):
    """bitmaps: [(name, granularity or None, disabled)]; patch(path) runs last."""
    def fn(ctx):
        b = ctx.b
        b.create("t.qcow2", size, opts=create_opts)
        b.io("t.qcow2", ("noise", 1000, 300 * K), "write -z %d %d" % (size // 2, 64 * K))
        for name, granularity, disabled in bitmaps:
            args = ["bitmap", "--add"]
            if granularity:
                args += ["-g", granularity]
            if disabled:
                args.append("--disable")
            b.qemu_img(*(args + ["t.qcow2", name]))
        b.io("t.qcow2", ("noise", size - 5000, 5000))
        if patch:
            patch(b.path("t.qcow2"))
        check(ctx, "t.qcow2")
    return fn


def _set_bitmap_flags(index, flags):
    def patch(p):
        L.write_be(p, L.bitmap_entries(p)[index] + 12, 4, flags)
    return patch


def _clear_autoclear(p):
    L.hdr_set(p, "autoclear_features", L.hdr_get(p, "autoclear_features") & ~1)


add("bitmaps", "bitmap_one", bitmap_case(None, [("b0", None, False)]),
    "one bitmap, default granularity")
add("bitmaps", "bitmaps_granularities",
    bitmap_case(None, [("g512", 512, False), ("g64k", 65536, False), ("g1m", M, False),
                       ("g2g", 2 * G, False)]),
    "four bitmaps, granularity 512 B to 2 GiB")
add("bitmaps", "bitmap_disabled",
    bitmap_case(None, [("on", None, False), ("off", None, True)]),
    "an enabled and a disabled bitmap (flags auto / none)")
add("bitmaps", "bitmap_in_use",
    bitmap_case(None, [("a", None, False), ("b", None, True), ("c", None, False)],
                patch=lambda p: (_set_bitmap_flags(0, 3)(p), _set_bitmap_flags(1, 1)(p))),
    "bitmaps left in use (flags patched to in_use|auto and in_use)")
add("bitmaps", "bitmap_in_use_table_too_small",
    bitmap_case(None, [("a", 512, False)], size=4 * M,
                patch=lambda p: (L.hdr_set(p, "size", 512 * M), _set_bitmap_flags(0, 3)(p))),
    "an in-use bitmap whose table no longer covers the disk (size patched to 512 MiB)")
add("bitmaps", "bitmaps_extl2",
    bitmap_case({"extended_l2": "on"}, [("x", None, False), ("y", 4096, True)]),
    "extended L2 entries with two bitmaps")
add("bitmaps", "bitmaps_cluster512",
    bitmap_case({"cluster_size": 512}, [("small", 512, False), ("big", M, True)]),
    "512-byte clusters with bitmaps (a bitmap table of many entries)")
add("bitmaps", "bitmaps_cluster2M_extl2",
    bitmap_case({"cluster_size": 2 * M, "extended_l2": "on"},
                [("fine", 512, False), ("coarse", 2 * G, False)], size=G),
    "2 MiB clusters, extended L2, granularities 512 B and 2 GiB")
add("bitmaps", "bitmaps_stale_extension",
    bitmap_case(None, [("b0", None, False)], patch=_clear_autoclear),
    "autoclear bit 0 cleared: the extension is stale, qemu lists no bitmaps")


@case("bitmaps", "bitmaps_all_removed", "bitmaps added then all removed")
def _(ctx):
    b = ctx.b
    b.create("t.qcow2", 8 * M)
    b.qemu_img("bitmap", "--add", "t.qcow2", "a")
    b.qemu_img("bitmap", "--add", "t.qcow2", "b")
    b.qemu_img("bitmap", "--remove", "t.qcow2", "a")
    b.qemu_img("bitmap", "--remove", "t.qcow2", "b")
    b.io("t.qcow2", ("noise", 0, 100 * K))
    check(ctx, "t.qcow2")


@case("bitmaps", "bitmaps_in_backing_chain", "bitmaps in the top image and in its backing file")
def _(ctx):
    b = ctx.b
    b.create("base.qcow2", 8 * M)
    b.io("base.qcow2", ("noise", 0, M))
    b.qemu_img("bitmap", "--add", "-g", "1M", "base.qcow2", "base-bitmap")
    b.create("t.qcow2", 8 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.qemu_img("bitmap", "--add", "--disable", "t.qcow2", "top-bitmap")
    b.io("t.qcow2", ("noise", 512 * K, M))
    check(ctx, "t.qcow2", chain=True)


# -- large sparse images ----------------------------------------------------------

def large_case(size, cs, compat, writes):
    def fn(ctx):
        b = ctx.b
        b.create("t.qcow2", size, opts={"cluster_size": cs, "compat": compat})
        b.io("t.qcow2", *inside(size, writes(size, cs)))
        check(ctx, "t.qcow2", large=True, map_check=True)
    return fn


def _large_writes(size, cs):
    l2cov = cs * cs // 8
    return [("noise", 0, 5000), ("noise", l2cov - 100, 300), ("noise", 7 * l2cov + 3, cs),
            "write -P 0x61 %d %d" % (size // 2 - 7, 20), "write -z %d %d" % (size // 3, cs),
            "write -c -P 0x62 %d %d" % ((size // 4) // cs * cs, cs),
            ("noise", size - 3 * cs - 11, 3 * cs + 11)]


add("large", "sparse_1TiB_cluster64k", large_case(T, 64 * K, "1.1", _large_writes),
    "1 TiB virtual, few writes: convert must stay sparse and fast")
add("large", "sparse_1TiB_cluster64k_compat010", large_case(T, 64 * K, "0.10", _large_writes),
    "the same as a v2 image")
add("large", "sparse_600GiB_cluster2M", large_case(600 * G, 2 * M, "1.1",
    lambda size, cs: _large_writes(size, cs) + [("noise", 512 * G - 1000, 3000)]),
    "2 MiB clusters, a write across the 512 GiB L2 boundary")
add("large", "sparse_4GiB_cluster512", large_case(4 * G, 512, "1.1", _large_writes),
    "512-byte clusters, 4 GiB (L1 of 131072 entries)")


# -- header odds and ends -------------------------------------------------------------

def _simple_image(b, size=4 * M, opts=None):
    b.create("t.qcow2", size, opts=opts)
    b.io("t.qcow2", ("noise", 1000, 100 * K), "write -z %d 4096" % (64 * K))


@case("edge", "dirty_flag_set", "lazy_refcounts=on, dirty bit set: read-only open, dirty-flag true")
def _(ctx):
    b = ctx.b
    _simple_image(b, opts={"lazy_refcounts": "on"})
    p = b.path("t.qcow2")
    L.hdr_set(p, "incompatible_features", L.hdr_get(p, "incompatible_features") | 1)
    check(ctx, "t.qcow2")


@case("edge", "corrupt_flag_set", "corrupt bit set: qemu still reads it read-only")
def _(ctx):
    b = ctx.b
    _simple_image(b)
    p = b.path("t.qcow2")
    L.hdr_set(p, "incompatible_features", L.hdr_get(p, "incompatible_features") | 2)
    check(ctx, "t.qcow2")


@case("edge", "unknown_compatible_and_autoclear_bits", "unknown compatible/autoclear bits are ignored")
def _(ctx):
    b = ctx.b
    _simple_image(b)
    p = b.path("t.qcow2")
    L.hdr_set(p, "compatible_features", L.hdr_get(p, "compatible_features") | (1 << 40))
    L.hdr_set(p, "autoclear_features", L.hdr_get(p, "autoclear_features") | (1 << 33))
    check(ctx, "t.qcow2")


@case("edge", "unknown_header_extension", "an unknown header extension is ignored")
def _(ctx):
    b = ctx.b
    b.create("base.qcow2", 4 * M)
    b.io("base.qcow2", ("noise", 0, M))
    b.create("t.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("t.qcow2", "write -P 0x71 500 1000")
    L.rewrite_extensions(b.path("t.qcow2"),
                         lambda exts: [(0x12345678, b"oracle unknown extension!")] + exts)
    check(ctx, "t.qcow2", chain=True)


@case("edge", "virtual_size_not_sector_multiple",
      "header size = 4 MiB + 100 (qemu-img cannot create that; qemu rounds it down)")
def _(ctx):
    b = ctx.b
    _simple_image(b)
    L.hdr_set(b.path("t.qcow2"), "size", 4 * M + 100)
    check(ctx, "t.qcow2")


@case("edge", "v3_header_length_104", "v3 header without the compression-type field (104 bytes)")
def _(ctx):
    b = ctx.b
    _simple_image(b)
    p = b.path("t.qcow2")
    if L.hdr_get(p, "header_length") != 112:
        raise SetupError("expected a 112-byte header")
    # Move the extensions 8 bytes down and shrink the header.
    with open(p, "r+b") as f:
        f.seek(112)
        area = f.read((1 << L.hdr_get(p, "cluster_bits")) - 112)
        f.seek(104)
        f.write(area)
    bfo = L.hdr_get(p, "backing_file_offset")
    if bfo:
        raise SetupError("unexpected backing file")
    L.hdr_set(p, "header_length", 104)
    check(ctx, "t.qcow2")


if __name__ == "__main__":
    def run_case(c, workdir, log, binary):
        seed = sum(map(ord, c.name))
        c.fn(Ctx(workdir, log, binary, seed))
    sys.exit(L.run_suite("read_matrix", CASES, sys.argv[1:], run_case))
