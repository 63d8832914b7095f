#!/usr/bin/python3
"""`ublk-qcow2 compare` against `qemu-img compare` (QEMU 7.2).

Each case builds image pairs with qemu-img/qemu-io (and sparse raw files with
Python), then runs both `qemu-img compare ARGS` and `ublk-qcow2 compare ARGS`
with the same arguments for each comparison it lists:

  * stdout must be identical ("Images are identical.", "Content mismatch at
    offset N!", "Warning: Image size mismatch!", "Strict mode: ..."), and so
    must the exit status (0 identical, 1 different or bad usage, 2 an image
    would not open);
  * when qemu-img fails (exit 2 and up) our stderr must be one line
    `ublk-qcow2: FILE: ...` naming the file qemu-img names;
  * with -p, the progress pieces `    (N.NN/100%)\\r` are taken out of both
    stdouts before comparing, and ours must start with the 0.00 one.

Usage: compare_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
"""

import os
import re
import shutil
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import Case, CaseFailure  # noqa: E402

K = 1 << 10
M = 1 << 20
G = 1 << 30
TIMEOUT = 60
# Host offset bits of an L1/L2 entry.
OFFSET_MASK = 0x00FFFFFFFFFFFE00
# A sparse 64 GiB pair must compare in well under a second; the machine is
# shared, so allow some slack.
SPARSE_SECONDS = 2.0

CASES = []


case = L.case_registry(CASES, Case)


def base_image(b, name, size=8 * M, opts=None, fmt="qcow2"):
    """Random data in the first clusters, a pattern run, a zero cluster, a
    far write: every kind of range."""
    b.create(name, size, fmt=fmt, opts=opts)
    b.io(name, ("noise", 0, 192 * K), "write -P 0x22 1M 256k", "write -z 1088k 64k",
         "write -P 0x33 %d 64k" % (size - 128 * K), fmt=fmt)
    return name


def copy(b, src, dst, fmt="qcow2", args=()):
    b.qemu_img("convert", "-O", fmt, *args, src, dst)
    return dst


def flip(b, img, offset, fmt="qcow2", value=0xEE):
    """Writes one byte `value` at offset (the images use no 0xEE elsewhere)."""
    b.io(img, "write -P 0x%x %d 1" % (value, offset), fmt=fmt)


def flipped_copies(b, src, offsets):
    """Copies of src, each with one byte flipped at one of `offsets`."""
    names = []
    for i, off in enumerate(offsets):
        name = "b%d.qcow2" % i
        copy(b, src, name)
        flip(b, name, off)
        names.append(name)
    return names


# --------------------------------------------------------------------------
# Equal images


@case("equal/copies", "an image against itself, its qcow2 and raw copies, a compressed copy")
def _(b):
    base_image(b, "a.qcow2")
    copy(b, "a.qcow2", "b.qcow2")
    copy(b, "a.qcow2", "b.raw", fmt="raw")
    copy(b, "a.qcow2", "c.qcow2", args=["-c"])
    return [["a.qcow2", "a.qcow2"], ["-s", "a.qcow2", "a.qcow2"], ["a.qcow2", "b.qcow2"],
            ["b.qcow2", "a.qcow2"], ["a.qcow2", "b.raw"], ["-F", "raw", "a.qcow2", "b.raw"],
            ["-f", "qcow2", "-F", "raw", "a.qcow2", "b.raw"], ["c.qcow2", "b.raw"],
            ["-s", "a.qcow2", "b.qcow2"], ["-s", "a.qcow2", "b.raw"],
            ["-s", "a.qcow2", "c.qcow2"], ["-q", "a.qcow2", "b.raw"],
            ["-U", "a.qcow2", "b.qcow2"], ["--force-share", "c.qcow2", "a.qcow2"]]


