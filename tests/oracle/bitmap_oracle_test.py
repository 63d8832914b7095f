#!/usr/bin/python3
"""`ublk-qcow2 bitmap`, bitmap maintenance and `map --bitmap` against QEMU 7.2
on twin images.

Each case creates an image (qemu-img create) and copies it (with its external
data file, if any) to q/ and o/.
Steps run on both copies: `bitmap ARGS` (qemu-img bitmap in q/, ours in o/,
same arguments), and writes (qemu-img bench -w in q/, our bench -w in o/,
same offsets, sizes and pattern: our engine tracks them). After every step:

  * exit statuses equal; on failure the one-line messages equal once the
    program name is dropped and QEMU's node name ('#block123') is read as
    the file name;
  * `qemu-img info --output=json` lists the same bitmaps (name, granularity,
    flags) for both copies;
  * every bitmap's contents, served by `qemu-nbd -r -B NAME` and read with
    `nbdinfo --map=qemu:dirty-bitmap:NAME`, are equal on both copies, and
    our `map --bitmap NAME --output=json` prints the same ranges;
  * `qemu-img check` finds nothing wrong with either copy.

Usage: bitmap_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
"""

import json
import os
import re
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import CaseFailure  # noqa: E402

K = 1 << 10
M = 1 << 20

CASES = []
case = L.case_registry(CASES)


def bitmap(*args):
    return ("bitmap", [str(a) for a in args])


def bench(offset, count, size, step, pattern):
    return ("bench", ["-w", "-c", str(count), "-d", "1", "-s", str(size), "-S", str(step), "-o",
                      str(offset), "--pattern=%d" % pattern])


def convert(*args):
    """convert ARGS a.qcow2 c.qcow2; on success c.qcow2 replaces a.qcow2."""
    return ("convert", [str(a) for a in args] + ["a.qcow2", "c.qcow2"])


def resize(*args):
    return ("resize", [str(a) for a in args])


