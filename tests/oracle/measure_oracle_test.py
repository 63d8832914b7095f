#!/usr/bin/python3
"""`ublk-qcow2 measure` against `qemu-img measure` (QEMU 7.2), byte for byte.

Each case runs a list of measure command lines with both programs, in both
output forms (human, --output=json):

  * same exit status;
  * on success: stdout identical byte for byte, and the JSON form parsed and
    compared key by key (required, fully-allocated, bitmaps when present);
  * on failure: ours prints exactly one stderr line `ublk-qcow2: ...`; where
    the case says so, that line says what qemu-img's first stderr line says
    (after the image name, which ours may put first; qemu-img sometimes adds
    a second line, e.g. "Invalid options for file format").

Groups: size (--size across sizes, cluster sizes, refcount widths, extended
L2, compat, preallocation, up to QEMU's L1 limit), image (sources: empty,
written, compressed, zero clusters, backing chains of qcow2 and raw, raw,
snapshots, bitmaps, extended L2, preallocated, external data files, 1 TiB),
error (bad command lines and options), snapshot (-l), unsupported
(encrypt.format=luks: exit 1 as qemu-img, our own message).

Usage: measure_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
"""

import json
import os
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import CaseFailure  # noqa: E402

K = 1 << 10
M = 1 << 20
G = 1 << 30
T = 1 << 40
TIMEOUT = 60

CASES = []
case = L.case_registry(CASES)


class View:
    """One measure command line (without --output).  same_message: on an
    error, our line must start with qemu-img's first line."""

    def __init__(self, args, same_message=True):
        self.args = [str(a) for a in args]
        self.same_message = same_message


def q2(*args):
    return View(["-O", "qcow2"] + list(args))


# --------------------------------------------------------------------------
# --size


SIZES = [0, 512, 513, 1000001, 64 * M + 512, G, T]


def size_options(cs):
    """-o lists for one cluster size: refcount widths, extended L2, compat."""
    out = []
    for rb in (1, 16, 64):
        out.append("cluster_size=%d,refcount_bits=%d" % (cs, rb))
    out.append("cluster_size=%d,compat=0.10" % cs)
    if cs >= 16 * K:
        out.append("cluster_size=%d,extended_l2=on" % cs)
        out.append("cluster_size=%d,extended_l2=on,refcount_bits=2" % cs)
        out.append("cluster_size=%d,extended_l2=on,compat=0.10" % cs)
    return out


for cs in (512, 4 * K, 16 * K, 64 * K, 2 * M):
    def make(cs):
        @case("size/cs%d" % cs, "--size %s with cluster_size=%d: refcount_bits 1/16/64, "
              "extended_l2, compat=0.10" % (",".join(map(str, SIZES)), cs))
        def _(b):
            views = []
            for size in SIZES:
                for opts in size_options(cs):
                    views.append(q2("--size", size, "-o", opts))
            return views
    make(cs)


@case("size/limits", "the largest --size each cluster size allows (QEMU's 32 MiB L1 table) "
      "and one byte more; extended L2 halves it")