@case("equal/empty", "empty images: qcow2 of several cluster sizes, sparse raw, zero size")
def _(b):
    for cs in (4 * K, 64 * K, 2 * M):
        b.create("e%d.qcow2" % cs, 1 * G, opts={"cluster_size": cs})
    b.raw("e.raw", 1 * G)
    b.create("z0.qcow2", 0)
    b.raw("z0.raw", 0)
    out = []
    for x, y in (("e65536.qcow2", "e2097152.qcow2"), ("e4096.qcow2", "e65536.qcow2"),
                 ("e4096.qcow2", "e.raw"), ("z0.qcow2", "z0.raw"), ("e.raw", "e.raw")):
        out += [[x, y], ["-s", x, y], ["-s", y, x]]
    return out


@case("equal/sparse_4g_clusters", "empty 4 GiB images with 64 KiB and 2 MiB clusters "
      "(QEMU answers block status in pieces under 2 GiB)")
def _(b):
    b.create("a.qcow2", 4 * G, opts={"cluster_size": 64 * K})
    b.create("b.qcow2", 4 * G, opts={"cluster_size": 2 * M})
    b.create("c.qcow2", 4 * G, opts={"cluster_size": 2 * M})
    b.io("c.qcow2", "write -P 1 %d 4k" % (3 * G + 12345 * 512))
    return [["a.qcow2", "b.qcow2"], ["-s", "a.qcow2", "b.qcow2"], ["-s", "b.qcow2", "a.qcow2"],
            ["b.qcow2", "c.qcow2"], ["-s", "b.qcow2", "c.qcow2"], ["c.qcow2", "a.qcow2"]]


# --------------------------------------------------------------------------
# One byte differs


@case("diff/one_byte", "one byte differs, in data both hold, at sector and cluster edges, in "
      "the last sector")
def _(b):
    size = 8 * M
    base_image(b, "a.qcow2", size)
    out = []
    for name in flipped_copies(b, "a.qcow2", (0, 511, 512, 1000, 64 * K - 1, 64 * K, 100 * K,
                                              1 * M, 1 * M + 256 * K - 1,
                                              size - 128 * K + 4097, size - 1)):
        out += [["a.qcow2", name], [name, "a.qcow2"]]
    return out


@case("diff/unallocated", "a byte written where the other image holds nothing, or zeros "
      "(zero cluster, discarded range)")
def _(b):
    size = 8 * M
    base_image(b, "a.qcow2", size)
    out = []
    for name in flipped_copies(b, "a.qcow2", (512 * K, 1088 * K + 3000, 6 * M - 1,
                                              size - 129 * K)):
        out += [["a.qcow2", name], [name, "a.qcow2"], ["-s", "a.qcow2", name]]
    copy(b, "a.qcow2", "r.raw", fmt="raw")
    flip(b, "r.raw", 3 * M + 7, fmt="raw")
    out += [["a.qcow2", "r.raw"], ["r.raw", "a.qcow2"]]
    return out


@case("diff/zero_vs_unallocated", "zeros three ways: zero cluster, unallocated, written zeros "
      "(equal unless -s)")
def _(b):
    for n in ("z.qcow2", "u.qcow2", "w.qcow2"):
        b.create(n, 4 * M)
        b.io(n, "write -P 7 0 64k")
    b.io("z.qcow2", "write -z 1M 128k")
    b.io("w.qcow2", "write -P 0 1M 128k")
    b.create("d.qcow2", 4 * M)
    b.io("d.qcow2", "write -P 7 0 64k", "write -P 5 1M 128k", "discard 1M 128k")
    out = []
    for x, y in (("z.qcow2", "u.qcow2"), ("u.qcow2", "w.qcow2"), ("z.qcow2", "w.qcow2"),
                 ("d.qcow2", "u.qcow2")):
        out += [[x, y], ["-s", x, y], ["-s", y, x]]
    return out