def lifecycle(g, size):
    """Add, write, merge, enable/disable, clear, remove, with writes between."""
    return [
        bitmap("--add", "-g", g, "a.qcow2", "b0"),
        bitmap("--add", "--disable", "a.qcow2", "b1"),
        bench(0, 3, 4096, 1 * M + 512, 0x11),
        bench(size - 9 * K, 1, 9 * K, 0, 0x12),
        bitmap("--merge", "b0", "--enable", "a.qcow2", "b1"),
        bench(size // 3 + 512, 2, 1536, 70000, 0x13),
        bitmap("--clear", "--disable", "a.qcow2", "b0"),
        bench(size // 2, 1, 64 * K, 0, 0x14),
        bitmap("--add", "a.qcow2", "b2"),  # default granularity
        bench(5 * K, 1, 512, 0, 0x15),
        bitmap("--remove", "a.qcow2", "b1"),
    ]


def errors():
    return [
        bitmap("--add", "a.qcow2", "x"),
        bitmap("--add", "a.qcow2", "x"),  # exists
        bitmap("--remove", "a.qcow2", "nope"),
        bitmap("--enable", "a.qcow2", "nope"),
        bitmap("--merge", "nope", "a.qcow2", "x"),
        bitmap("--add", "-g", "100", "a.qcow2", "y"),
        bitmap("--add", "-g", "4G", "a.qcow2", "y"),
        bitmap("--clear", "-g", "1M", "a.qcow2", "x"),
        bitmap("a.qcow2", "x"),
        bitmap("--add", "a.qcow2", "n" * 1024),
        bitmap("--add", "--remove", "--add", "a.qcow2", "z"),  # add kept, remove, add again
        bitmap("--add", "--add", "a.qcow2", "w"),  # second add fails, first kept
    ]


@case("resize/grow_shrink", "resize grows and shrinks the bitmaps (tables too), as qemu-img's")
def _(b):
    size = 4 * M
    return dict(create={"cluster_size": 512}, size=size, steps=[
        bitmap("--add", "-g", 512, "a.qcow2", "fine"),
        bitmap("--add", "-g", 64 * K, "a.qcow2", "coarse"),
        bitmap("--add", "--disable", "-g", 4096, "a.qcow2", "off"),
        bench(0, 3, 4096, 1 * M + 512, 0x21),
        bench(size - 9 * K, 1, 9 * K, 0, 0x22),
        resize("a.qcow2", 5 * size + 1536),  # the 512 B bitmap's table grows
        bench(size + 4 * K, 2, 4096, 2 * M, 0x23),
        resize("--shrink", "a.qcow2", 2 * M + 3 * 512),  # a partial last granule
        bench(2 * M - 1024, 1, 1024, 0, 0x24),
        resize("a.qcow2", "+1M"),
        bench(2 * M + 3 * 512, 1, 512, 0, 0x25),
    ])


@case("matrix/g512_c64k", "granularity 512 B on 64 KiB clusters")
def _(b):
    return dict(create={}, size=64 * M, steps=lifecycle(512, 64 * M))


@case("matrix/g4k_c512", "granularity 4 KiB on 512 B clusters")
def _(b):
    return dict(create={"cluster_size": 512}, size=16 * M, steps=lifecycle(4096, 16 * M))


@case("matrix/g64k_c4k", "granularity 64 KiB on 4 KiB clusters")
def _(b):
    return dict(create={"cluster_size": 4096}, size=64 * M, steps=lifecycle(65536, 64 * M))


@case("matrix/g2m_c2m", "granularity 2 MiB on 2 MiB clusters")
def _(b):
    return dict(create={"cluster_size": 2 * M}, size=256 * M, steps=lifecycle(2 * M, 256 * M))


@case("matrix/g1m_extl2", "granularity 1 MiB, extended L2 entries")
def _(b):
    return dict(create={"extended_l2": "on"}, size=64 * M, steps=lifecycle(M, 64 * M))


@case("matrix/g8k_backing", "granularity 8 KiB over a backing file")
def _(b):
    b.create("base.qcow2", 64 * M)
    b.io("base.qcow2", "write -P 0x33 0 %d" % (8 * M))
    return dict(create={}, size=64 * M, steps=lifecycle(8192, 64 * M),
                backing="base.qcow2")


@case("matrix/g64k_datafile", "granularity 64 KiB, an external data file (data_file=a.data)")
def _(b):
    return dict(create={"data_file": "a.data"}, size=64 * M, steps=lifecycle(64 * K, 64 * M))


@case("matrix/g4k_datafile_raw", "granularity 4 KiB, a raw external data file "
      "(data_file=a.data, data_file_raw=on)")
def _(b):
    return dict(create={"data_file": "a.data", "data_file_raw": "on"}, size=64 * M,
                steps=lifecycle(4096, 64 * M))


@case("errors/messages", "qemu-img's messages and exit statuses for bad operations")
def _(b):
    return dict(create={}, size=64 * M, steps=errors())


@case("errors/inconsistent", "a bitmap found in use: listed, never tracked, refused, removable")
def _(b):
    b.create("a.qcow2", 64 * M)
    b.qemu_img("bitmap", "--add", "a.qcow2", "b0")
    b.qemu_img("bitmap", "--add", "-g", "4k", "a.qcow2", "b1")
    b.io("a.qcow2", "write -P 1 0 100k")
    # b0 in use, as a program that crashed while writing leaves it.
    entry = L.bitmap_entries(b.path("a.qcow2"))[0]
    L.write_be(b.path("a.qcow2"), entry + 12, 4, L.read_be(b.path("a.qcow2"), entry + 12, 4) | 1)
    return dict(create=None, size=64 * M, steps=[
        bench(3 * M, 2, 4096, 1 * M, 0x21),
        bitmap("--clear", "a.qcow2", "b0"),
        bitmap("--merge", "b0", "a.qcow2", "b1"),
        bitmap("--merge", "b1", "a.qcow2", "b0"),
        bitmap("--enable", "a.qcow2", "b0"),
        bitmap("--add", "--merge", "b0", "a.qcow2", "b2"),
        bench(9 * M, 1, 512, 0, 0x22),
        convert("--bitmaps", "-O", "qcow2"),  # refused: b0 is inconsistent
        bitmap("--remove", "a.qcow2", "b0"),
        convert("--bitmaps", "-O", "qcow2"),
        bench(11 * M, 1, 512, 0, 0x23),
    ])


@case("convert/skip_broken", "convert --bitmaps --skip-broken-bitmaps leaves out the bitmaps "
      "in use and copies the rest; without --bitmaps it is refused")
def _(b):
    b.create("a.qcow2", 32 * M)
    for name in ("b0", "b1", "b2"):
        b.qemu_img("bitmap", "--add", "a.qcow2", name)
    b.io("a.qcow2", "write -P 1 0 100k")
    # b0 and b2 in use, as a program that crashed while writing leaves them.
    entries = L.bitmap_entries(b.path("a.qcow2"))
    for entry in (entries[0], entries[2]):
        L.write_be(b.path("a.qcow2"), entry + 12, 4,
                   L.read_be(b.path("a.qcow2"), entry + 12, 4) | 1)
    return dict(create=None, size=32 * M, steps=[
        bench(3 * M, 2, 4096, 1 * M, 0x41),
        convert("--skip-broken-bitmaps", "-O", "qcow2"),  # refused: needs --bitmaps
        convert("--bitmaps", "--skip-broken-bitmaps", "-O", "raw"),  # refused: raw
        convert("--bitmaps", "-O", "qcow2"),  # refused: b2 is inconsistent
        convert("--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2"),  # b1 only
        bench(9 * M, 1, 512, 0, 0x42),  # the copy's b1 tracks it
    ])


@case("convert/bitmaps", "convert --bitmaps copies names, granularities, flags and bits")
def _(b):
    return dict(create={"cluster_size": 4096}, size=32 * M, steps=[
        bitmap("--add", "-g", "512", "a.qcow2", "fine"),
        bitmap("--add", "--disable", "-g", "1M", "a.qcow2", "coarse"),
        bench(M + 512, 5, 1024, 3 * M, 0x31),
        bitmap("--merge", "fine", "a.qcow2", "coarse"),
        bench(20 * M, 1, 4096, 0, 0x32),
        convert("--bitmaps", "-O", "raw"),  # refused: raw has no bitmaps
        convert("--bitmaps", "-O", "qcow2", "-o", "compat=0.10"),  # refused: v2
        convert("--bitmaps", "-O", "qcow2", "-o", "cluster_size=64k"),
        bench(30 * M, 1, 4096, 0, 0x33),  # the copy's enabled bitmap tracks writes
    ])


@case("errors/v2", "a version 2 image has no bitmaps")
def _(b):
    return dict(create={"compat": "0.10"}, size=64 * M,
                steps=[bitmap("--add", "a.qcow2", "b")])


def normalize(text, image_path):
    # QEMU adds a hint line to some errors ("Try block-dirty-bitmap-remove
    # ..."); ours are one line.
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = re.sub(r"^(qemu-img|ublk-qcow2): ", "", text)
    return re.sub(r"'#block\d+'", "'%s'" % image_path, text)


def info_bitmaps(d, log):
    res = L.must([L.QEMU_IMG, "info", "--output=json", "a.qcow2"], d, log)
    return json.loads(res.out).get("format-specific", {}).get("data", {}).get("bitmaps", [])


def nbd_map(d, name, log):
    return L.nbd_bitmap_map(d, "a.qcow2", name, log)


def our_map(binary, d, name, log):
    res = L.run([binary, "map", "--bitmap", name, "--output=json", "a.qcow2"], d, log)
    if res.rc != 0:
        raise CaseFailure("map --bitmap %s: %s" % (name, res.err))
    return [(e["start"], e["length"], e["dirty"]) for e in json.loads(res.out)]


def compare(binary, q, o, log, step):
    qb, ob = info_bitmaps(q, log), info_bitmaps(o, log)
    if qb != ob:
        raise CaseFailure("after %s: info bitmaps differ:\nqemu-img: %s\nours: %s" % (step, qb, ob))
    for bm in qb:
        if "in-use" in bm["flags"]:
            continue
        mq, mo = nbd_map(q, bm["name"], log), nbd_map(o, bm["name"], log)
        if mq != mo:
            raise CaseFailure("after %s: bitmap %s differs:\nqemu's: %s\nours: %s"
                              % (step, bm["name"], mq, mo))
        mine = our_map(binary, o, bm["name"], log)
        if mine != mo:
            raise CaseFailure("after %s: map --bitmap %s prints %s, qemu-nbd serves %s"
                              % (step, bm["name"], mine, mo))
    for d in (q, o):
        res = L.run([L.QEMU_IMG, "check", "a.qcow2"], d, log)
        if res.rc != 0:
            raise CaseFailure("after %s: qemu-img check in %s: %s" % (step, d, res.out + res.err))


def run_case(c, workdir, log, binary):
    b = L.Builder(workdir, log, hash(c.name) & 0xffff)
    spec = c.fn(b)
    q, o = os.path.join(workdir, "q"), os.path.join(workdir, "o")
    if spec["create"] is not None:
        b.create("a.qcow2", spec["size"], opts=spec["create"] or None, backing=spec.get("backing"),
                 backing_fmt="qcow2" if spec.get("backing") else None)
    for d in (q, o):
        os.makedirs(d)
        L.must(["cp", "-a"] + [os.path.join(workdir, f) for f in os.listdir(workdir)
                                if f.endswith((".qcow2", ".data"))] + [d], workdir, log)
    steps = 0
    for kind, args in spec["steps"]:
        if kind == "bitmap":
            rq = L.run([L.QEMU_IMG, "bitmap"] + args, q, log)
            ro = L.run([binary, "bitmap"] + args, o, log)
        elif kind == "resize":
            rq = L.run([L.QEMU_IMG, "resize", "-q"] + args, q, log)
            ro = L.run([binary, "resize", "-q"] + args, o, log)
        elif kind == "convert":
            rq = L.run([L.QEMU_IMG, "convert"] + args, q, log)
            ro = L.run([binary, "convert"] + args, o, log)
            for d, r in ((q, rq), (o, ro)):
                if r.rc == 0:
                    os.replace(os.path.join(d, "c.qcow2"), os.path.join(d, "a.qcow2"))
                elif os.path.exists(os.path.join(d, "c.qcow2")):
                    os.unlink(os.path.join(d, "c.qcow2"))
        else:
            rq = L.run([L.QEMU_IMG, "bench", "-q", "-f", "qcow2"] + args + ["a.qcow2"], q, log)
            ro = L.run([binary, "bench"] + args + ["a.qcow2"], o, log)
        what = "%s %s" % (kind, " ".join(a if len(a) < 40 else a[:20] + "..." for a in args))
        if rq.rc != ro.rc:
            raise CaseFailure("%s: qemu-img exits %d (%s), ours %d (%s)"
                              % (what, rq.rc, rq.err.strip(), ro.rc, ro.err.strip()))
        if rq.rc != 0 and normalize(rq.err, "a.qcow2") != normalize(ro.err, "a.qcow2"):
            raise CaseFailure("%s: messages differ:\nqemu-img: %s\nours:     %s"
                              % (what, rq.err.strip(), ro.err.strip()))
        compare(binary, q, o, log, what)
        steps += 1
    return "%d steps like qemu's" % steps


if __name__ == "__main__":
    sys.exit(L.run_suite("bitmap_oracle", CASES, sys.argv[1:], run_case))