def _(b):
    views = []
    for cs in (512, 4 * K, 64 * K, 2 * M):
        for ext in ((False, True) if cs >= 16 * K else (False,)):
            per_l2 = cs // (16 if ext else 8)
            limit = (32 * M // 8) * per_l2 * cs
            opts = "cluster_size=%d%s" % (cs, ",extended_l2=on" if ext else "")
            for size in (limit - cs, limit, limit + 1):
                if size <= (1 << 63) - 1:
                    views.append(q2("--size", size, "-o", opts))
    views.append(q2("--size", (1 << 63) - 1, "-o", "cluster_size=2M"))
    views.append(View(["--size", (1 << 63) - 1]))
    return views


@case("size/suffixes", "qemu-img's size suffixes and fractions; raw output rounds to 512")
def _(b):
    views = []
    for s in ("1k", "1K", "1.5k", "1M", "2G", "1T", "1P", "4E", "7.99E", "0x1000", "100b", "1b",
              "7", " 1k", "+1k", "  +2M"):
        views.append(View(["--size", s]))
        views.append(q2("--size", s))
    views.append(View(["--size", "1G", "-O", "raw"]))
    return views


@case("size/preallocation", "preallocation off/metadata/falloc/full, and options measure "
      "ignores (lazy_refcounts with compat=0.10, compression_type, data_file, backing_file)")
def _(b):
    views = []
    for size in (0, 1000001, G):
        for p in ("off", "metadata", "falloc", "full"):
            views.append(q2("--size", size, "-o", "preallocation=%s" % p))
            views.append(q2("--size", size, "-o", "preallocation=%s,cluster_size=512,"
                            "refcount_bits=64" % p))
    for opts in ("compat=0.10,lazy_refcounts=on", "compression_type=zstd",
                 "compression_type=bad", "data_file=x.data,data_file_raw=on",
                 "backing_file=x.qcow2,backing_fmt=qcow2", "lazy_refcounts", "nolazy_refcounts",
                 "encryption=on", "encrypt.format=aes", "nocow=on,extent_size_hint=1M",
                 "size=5G", "cluster_size=64k,cluster_size=4k", "compat=1.1",
                 "cluster_size= 64k", "cluster_size=+4k", "refcount_bits= 8", "refcount_bits=+0x10",
                 "refcount_bits=010", "encrypt.iter-time=-1"):
        views.append(q2("--size", G, "-o", opts))
    views.append(q2("--size", G, "-o", "cluster_size=4k", "-o", "refcount_bits=8"))
    for opts in ("preallocation=bogus", "nocow=on", "extent_size_hint=1M", "size=1M"):
        views.append(View(["--size", G, "-o", opts]))
    views.append(View(["--size", G, "-U"]))
    return views


# --------------------------------------------------------------------------
# Images


OUT_OPTS = [[], ["-o", "cluster_size=512"], ["-o", "cluster_size=2M"],
            ["-o", "cluster_size=16k,extended_l2=on,refcount_bits=1"], ["-o", "compat=0.10"]]


def image_views(image, extra=()):
    """Raw and qcow2 outputs of `image`, with several output geometries."""
    views = [View(list(extra) + [image])]
    for o in OUT_OPTS:
        views.append(q2(*(list(extra) + o + [image])))
    return views


def pattern_writes(b, img, cs, size, fmt="qcow2"):
    """Data, zeros (kept and released), discards, partial clusters, a far write."""
    cmds = [
        ("noise", 0, cs),
        ("noise", 3 * cs + cs // 2, cs),
        "write -P 0x22 %d %d" % (8 * cs, 4 * cs),
        "write -z %d %d" % (9 * cs, cs),
        "write -z %d %d" % (20 * cs, 2 * cs),
        "write -P 0x33 %d %d" % (24 * cs, 2 * cs),
        "discard %d %d" % (25 * cs, cs),
        "write -z -u %d %d" % (11 * cs, cs),
        "write -P 0x44 %d 1000" % (size - 1000),
    ]
    b.io(img, *cmds, fmt=fmt)


@case("image/empty", "empty qcow2 images (v3, v2, 0 bytes, odd size)")
def _(b):
    b.create("e.qcow2", 64 * M)
    b.create("v2.qcow2", 64 * M, opts={"compat": "0.10"})
    b.create("z.qcow2", 0)
    b.create("odd.qcow2", 1000001)
    return (image_views("e.qcow2") + image_views("v2.qcow2") + image_views("z.qcow2")
            + image_views("odd.qcow2"))


for cs in (512, 64 * K, 2 * M):
    def make(cs):
        @case("image/written_cs%d" % cs, "source with cluster_size=%d: data, zeros, discards, "
              "partial clusters, a write at the end" % cs)
        def _(b):
            size = max(64 * M, 40 * cs) + 1536
            b.create("a.qcow2", size, opts={"cluster_size": cs})
            pattern_writes(b, "a.qcow2", cs, size)
            return image_views("a.qcow2") + [q2("-o", "cluster_size=4k", "a.qcow2")]
    make(cs)


@case("image/zeros", "zero clusters with and without a host cluster, in v3; v2 write -z")
def _(b):
    b.create("z.qcow2", 16 * M)
    b.io("z.qcow2", "write -P 1 0 1M", "write -z 64k 128k", "write -z -u 512k 64k",
         "write -z 4M 1M", "write -P 2 8M 4k")
    b.create("v2.qcow2", 16 * M, opts={"compat": "0.10"})
    b.io("v2.qcow2", "write -P 1 0 128k", "write -z 64k 64k", "write -z 1M 64k")
    return image_views("z.qcow2") + image_views("v2.qcow2")


@case("image/compressed", "compressed clusters (zlib and zstd) among data clusters")
def _(b):
    b.create("c.qcow2", 8 * M)
    b.io("c.qcow2", "write -c -P 1 0 64k", "write -c -P 2 64k 64k", "write -P 3 128k 64k",
         "write -c -P 4 1M 64k")
    b.create("zs.qcow2", 8 * M, opts={"compression_type": "zstd", "cluster_size": 4096})
    b.io("zs.qcow2", "write -c -P 1 0 4k", "write -c -P 2 1M 4k", "write -P 3 2M 8k")
    return image_views("c.qcow2") + image_views("zs.qcow2")


@case("image/chain3_raw_base", "raw sparse base (holes), qcow2 mid, qcow2 top: each layer "
      "counted, zeros and discards hide the layers below")
def _(b):
    b.raw("base.raw", 8 * M, [(0, b"\x01" * (64 * K)), (1 * M, b"\x02" * 4096),
                              (5 * M + 512, b"\x03" * 100), (3 * M, b"\x04" * 64 * K)])
    b.create("mid.qcow2", 8 * M, backing="base.raw", backing_fmt="raw")
    b.io("mid.qcow2", "write -P 3 512k 64k", "write -z 2M 64k", "discard 3M 64k")
    b.create("top.qcow2", 8 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 5 0 4k", "write -z 1M 4k", "write -P 6 6M 128k")
    return (image_views("top.qcow2") + image_views("mid.qcow2")
            + image_views("base.raw", ["-f", "raw"])
            + [q2("-o", "backing_file=base.raw", "top.qcow2"),
               q2("-o", "backing_file=x,cluster_size=512", "top.qcow2")])


@case("image/chain3_short", "qcow2 base shorter than mid, raw mid under a qcow2 top, backing "
      "files ending inside a cluster")
def _(b):
    b.create("base.qcow2", 1 * M + 1536)
    b.io("base.qcow2", "write -P 1 960k 64k", "write -P 2 0 4k")
    b.create("mid.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("mid.qcow2", "write -P 3 2M 64k")
    b.create("top.qcow2", 8 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 5 5M 64k", "write -z 6M 64k")
    b.raw("odd.raw", 1000 * 1000 + 7, [(0, b"\x01" * 5000), (999 * 1000, b"\x02" * 1007)])
    b.create("over_odd.qcow2", 2 * M, backing="odd.raw", backing_fmt="raw")
    b.io("over_odd.qcow2", "write -P 5 64k 4k")
    return image_views("top.qcow2") + image_views("over_odd.qcow2")


@case("image/raw_source", "raw sources: sparse with data, fully written, odd size; raw and "
      "qcow2 outputs; -f raw on a qcow2 file")
def _(b):
    b.raw("s.raw", 10 * M, [(4096, b"\x01" * 8192), (3 * M, b"\x02" * 10),
                            (10 * M - 100, b"\x03" * 100)])
    b.raw("full.raw", 1 * M, [(0, b"\x05" * M)])
    b.raw("odd.raw", 12345, [(0, b"\x06" * 12345)])
    b.create("q.qcow2", 4 * M)
    b.io("q.qcow2", "write -P 1 0 64k")
    return (image_views("s.raw") + image_views("full.raw") + image_views("odd.raw")
            + image_views("q.qcow2", ["-f", "raw"]) + image_views("s.raw", ["-f", "raw"]))


@case("image/snapshot", "an image with internal snapshots (shared clusters), then writes, a "
      "discard and a resize")
def _(b):
    b.create("s.qcow2", 64 * M)
    b.io("s.qcow2", "write -P 1 0 1M")
    b.snapshot("s.qcow2", "s1")
    b.io("s.qcow2", "write -P 2 4M 1M", "discard 0 64k")
    b.snapshot("s.qcow2", "s2")
    b.qemu_img("resize", "-q", "s.qcow2", "128M")
    return image_views("s.qcow2")


def patch_bitmap_flags(path, index, flags):
    entry = L.bitmap_entries(path)[index]
    L.write_be(path, entry + 12, 4, flags)


@case("image/bitmaps", "persistent bitmaps: granularities, long names, enabled/disabled, in "
      "use; v2 output and source; output cluster sizes")
def _(b):
    b.create("bm.qcow2", 64 * M + 512)
    b.io("bm.qcow2", "write -P 1 0 1M")
    b.qemu_img("bitmap", "--add", "bm.qcow2", "b0")
    b.qemu_img("bitmap", "--add", "-g", "512", "bm.qcow2", "fine")
    b.qemu_img("bitmap", "--add", "-g", "2M", "bm.qcow2", "x" * 200)
    b.qemu_img("bitmap", "--add", "--disable", "bm.qcow2", "off")
    b.create("inuse.qcow2", 16 * M)
    b.qemu_img("bitmap", "--add", "inuse.qcow2", "a")
    b.qemu_img("bitmap", "--add", "-g", "4k", "inuse.qcow2", "bb")
    patch_bitmap_flags(b.path("inuse.qcow2"), 1, 3)  # in use (and enabled)
    b.create("small.qcow2", 1 * M, opts={"cluster_size": 512})
    b.qemu_img("bitmap", "--add", "-g", "512", "small.qcow2", "s")
    return (image_views("bm.qcow2") + image_views("inuse.qcow2") + image_views("small.qcow2")
            + [q2("-o", "compat=0.10,cluster_size=4k", "bm.qcow2")])


@case("image/bitmaps_stale", "a bitmaps extension whose autoclear bit is clear (ignored: "
      "bitmaps size 0)")
def _(b):
    b.create("st.qcow2", 16 * M)
    b.qemu_img("bitmap", "--add", "st.qcow2", "a")
    L.hdr_set(b.path("st.qcow2"), "autoclear_features", 0)
    return image_views("st.qcow2")


@case("image/extl2", "extended L2 sources: partial subclusters, zero subclusters, over a "
      "backing file")
def _(b):
    b.create("e.qcow2", 8 * M, opts={"cluster_size": 64 * K, "extended_l2": "on"})
    b.io("e.qcow2", "write -P 1 4k 2k", "write -z 8k 4k", "write -P 2 63k 3k",
         "write -P 3 1M 64k", "write -z 1M 6k", "discard 1040k 8k", "write -z 3M 8k")
    b.create("base.qcow2", 4 * M)
    b.io("base.qcow2", "write -P 9 0 1M")
    b.create("over.qcow2", 4 * M, opts={"extended_l2": "on"}, backing="base.qcow2",
             backing_fmt="qcow2")
    b.io("over.qcow2", "write -P 1 4k 2k", "write -z 16k 4k", "write -P 2 2M 6k")
    return image_views("e.qcow2") + image_views("over.qcow2")


@case("image/preallocated", "preallocation=metadata (mapped holes count nothing), with "
      "extended L2; falloc and full (all data)")
def _(b):
    b.create("m.qcow2", 16 * M, opts={"preallocation": "metadata"})
    b.io("m.qcow2", "write -P 1 64k 4k", "write -P 2 8M 1M")
    b.create("me.qcow2", 4 * M, opts={"preallocation": "metadata", "extended_l2": "on"})
    b.io("me.qcow2", "write -P 1 4k 2k")
    b.create("fa.qcow2", 8 * M, opts={"preallocation": "falloc"})
    b.create("fu.qcow2", 8 * M, opts={"preallocation": "full"})
    return (image_views("m.qcow2") + image_views("me.qcow2") + image_views("fa.qcow2")
            + image_views("fu.qcow2")
            + [q2("-o", "preallocation=full", "m.qcow2"),
               q2("-o", "preallocation=metadata,cluster_size=512", "m.qcow2")])


@case("image/data_file", "external data files, raw and not")
def _(b):
    b.create("r.qcow2", 8 * M, opts={"data_file": "r.data", "data_file_raw": "on"})
    b.io("r.qcow2", "write -P 1 0 64k", "write -P 2 1M 128k", "write -z 1088k 64k")
    b.create("n.qcow2", 8 * M, opts={"data_file": "n.data"})
    b.io("n.qcow2", "write -P 1 0 192k", "write -z 64k 64k", "discard 128k 64k",
         "write -P 2 4M 4k")
    return image_views("r.qcow2") + image_views("n.qcow2")


@case("image/sparse_1t", "a 1 TiB image with a few writes (must be fast)")
def _(b):
    b.create("a.qcow2", T)
    b.io("a.qcow2", "write -P 1 0 64k", "write -P 2 %d 64k" % (600 * G),
         "write -z %d 1M" % (T - M))
    return image_views("a.qcow2") + [View(["-U", "a.qcow2"])]


# --------------------------------------------------------------------------
# Errors


@case("error/command_line", "size/filename combinations, bad sizes, --output, -O")
def _(b):
    b.create("a.qcow2", M)
    return [
        View([]),
        View(["--size", "1G", "a.qcow2"]),
        View(["a.qcow2", "a.qcow2"]),
        View(["-f", "qcow2"]),
        View(["-l", "s1"]),
        View(["--size", "1G", "-f", "raw"]),
        View(["--size", "-1"]),
        View(["--size", "1x"]),
        View(["--size", ""]),
        View(["--size", "8E"]),
        View(["--size", "9223372036854775808"]),
        View(["--size", "99999999999999999999"]),
        View(["--size", "16E"]),
        View(["--size", "99999999999999999999k"]),
        View(["--size", "1.5"]),
        View(["--size", "1.5b"]),
        View(["--size", "0x1.5k"]),
        View(["--size", "1e3"]),
        View(["--size", "1k "]),
        View(["--size", "1kk"]),
        View(["--size", "0x"]),
        View(["--size", "1G", "--output=xml"]),
        View(["--size", "1G", "-O", "bogus"]),
        View(["--size", "1G", "-O", "vmdk"], same_message=False),
        View(["-O", "bogus", "a.qcow2"]),
        View(["nosuch.qcow2"], same_message=False),
        View(["-O", "qcow2", "nosuch.qcow2"], same_message=False),
        View(["-f", "bogus", "a.qcow2"], same_message=False),
    ]


@case("error/options", "bad -o lists and values, for qcow2 and raw outputs, in qemu-img's "
      "order; the L1 limit")
def _(b):
    b.create("a.qcow2", M)
    views = []
    for opts in ("foo=bar", ",", "a=b,,", "cluster_size=3k", "cluster_size=4M",
                 "cluster_size=0", "cluster_size=1k,extended_l2=on", "compat=0.9", "compat=v3",
                 "compat=", "refcount_bits=3", "refcount_bits=128", "refcount_bits=0",
                 "compat=0.10,refcount_bits=8", "preallocation=bogus", "preallocation=",
                 "extended_l2=maybe", "refcount_bits=abc", "cluster_size=abc", "size=abc",
                 "encrypt.foo=1", "encrypt.iter-time=abc", "nocow=maybe",
                 "compat=0.9,refcount_bits=3", "refcount_bits=3,preallocation=bogus",
                 "cluster_size=64k,cluster_size=1k,extended_l2=on", "cluster_size=16E",
                 "cluster_size=99999999999999999999", "refcount_bits=99999999999999999999",
                 "refcount_bits=-16", "refcount_bits=0x", "refcount_bits=08"):
        views.append(q2("--size", G, "-o", opts))
        views.append(q2("-o", opts, "a.qcow2"))
    for opts in ("cluster_size=1k", "foo=bar", "compat=0.10", "nocow=maybe", "size=abc", ","):
        views.append(View(["--size", G, "-o", opts]))
    views.append(q2("--size", T, "-o", "cluster_size=512"))
    views.append(q2("--size", 64 * T, "-o", "cluster_size=16k,extended_l2=on"))
    return views


# --------------------------------------------------------------------------
# Snapshots (-l)


@case("snapshot/load", "-l by id, by name, bare ID_OR_NAME (id first), snapshot.id/name "
      "together; snapshots of other sizes than the current one; a missing snapshot")
def _(b):
    b.create("s.qcow2", 64 * M)
    b.io("s.qcow2", "write -P 1 0 1M")
    b.snapshot("s.qcow2", "s1")
    b.io("s.qcow2", "write -P 2 4M 1M", "write -z 0 64k")
    b.snapshot("s.qcow2", "2")   # a name that is another snapshot's id
    b.io("s.qcow2", "discard 4M 512k", "write -P 3 32M 64k")
    b.qemu_img("resize", "-q", "s.qcow2", "200M")
    b.io("s.qcow2", "write -P 4 150M 1M")
    b.snapshot("s.qcow2", "big")
    b.create("top.qcow2", 200 * M, backing="s.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 5 100M 64k")
    b.snapshot("top.qcow2", "t1")
    b.io("top.qcow2", "write -P 6 120M 64k")
    views = []
    for sn in ("s1", "1", "2", "3", "big", "snapshot.id=1", "snapshot.name=s1",
               "snapshot.id=1,snapshot.name=s1", "snapshot.name=2", "snapshot.id=2"):
        views += image_views("s.qcow2", ["-l", sn])
    views += image_views("top.qcow2", ["-l", "t1"])
    for sn in ("nosuch", "snapshot.id=1,snapshot.name=big", "snapshot.id=9", "snapshot.foo=1"):
        views.append(q2("-l", sn, "s.qcow2"))
    views.append(View(["-f", "raw", "-l", "s1", "s.qcow2"], same_message=False))
    views.append(View(["-l", "s1", "--size", "1G"]))
    return views


# --------------------------------------------------------------------------
# Unsupported (documented): LUKS encryption. qemu-img fails too here, for want
# of a key secret; ours says it does not support encryption.


@case("unsupported/luks", "-o encrypt.format=luks: exit 1 with one line, as qemu-img without "
      "a secret")
def _(b):
    b.create("a.qcow2", M)
    return [View(["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"], False),
            View(["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0", "--size",
                  "1G"], False),
            View(["-O", "qcow2", "-o", "encrypt.format=luks", "a.qcow2"], False)]


# --------------------------------------------------------------------------


def compare(binary, b, log, view, form):
    out_flag = ["--output=json"] if form == "json" else []
    args = out_flag + view.args
    q = L.run([L.QEMU_IMG, "measure"] + args, b.cwd, log, timeout=TIMEOUT)
    o = L.run([binary, "measure"] + args, b.cwd, log, timeout=TIMEOUT)
    what = "measure %s" % " ".join(args)
    if o.rc != q.rc:
        return ["%s: %s, qemu-img exit %d (stdout %r, stderr %r; qemu-img's %r)" % (
            what, o.describe(), q.rc, o.out[-300:], o.err[-300:], q.err[-300:])]
    problems = []
    if o.out != q.out:
        problems.append("%s: stdout differs\n--- qemu-img\n%s--- ours\n%s" % (what, q.out, o.out))
    if q.rc == 0 and form == "json":
        try:
            if json.loads(o.out) != json.loads(q.out):
                problems.append("%s: JSON fields differ" % what)
        except ValueError as e:
            problems.append("%s: JSON does not parse: %s" % (what, e))
    if q.rc != 0:
        lines = o.err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("ublk-qcow2: "):
            problems.append("%s: stderr is not one line 'ublk-qcow2: ...': %r" % (what, o.err))
        elif view.same_message:
            # Ours may name the image first ("ublk-qcow2: IMAGE: ..."), as
            # our messages about a file do.
            theirs = q.err.splitlines()[0].replace("qemu-img: ", "", 1)
            ours = lines[0].replace("ublk-qcow2: ", "", 1)
            if not any(ours.startswith(prefix + theirs)
                       for prefix in [""] + [a + ": " for a in view.args]):
                problems.append("%s: message %r, qemu-img's %r" % (what, lines[0], theirs))
    return problems


def run_case(c, workdir, log, binary):
    b = L.Builder(workdir, log, sum(map(ord, c.name)))
    views = c.fn(b)
    problems = []
    runs = 0
    for view in views:
        for form in ("json", "human"):
            problems += compare(binary, b, log, view, form)
            runs += 1
    if problems:
        raise CaseFailure("\n".join(problems[:20]) + (
            "\n... %d problems in all" % len(problems) if len(problems) > 20 else ""))
    return "%d measure(s)" % runs


if __name__ == "__main__":
    sys.exit(L.run_suite("measure_oracle", CASES, sys.argv[1:], run_case))