@case("diff/compressed", "compressed clusters against plain ones, one byte differing inside")
def _(b):
    b.create("a.qcow2", 4 * M)
    b.io("a.qcow2", ("noise", 0, 64 * K), "write -c -P 1 64k 64k", "write -c -P 2 128k 64k",
         "write -P 3 192k 64k", "write -c -P 4 1M 64k")
    copy(b, "a.qcow2", "flat.qcow2")
    copy(b, "a.qcow2", "c.qcow2", args=["-c"])
    copy(b, "a.qcow2", "d.qcow2")
    flip(b, "d.qcow2", 1 * M + 40000)
    copy(b, "a.qcow2", "e.qcow2")
    flip(b, "e.qcow2", 130 * K)
    # All compressed, 64 KiB against 128 KiB clusters: QEMU answers one
    # compressed cluster at a time, so -s sees the 128 KiB answer reach the
    # end of the image first (offset 128k).
    b.create("x.qcow2", 256 * K, opts={"cluster_size": 64 * K})
    b.io("x.qcow2", *["write -c -P 1 %dk 64k" % k for k in (0, 64, 128, 192)])
    b.create("y.qcow2", 256 * K, opts={"cluster_size": 128 * K})
    b.io("y.qcow2", "write -c -P 1 0 128k", "write -c -P 1 128k 128k")
    return [["a.qcow2", "flat.qcow2"], ["-s", "a.qcow2", "flat.qcow2"], ["a.qcow2", "c.qcow2"],
            ["-s", "a.qcow2", "c.qcow2"], ["c.qcow2", "d.qcow2"], ["a.qcow2", "e.qcow2"],
            ["e.qcow2", "c.qcow2"], ["x.qcow2", "y.qcow2"], ["-s", "x.qcow2", "y.qcow2"],
            ["-s", "y.qcow2", "x.qcow2"]]


# --------------------------------------------------------------------------
# Chains, data files, layouts


@case("chain/depth3", "raw base, qcow2 mid, qcow2 top (and qcow2 base, raw mid, shorter backing "
      "files) against flat copies")
def _(b):
    b.raw("base.raw", 8 * M, [(0, b"\x01" * (64 * K)), (1 * M, b"\x02" * 4096),
                              (5 * M + 512, b"\x03" * 100)])
    b.create("mid.qcow2", 8 * M, backing="base.raw", backing_fmt="raw")
    b.io("mid.qcow2", "write -P 3 512k 64k", "write -z 2M 64k", "discard 3M 64k")
    b.create("top.qcow2", 8 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 5 0 4k", "write -z 1M 4k", "write -P 6 6M 128k")
    copy(b, "top.qcow2", "flat.qcow2")
    copy(b, "top.qcow2", "flat.raw", fmt="raw")
    copy(b, "top.qcow2", "bad.qcow2")
    flip(b, "bad.qcow2", 5 * M + 600)

    b.create("b2.qcow2", 2 * M)
    b.io("b2.qcow2", "write -P 1 0 1M")
    b.raw("m2.raw", 3 * M, [(1536 * K, b"\x07" * 8192)])
    b.create("t2.qcow2", 8 * M, backing="m2.raw", backing_fmt="raw")
    b.io("t2.qcow2", "write -P 5 2M 64k")
    b.create("m3.qcow2", 4 * M, backing="b2.qcow2", backing_fmt="qcow2")
    b.create("t3.qcow2", 6 * M, backing="m3.qcow2", backing_fmt="qcow2")
    b.io("t3.qcow2", "write -P 5 3M 64k", "write -z 5M 64k")
    copy(b, "t2.qcow2", "t2flat.qcow2")
    copy(b, "t3.qcow2", "t3flat.raw", fmt="raw")
    return [["top.qcow2", "flat.qcow2"], ["flat.raw", "top.qcow2"], ["top.qcow2", "bad.qcow2"],
            ["-s", "top.qcow2", "flat.qcow2"], ["top.qcow2", "mid.qcow2"],
            ["mid.qcow2", "base.raw"], ["t2.qcow2", "t2flat.qcow2"],
            ["-s", "t2.qcow2", "t2flat.qcow2"], ["t3.qcow2", "t3flat.raw"],
            ["-s", "t3.qcow2", "t3flat.raw"], ["t2.qcow2", "t3.qcow2"], ["t3.qcow2", "m3.qcow2"]]


@case("layout/datafile", "external data files (raw and not raw) against a plain copy")
def _(b):
    b.create("d.qcow2", 8 * M, opts={"data_file": "d.data", "data_file_raw": "on"})
    b.io("d.qcow2", "write -P 1 0 64k", "write -P 2 1M 128k", "write -z 1088k 64k")
    b.create("n.qcow2", 8 * M, opts={"data_file": "n.data"})
    b.io("n.qcow2", "write -P 1 0 64k", "write -P 2 1M 128k", "write -z 1088k 64k")
    copy(b, "d.qcow2", "flat.qcow2")
    copy(b, "d.qcow2", "bad.qcow2")
    flip(b, "bad.qcow2", 1100 * K)
    return [["d.qcow2", "flat.qcow2"], ["n.qcow2", "flat.qcow2"], ["d.qcow2", "n.qcow2"],
            ["-s", "d.qcow2", "n.qcow2"], ["-s", "n.qcow2", "flat.qcow2"],
            ["bad.qcow2", "d.qcow2"], ["n.qcow2", "bad.qcow2"]]


@case("layout/refcounts", "refcount_bits=1 and 64 copies against the refcount_bits=16 source "
      "and each other, with one byte differing; images written at widths 1 and 64 (4 KiB "
      "clusters, their own noise) against each other")
def _(b):
    base_image(b, "a.qcow2")
    for bits in (1, 64):
        copy(b, "a.qcow2", "r%d.qcow2" % bits, args=["-o", "refcount_bits=%d" % bits])
        base_image(b, "n%d.qcow2" % bits, opts={"refcount_bits": bits, "cluster_size": 4 * K})
    copy(b, "r1.qcow2", "r1bad.qcow2", args=["-o", "refcount_bits=1"])
    flip(b, "r1bad.qcow2", 1100 * K)
    copy(b, "r64.qcow2", "r64bad.qcow2", args=["-o", "refcount_bits=64"])
    flip(b, "r64bad.qcow2", 3 * M + 511)
    return [["a.qcow2", "r1.qcow2"], ["r64.qcow2", "a.qcow2"], ["r1.qcow2", "r64.qcow2"],
            ["-s", "r1.qcow2", "r64.qcow2"], ["-s", "a.qcow2", "r64.qcow2"],
            ["n1.qcow2", "n64.qcow2"], ["-s", "n1.qcow2", "n64.qcow2"],
            ["a.qcow2", "r1bad.qcow2"], ["r1bad.qcow2", "r64.qcow2"], ["r64bad.qcow2", "a.qcow2"],
            ["-s", "r64bad.qcow2", "r1.qcow2"]]


@case("layout/snapshots", "an image with internal snapshots (the active layer is compared): "
      "against its flat copy, each snapshot's copy, a copy with one byte differing")
def _(b):
    base_image(b, "s.qcow2")
    b.snapshot("s.qcow2", "s1")
    b.io("s.qcow2", "write -P 0x44 64k 64k", "write -z 1M 64k", "discard 2M 64k",
         "write -P 0x45 5M 4k")
    b.snapshot("s.qcow2", "s2")
    b.io("s.qcow2", "write -P 0x46 %d 512" % (1088 * K + 512))
    copy(b, "s.qcow2", "flat.qcow2")
    copy(b, "s.qcow2", "flat.raw", fmt="raw")
    for snap in ("s1", "s2"):
        copy(b, "s.qcow2", "%s.qcow2" % snap, args=["-l", "snapshot.name=%s" % snap])
    copy(b, "s.qcow2", "bad.qcow2")
    flip(b, "bad.qcow2", 64 * K + 100)
    b.create("t.qcow2", 8 * M, backing="s.qcow2", backing_fmt="qcow2")
    b.snapshot("t.qcow2", "t1")
    b.io("t.qcow2", "write -P 0x47 3M 64k")
    copy(b, "t.qcow2", "tflat.qcow2")
    return [["s.qcow2", "flat.qcow2"], ["-s", "s.qcow2", "flat.qcow2"], ["flat.raw", "s.qcow2"],
            ["s.qcow2", "s1.qcow2"], ["s2.qcow2", "s.qcow2"], ["-s", "s.qcow2", "s2.qcow2"],
            ["s1.qcow2", "s2.qcow2"], ["s.qcow2", "bad.qcow2"], ["-s", "bad.qcow2", "s.qcow2"],
            ["s.qcow2", "s.qcow2"], ["t.qcow2", "tflat.qcow2"], ["t.qcow2", "s.qcow2"],
            ["-s", "t.qcow2", "tflat.qcow2"]]


@case("layout/cluster_sizes", "the same contents with 512 B, 4 KiB, 64 KiB, 2 MiB clusters and "
      "extended L2")
def _(b):
    base_image(b, "a.qcow2", 8 * M, opts={"cluster_size": 64 * K})
    b.io("a.qcow2", "write -P 9 %d 3000" % (3 * M + 700))
    names = []
    for cs in (512, 4 * K, 2 * M):
        n = "cs%d.qcow2" % cs
        copy(b, "a.qcow2", n, args=["-o", "cluster_size=%d" % cs])
        names.append(n)
    copy(b, "a.qcow2", "x.qcow2", args=["-o", "extended_l2=on"])
    names.append("x.qcow2")
    copy(b, "a.qcow2", "bad.qcow2", args=["-o", "cluster_size=4096"])
    flip(b, "bad.qcow2", 3 * M + 3699)
    out = []
    for n in names:
        out += [["a.qcow2", n], ["-s", "a.qcow2", n], ["-s", n, "cs2097152.qcow2"]]
    out += [["cs512.qcow2", "bad.qcow2"], ["bad.qcow2", "cs2097152.qcow2"]]
    return out


@case("layout/extl2", "extended L2 with partial subclusters over a backing file, against flat "
      "copies")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.io("base.qcow2", "write -P 9 0 1M")
    b.create("a.qcow2", 4 * M, opts={"extended_l2": "on"}, backing="base.qcow2",
             backing_fmt="qcow2")
    b.io("a.qcow2", "write -P 1 4k 2k", "write -z 16k 4k", "write -P 2 2M 6k",
         "write -z -u 2M 2k")
    copy(b, "a.qcow2", "flat.qcow2")
    copy(b, "a.qcow2", "bad.raw", fmt="raw")
    flip(b, "bad.raw", 17 * K, fmt="raw")
    return [["a.qcow2", "flat.qcow2"], ["-s", "a.qcow2", "flat.qcow2"], ["a.qcow2", "bad.raw"],
            ["bad.raw", "flat.qcow2"]]


@case("layout/prealloc", "preallocation=metadata (mapped holes) and full against plain copies")
def _(b):
    b.create("m.qcow2", 8 * M, opts={"preallocation": "metadata"})
    b.io("m.qcow2", "write -P 1 64k 4k", "write -P 2 6M 1M")
    b.create("f.qcow2", 8 * M, opts={"preallocation": "full"})
    b.io("f.qcow2", "write -P 1 64k 4k", "write -P 2 6M 1M")
    copy(b, "m.qcow2", "flat.qcow2")
    return [["m.qcow2", "flat.qcow2"], ["-s", "m.qcow2", "flat.qcow2"], ["m.qcow2", "f.qcow2"],
            ["-s", "m.qcow2", "f.qcow2"], ["-s", "f.qcow2", "flat.qcow2"]]


@case("layout/raw_as_raw", "-f raw on a qcow2 file (its bytes, not its guest view), odd-sized "
      "raw files")
def _(b):
    base_image(b, "a.qcow2", 4 * M)
    b.raw("odd.raw", 1000, [(0, b"\x05" * 1000)])
    b.raw("odd0.raw", 1000)
    b.create("k.qcow2", 1 * K)
    b.io("k.qcow2", "write -P 5 0 1000")
    return [["-f", "raw", "a.qcow2", "a.qcow2"], ["-F", "raw", "a.qcow2", "a.qcow2"],
            ["odd.raw", "k.qcow2"], ["-s", "odd.raw", "k.qcow2"], ["odd0.raw", "k.qcow2"],
            ["odd0.raw", "odd.raw"]]


# --------------------------------------------------------------------------
# Sizes


@case("size/mismatch", "different sizes: tail unallocated, zero, written zeros, data (at its "
      "first and last sector), -s")
def _(b):
    base_image(b, "a.qcow2", 8 * M)
    out = []
    for i, cmds in enumerate(([], ["write -z 9M 64k"], ["write -P 0 8M 1M"],
                              ["write -P 4 9M 4k"], ["write -P 4 %d 1" % (8 * M)],
                              ["write -P 4 %d 1" % (10 * M - 1)])):
        n = "big%d.qcow2" % i
        copy(b, "a.qcow2", n)
        b.qemu_img("resize", "-q", n, str(10 * M))
        if cmds:
            b.io(n, *cmds)
        out += [["a.qcow2", n], [n, "a.qcow2"], ["-s", "a.qcow2", n]]
    copy(b, "a.qcow2", "a.raw", fmt="raw")
    with open(b.path("a.raw"), "ab") as f:
        f.truncate(12 * M)
    out += [["a.raw", "a.qcow2"], ["a.qcow2", "a.raw"], ["-s", "a.raw", "a.qcow2"]]
    copy(b, "a.qcow2", "short.qcow2")
    b.qemu_img("resize", "-q", "--shrink", "short.qcow2", str(4 * M))
    out += [["short.qcow2", "a.qcow2"], ["a.qcow2", "short.qcow2"]]
    return out


@case("size/sparse_64g", "64 GiB sparse images: equal, a far difference, a far tail (must be fast)")
def _(b):
    b.create("a.qcow2", 64 * G)
    b.io("a.qcow2", "write -P 1 0 64k", "write -P 2 %d 64k" % (40 * G))
    copy(b, "a.qcow2", "b.qcow2")
    copy(b, "a.qcow2", "c.qcow2")
    flip(b, "c.qcow2", 63 * G + 5)
    b.create("d.qcow2", 65 * G)
    b.io("d.qcow2", "write -P 1 0 64k", "write -P 2 %d 64k" % (40 * G),
         "write -P 3 %d 512" % (65 * G - 512))
    b.raw("e.raw", 64 * G, [(0, b"\x01" * (64 * K)), (40 * G, b"\x02" * (64 * K))])
    return [["a.qcow2", "b.qcow2"], ["-s", "a.qcow2", "b.qcow2"], ["a.qcow2", "c.qcow2"],
            ["a.qcow2", "d.qcow2"], ["a.qcow2", "e.raw"], ["e.raw", "b.qcow2"]]


# --------------------------------------------------------------------------
# Progress, errors, usage


@case("flags/progress", "-p: progress on stdout around the same outcome lines; -q -p prints "
      "nothing")
def _(b):
    base_image(b, "a.qcow2", 8 * M)
    copy(b, "a.qcow2", "b.qcow2")
    copy(b, "a.qcow2", "c.qcow2")
    flip(b, "c.qcow2", 5 * M)
    b.create("big.qcow2", 9 * M)
    return [["-p", "a.qcow2", "b.qcow2"], ["-p", "a.qcow2", "c.qcow2"],
            ["-p", "a.qcow2", "big.qcow2"], ["-p", "-s", "a.qcow2", "big.qcow2"],
            ["-q", "-p", "a.qcow2", "c.qcow2"]]


@case("errors/open", "missing files, unknown formats, -f qcow2 on a raw file, a broken "
      "backing chain: exit 2, one stderr line naming the file")
def _(b):
    b.create("a.qcow2", 1 * M)
    b.raw("r.raw", 1 * M)
    b.create("gone.qcow2", 1 * M)
    b.create("orphan.qcow2", 1 * M, backing="gone.qcow2", backing_fmt="qcow2")
    os.unlink(b.path("gone.qcow2"))
    return [["missing.qcow2", "a.qcow2"], ["a.qcow2", "missing.qcow2"],
            ["-f", "foo", "a.qcow2", "a.qcow2"], ["-F", "vpc0", "a.qcow2", "a.qcow2"],
            ["-f", "qcow2", "r.raw", "a.qcow2"], ["-F", "qcow2", "a.qcow2", "r.raw"],
            ["a.qcow2", "orphan.qcow2"]]


@case("errors/corrupt", "a misaligned L2 table (block status fails: exit 3, qemu-img's "
      "\"Sector allocation test failed\"), a data cluster past the end of the file (reads zeros)")
def _(b):
    b.create("a.qcow2", 1 * M)
    b.io("a.qcow2", "write -P 1 0 64k")
    shutil.copy(b.path("a.qcow2"), b.path("l2.qcow2"))
    shutil.copy(b.path("a.qcow2"), b.path("far.qcow2"))
    l1 = L.hdr_get(b.path("a.qcow2"), "l1_table_offset")
    l1_entry = L.read_be(b.path("a.qcow2"), l1, 8)
    L.write_be(b.path("l2.qcow2"), l1, 8, l1_entry + 512)
    l2 = l1_entry & OFFSET_MASK
    l2_entry = L.read_be(b.path("a.qcow2"), l2, 8)
    L.write_be(b.path("far.qcow2"), l2, 8, (l2_entry & ~OFFSET_MASK) | (1 << 40))
    return [["a.qcow2", "l2.qcow2"], ["l2.qcow2", "a.qcow2"], ["-s", "a.qcow2", "l2.qcow2"],
            ["a.qcow2", "far.qcow2"]]


@case("errors/usage", "bad command lines: exit 1 (as qemu-img compare), nothing on stdout")
def _(b):
    b.create("a.qcow2", 1 * M)
    return [[], ["a.qcow2"], ["a.qcow2", "a.qcow2", "a.qcow2"], ["-x", "a.qcow2", "a.qcow2"]]


# --------------------------------------------------------------------------

PROGRESS = re.compile(r"    \(\d+\.\d\d/100%\)\r")


def named_file(qemu_err):
    """The file qemu-img's error names ("Could not open 'X'", "Sector
    allocation test failed for X")."""
    m = re.search(r"Could not open '([^']*)'", qemu_err) or re.search(
        r"failed for (\S+)", qemu_err)
    return m.group(1) if m else None


def compare(binary, b, log, args):
    q = L.run([L.QEMU_IMG, "compare"] + args, b.cwd, log, timeout=TIMEOUT)
    o = L.run([binary, "compare"] + args, b.cwd, log, timeout=TIMEOUT)
    what = "compare %s" % " ".join(args)
    if o.rc != q.rc:
        return ["%s: %s, qemu-img exit %d (stdout %r, stderr %r)" % (
            what, o.describe(), q.rc, o.out[-300:], o.err[-300:])], o
    problems = []
    q_out, o_out = q.out, o.out
    if "-p" in args and "-q" not in args:
        if not o_out.startswith("    (0.00/100%)\r"):
            problems.append("%s: stdout does not start with the progress line: %r"
                            % (what, o_out[:100]))
        q_out, o_out = PROGRESS.sub("", q_out), PROGRESS.sub("", o_out)
    if o_out != q_out:
        problems.append("%s: stdout differs\n--- qemu-img\n%r\n--- ours\n%r" % (
            what, q_out[:3000], o_out[:3000]))
    if q.rc >= 2:
        lines = o.err.splitlines()
        name = named_file(q.err)
        if len(lines) != 1 or not lines[0].startswith("ublk-qcow2: ") or (
                name and name not in lines[0]):
            problems.append("%s: stderr is not one line 'ublk-qcow2: ...' naming %r: %r"
                            % (what, name, o.err[:300]))
    return problems, o


def run_case(c, workdir, log, binary):
    b = L.Builder(workdir, log, sum(map(ord, c.name)))
    comparisons = c.fn(b)
    problems = []
    for args in comparisons:
        found, o = compare(binary, b, log, args)
        problems += found
        if c.group == "size" and "64g" in c.name and o.elapsed > SPARSE_SECONDS:
            problems.append("compare %s took %.2f s (limit %.1f)" % (
                " ".join(args), o.elapsed, SPARSE_SECONDS))
    if problems:
        raise CaseFailure("\n".join(problems))
    return "%d comparison(s)" % len(comparisons)


if __name__ == "__main__":
    sys.exit(L.run_suite("compare_oracle", CASES, sys.argv[1:], run_case))
