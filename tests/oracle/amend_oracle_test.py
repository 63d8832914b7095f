#!/usr/bin/python3
"""`ublk-qcow2 amend` against `qemu-img amend` (QEMU 7.2) on twin images.

Each case builds the same images with qemu-img/qemu-io (snapshots with
`qemu-img snapshot -c`) in q/ and o/, then runs amend steps: qemu-img's in
q/, ours in o/, with the same arguments. After each step:

  * the exit statuses must be equal, and so must stdout (-p included);
  * on failure, ours prints one stderr line `ublk-qcow2: ...` and leaves
    every file of o/ byte for byte as it was;
  * on success, `qemu-img check` finds nothing wrong with ours, `qemu-img
    info --output=json` agrees on the fields amend changes (compat,
    lazy-refcounts, refcount-bits, corrupt, data-file, data-file-raw,
    compression-type, virtual size, the snapshots), the header agrees on
    its length and its extension types, the guest view (`qemu-img convert
    -O raw`, and of every internal snapshot) is byte-identical, and
    `qemu-img map --output=json` agrees on every range's flags.

Persistent bitmaps: info must list the same ones, and every consistent
bitmap must hold the same bits on both twins (`qemu-nbd -B` + `nbdinfo`).

A step may expect a documented divergence: ours refuses where qemu-img goes
on; then ours must fail cleanly and change nothing. Or, on a compat=0.10
downgrade of an image with bitmaps, ours drops the bitmaps (version 2 cannot
hold them) and frees their clusters where qemu-img keeps an extension that
version 2 ignores and leaks them: then qemu-img's twin may have leaks and a
bitmaps extension ours has not, and ours must have neither.

Usage: amend_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
"""

import json
import os
import struct
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import CaseFailure  # noqa: E402

K = 1 << 10
M = 1 << 20
TIMEOUT = 120

CASES = []
case = L.case_registry(CASES)


class Step:
    """One amend command: its arguments (image last), the snapshots whose
    views to compare, and whether ours refuses what qemu-img does."""

    def __init__(self, *args, image="a.qcow2", snapshots=(), ours_refuses=False,
                 drops_bitmaps=False):
        self.args = [str(a) for a in args] + [image]
        self.image = image
        self.snapshots = snapshots
        self.ours_refuses = ours_refuses
        self.drops_bitmaps = drops_bitmaps


def fill(b, img, cs, size):
    """Data, zero clusters (allocated and not), holes, over the image."""
    cmds = [("noise", 0, min(size, 3 * cs + 512)),
            "write -z %d %d" % (cs, cs)]  # an allocated cluster zeroed: keeps its offset
    if size > 8 * cs:
        cmds += ["write -z %d %d" % (5 * cs, 2 * cs),  # never written: plain zero clusters
                 "write -P 0x5a %d %d" % (7 * cs + 512, cs)]
    if size > 40 * cs:
        cmds += ["write -P 0x33 %d %d" % (size - 3 * cs - 1024, 3 * cs + 1024),
                 "write -z %d %d" % (size - 2 * cs, cs)]
    b.io(img, *cmds)


# --------------------------------------------------------------------------
# Feature bits.

@case("features/lazy_refcounts", "lazy_refcounts on and off, with data written between")
def _(b):
    b.create("a.qcow2", 4 * M)
    fill(b, "a.qcow2", 64 * K, 4 * M)
    return [Step("-o", "lazy_refcounts=on"), Step("-o", "lazy_refcounts=on"),
            Step("-o", "lazy_refcounts=off"), Step("-o", "nolazy_refcounts"),
            Step("-o", "lazy_refcounts"), Step("-p", "-o", "lazy_refcounts=off"),
            Step("-q", "-p", "-o", "lazy_refcounts=on")]


@case("features/lazy_dirty", "lazy_refcounts=off on a dirty image (refcounts rebuilt first)")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"lazy_refcounts": "on"})
    fill(b, "a.qcow2", 64 * K, 4 * M)
    L.hdr_set(b.path("a.qcow2"), "incompatible_features", 1)
    return [Step("-o", "lazy_refcounts=off")]


@case("features/data_file_raw", "data_file_raw off with a data file; on refused; data_file renamed")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"data_file": "a.data", "data_file_raw": "on"})
    b.io("a.qcow2", "write -P 3 0 1M")
    return [Step("-o", "data_file_raw=on"), Step("-o", "data_file_raw=off"),
            Step("-o", "data_file_raw=on"), Step("-o", "data_file=a.data,data_file_raw=off")]


@case("features/data_file_raw_none", "data_file_raw/data_file without a data file")
def _(b):
    b.create("a.qcow2", 4 * M)
    return [Step("-o", "data_file_raw=off"), Step("-o", "data_file_raw=on"),
            Step("-o", "data_file=x.data")]


@case("features/size", "size= grows and shrinks, 0 changes nothing, not a multiple of 512")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 4 * K})
    fill(b, "a.qcow2", 4 * K, 4 * M)
    return [Step("-o", "size=9M"), Step("-o", "size=3M"), Step("-o", "size=0"),
            Step("-o", "size=1000")]


@case("features/backing", "backing_file/backing_fmt: only the current values pass")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.create("a.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    return [Step("-o", "backing_file=base.qcow2,backing_fmt=qcow2"),
            Step("-o", "backing_file=base.qcow2"), Step("-o", "backing_fmt=qcow2"),
            Step("-o", "backing_file=other.qcow2,backing_fmt=qcow2"),
            Step("-o", "backing_file=base.qcow2,backing_fmt=raw")]


# --------------------------------------------------------------------------
# compat: upgrade and downgrade across cluster sizes.

for cs in (512, 4 * K, 64 * K, 2 * M):
    def make(cs):
        @case("compat/cs%d" % cs, "cluster_size=%d: v3 -> v2 (zero clusters expanded) -> v3"
              % cs)
        def _(b):
            size = max(4 * M, 48 * cs)
            b.create("a.qcow2", size, opts={"cluster_size": cs})
            fill(b, "a.qcow2", cs, size)
            return [Step("-o", "compat=0.10"), Step("-o", "compat=0.10"),
                    Step("-o", "compat=v3"), Step("-o", "compat=v2,lazy_refcounts=off"),
                    Step("-o", "compat=1.1,lazy_refcounts=on")]
    make(cs)


@case("compat/v2_upgrade", "an image made as v2: upgrade, with lazy refcounts in one step")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"compat": "0.10", "cluster_size": 4 * K})
    fill(b, "a.qcow2", 4 * K, 4 * M)
    return [Step("-o", "lazy_refcounts=on"), Step("-o", "compat=1.1,lazy_refcounts=on")]


@case("compat/backing", "zero clusters over a backing file get zeroed data clusters")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.io("base.qcow2", "write -P 0x61 0 4M")
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 64 * K}, backing="base.qcow2",
             backing_fmt="qcow2")
    fill(b, "a.qcow2", 64 * K, 4 * M)
    return [Step("-o", "compat=0.10"), Step("-o", "compat=1.1")]


@case("compat/snapshots", "internal snapshots: zero clusters in shared and snapshot-only tables")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 4 * K})
    fill(b, "a.qcow2", 4 * K, 4 * M)
    b.snapshot("a.qcow2", "s1")
    b.io("a.qcow2", "write -z 0 8k", "write -P 9 %d 64k" % (2 * M), "write -z %d 4k" % (3 * M))
    b.snapshot("a.qcow2", "s2")
    b.io("a.qcow2", "write -P 10 %d 8k" % M, "write -z %d 12k" % (M + 4 * K))
    return [Step("-o", "compat=0.10", snapshots=("s1", "s2")),
            Step("-o", "compat=1.1", snapshots=("s1", "s2"))]


@case("compat/snapshots_backing", "snapshots over a backing file: shared tables get zeroed "
      "clusters counted once per L1")
def _(b):
    b.create("base.qcow2", 2 * M)
    b.io("base.qcow2", "write -P 0x71 0 2M")
    b.create("a.qcow2", 2 * M, opts={"cluster_size": 64 * K}, backing="base.qcow2",
             backing_fmt="qcow2")
    b.io("a.qcow2", "write -z 0 128k", "write -P 1 256k 64k", "write -z 256k 64k")
    b.snapshot("a.qcow2", "s1")
    b.io("a.qcow2", "write -z %d 64k" % M)
    return [Step("-o", "compat=0.10", snapshots=("s1",)),
            Step("-o", "compat=1.1", snapshots=("s1",))]


@case("compat/shared_tables", "512 B clusters over a backing file: L2 tables still shared "
      "with a snapshot get zeroed clusters counted once per L1 (refcount 2)")
def _(b):
    b.create("base.qcow2", M)
    b.io("base.qcow2", "write -P 0x72 0 1M")
    b.create("a.qcow2", M, opts={"cluster_size": 512}, backing="base.qcow2",
             backing_fmt="qcow2")
    # An L2 table spans 32 KiB: zero clusters, plain and preallocated, in
    # several tables.
    b.io("a.qcow2", "write -z 0 2k", "write -P 1 40k 1k", "write -z 40k 512",
         "write -z 100k 1k", "write -P 2 200k 512", "write -z 200k 512")
    b.snapshot("a.qcow2", "s1")
    b.io("a.qcow2", "write -P 3 0 512")  # the first table alone is copied
    return [Step("-o", "compat=0.10", snapshots=("s1",)),
            Step("-o", "compat=1.1", snapshots=("s1",))]


@case("compat/v2_snapshots_upgrade", "v2 image with snapshots: upgrade keeps them")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"compat": "0.10", "cluster_size": 64 * K})
    fill(b, "a.qcow2", 64 * K, 4 * M)
    b.snapshot("a.qcow2", "s1")
    b.io("a.qcow2", "write -P 2 0 100k")
    return [Step("-o", "compat=1.1", snapshots=("s1",))]


def strip_snapshot_extra_data(path):
    """Drops every snapshot entry's extra data, as QEMU before 4.x wrote
    version 2 tables, so that an upgrade must rewrite the table."""
    with open(path, "r+b") as f:
        hdr = f.read(72)
        nb, off = struct.unpack(">I", hdr[60:64])[0], struct.unpack(">Q", hdr[64:72])[0]
        f.seek(off)
        data = f.read(1 << 20)
        out, pos = b"", 0
        for i in range(nb):
            e = data[pos:pos + 40]
            ids, names = struct.unpack(">HH", e[12:16])
            extra = struct.unpack(">I", e[36:40])[0]
            ent = e[:36] + struct.pack(">I", 0) + data[pos + 40 + extra:pos + 40 + extra + ids + names]
            if i < nb - 1:
                ent += b"\0" * (-len(ent) % 8)
            out += ent
            pos += (40 + extra + ids + names + 7) & ~7
        f.seek(off)
        f.write(out + b"\0" * (pos - len(out)))


@case("compat/v2_old_snapshots", "v2 snapshots without extra data: the upgrade rewrites the "
      "table with v3's")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"compat": "0.10", "cluster_size": 4 * K})
    fill(b, "a.qcow2", 4 * K, 4 * M)
    b.snapshot("a.qcow2", "s1")
    b.io("a.qcow2", "write -P 2 0 100k")
    b.snapshot("a.qcow2", "second")
    strip_snapshot_extra_data(b.path("a.qcow2"))
    return [Step("-o", "compat=1.1", snapshots=("s1", "second")),
            Step("-o", "compat=0.10", snapshots=("s1", "second"))]


@case("compat/combined", "compat with size, refcount_bits=16 and lazy_refcounts in one -o")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"compat": "0.10"})
    b.io("a.qcow2", "write -P 1 0 1M")
    b.snapshot("a.qcow2", "s1")
    b.create("b.qcow2", 4 * M, opts={"cluster_size": 4 * K})
    fill(b, "b.qcow2", 4 * K, 4 * M)
    return [Step("-o", "compat=1.1,size=8M", snapshots=("s1",)),
            Step("-o", "compat=0.10,size=8M", snapshots=("s1",)),
            Step("-o", "compat=1.1,refcount_bits=16,lazy_refcounts=on", snapshots=("s1",)),
            Step("-o", "compat=0.10,size=16M", image="b.qcow2"),
            Step("-o", "size=4M,compat=v3,refcount_bits=16", image="b.qcow2")]


@case("compat/compressed", "compressed clusters (zlib): downgrade keeps them")
def _(b):
    b.raw("src.raw", 2 * M, [(0, L.compressible(b.rng, 2 * M))])
    b.qemu_img("convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=4k", "src.raw",
               "a.qcow2")
    b.io("a.qcow2", "write -z 64k 64k")
    return [Step("-o", "compat=0.10"), Step("-o", "compat=1.1")]


@case("compat/zstd", "zstd: downgrade refused with compressed clusters, done without")
def _(b):
    b.create("a.qcow2", 2 * M, opts={"compression_type": "zstd"})
    b.create("c.qcow2", 2 * M, opts={"compression_type": "zstd"})
    b.io("c.qcow2", "write -c -P 5 0 64k")
    return [Step("-o", "compat=0.10"), Step("-o", "compat=0.10", image="c.qcow2")]


@case("compat/refused", "downgrades QEMU refuses: extended L2, data file, refcount width, "
      "snapshot of another size")
def _(b):
    b.create("x.qcow2", 4 * M, opts={"extended_l2": "on"})
    b.create("d.qcow2", 4 * M, opts={"data_file": "d.data"})
    b.create("r.qcow2", 4 * M, opts={"refcount_bits": 8})
    b.create("s.qcow2", 4 * M)
    b.snapshot("s.qcow2", "s1")
    b.qemu_img("resize", "s.qcow2", "8M")
    return [Step("-o", "compat=0.10", image="x.qcow2"),
            Step("-o", "compat=0.10", image="d.qcow2"),
            Step("-o", "compat=0.10", image="r.qcow2"),
            Step("-o", "compat=0.10,refcount_bits=16", image="r.qcow2"),
            Step("-o", "compat=0.10", image="s.qcow2")]


@case("refcount/widths", "refcount_bits changed up and down on data, compressed clusters and a "
      "snapshot; a width too narrow for the shared clusters refused with QEMU's message")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 4096})
    fill(b, "a.qcow2", 4096, 4 * M)
    b.io("a.qcow2", "write -c -P 9 3M 64k")
    b.snapshot("a.qcow2", "s1")
    b.io("a.qcow2", "write -P 8 0 256k")
    b.create("big.qcow2", 64 * M, opts={"cluster_size": 512, "refcount_bits": 1})
    b.io("big.qcow2", "write -P 3 0 8M")
    return [Step("-o", "refcount_bits=64", snapshots=("s1",)),
            Step("-o", "refcount_bits=1", snapshots=("s1",)),
            Step("-o", "refcount_bits=2", snapshots=("s1",)),
            Step("-o", "refcount_bits=16,lazy_refcounts=on", snapshots=("s1",)),
            Step("-o", "refcount_bits=64", image="big.qcow2"),
            Step("-o", "refcount_bits=4", image="big.qcow2")]


@case("compat/lazy_downgrade", "downgrade an image with lazy refcounts (the bit is dropped)")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"lazy_refcounts": "on", "cluster_size": 512})
    fill(b, "a.qcow2", 512, 4 * M)
    return [Step("-o", "compat=0.10")]


def with_bitmaps(b, size, cs):
    """Data, then an enabled bitmap b0 (QEMU's granularity), a 512 B one b1
    and a disabled one b2, then writes only the enabled ones see."""
    fill(b, "a.qcow2", cs, size)
    b.qemu_img("bitmap", "--add", "a.qcow2", "b0")
    b.qemu_img("bitmap", "--add", "-g", "512", "a.qcow2", "b1")
    b.qemu_img("bitmap", "--add", "--disable", "a.qcow2", "b2")
    b.io("a.qcow2", "write -P 0x61 %d %d" % (cs + 512, 3 * cs), "write -z %d %d" % (9 * cs, cs),
         "write -P 0x62 %d 4096" % (size - 8192), "discard %d %d" % (2 * cs, cs))


@case("bitmaps/options", "feature bits, refcount widths and sizes on an image with bitmaps: "
      "their bits kept (and resized)")
def _(b):
    b.create("a.qcow2", 8 * M)
    with_bitmaps(b, 8 * M, 64 * K)
    return [Step("-o", "lazy_refcounts=on"), Step("-o", "refcount_bits=64"),
            Step("-o", "refcount_bits=1"), Step("-o", "size=12M"),
            Step("-o", "size=5M,lazy_refcounts=off,refcount_bits=16")]


@case("bitmaps/small_clusters", "512 B clusters, bitmap tables of many clusters: refcount_bits "
      "and size, then a downgrade")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 512})
    with_bitmaps(b, 4 * M, 512)
    return [Step("-o", "refcount_bits=8"), Step("-o", "size=6M,refcount_bits=16"),
            Step("-o", "compat=0.10", drops_bitmaps=True)]


@case("bitmaps/downgrade", "compat=0.10 drops the bitmaps (QEMU leaks them); an inconsistent "
      "one too; then an upgrade back")
def _(b):
    b.create("a.qcow2", 8 * M, opts={"cluster_size": 4096})
    with_bitmaps(b, 8 * M, 4096)
    # b1 in use, as a program that crashed while writing leaves it.
    entry = L.bitmap_entries(b.path("a.qcow2"))[1]
    L.write_be(b.path("a.qcow2"), entry + 12, 4, L.read_be(b.path("a.qcow2"), entry + 12, 4) | 1)
    return [Step("-o", "compat=0.10,size=10M"),  # both refuse: b1 cannot be resized
            Step("-o", "compat=0.10", drops_bitmaps=True), Step("-o", "compat=1.1,size=10M")]


# --------------------------------------------------------------------------
# Bad command lines and values: the same exit status, ours unchanged.

@case("bad/options", "options amend cannot take, bad values, bad lists")
def _(b):
    b.create("a.qcow2", 4 * M)
    b.io("a.qcow2", "write -P 1 0 1M")
    steps = [Step("-o", o) for o in (
        "cluster_size=4k", "encryption=on", "encrypt.format=luks", "preallocation=full",
        "extended_l2=on", "compression_type=zstd", "foo=bar", "cluster_size=4k,foo=bar",
        "lazy_refcounts=maybe", "refcount_bits=3", "refcount_bits=128", "refcount_bits=0",
        "refcount_bits=x", "compat=foo", "compat=0.10,lazy_refcounts=on", "size=abc",
        "size=1000", ",compat=1.1", "compat=1.1,", "", "encrypt.new-secret=x")]
    steps += [Step("-o", "compat=0.10", "-o", "lazy_refcounts=on"),
              Step(), Step("-o", "compat=1.1", image="missing.qcow2"),
              Step("-f", "raw", "-o", "compat=1.1"),
              Step("-o", "refcount_bits=16"), Step("-o", "refcount_bits=8")]
    return steps


@case("bad/raw", "a raw image: amend not supported")
def _(b):
    b.raw("a.img", M, [(0, b"\x11" * 4096)])
    return [Step("-f", "raw", "-o", "size=2M", image="a.img")]


@case("bad/corrupt", "an image marked corrupt")
def _(b):
    b.create("a.qcow2", 4 * M)
    L.hdr_set(b.path("a.qcow2"), "incompatible_features", 2)
    return [Step("-o", "lazy_refcounts=on")]


@case("bad/help", "-o help and -o ? list the options")
def _(b):
    b.create("a.qcow2", 4 * M)
    return [Step("-o", "help"), Step("-o", "?"), Step("-o", "compat=1.1,help")]


# --------------------------------------------------------------------------

INFO_KEYS = ("compat", "lazy-refcounts", "refcount-bits", "corrupt", "data-file",
             "data-file-raw", "compression-type", "extended-l2")


def info(cwd, log, image):
    r = L.run([L.QEMU_IMG, "info", "--output=json", image], cwd, log, timeout=TIMEOUT)
    if r.rc != 0:
        raise CaseFailure("qemu-img info %s failed: %s" % (image, r.err[-300:]))
    j = json.loads(r.out)
    data = j.get("format-specific", {}).get("data", {})
    # (Dates differ: the twins' snapshots were taken at different times.)
    snaps = [{k: s.get(k) for k in ("id", "name", "vm-state-size", "vm-clock-sec",
                                     "vm-clock-nsec", "icount")}
             for s in j.get("snapshots", [])]
    return {"virtual-size": j.get("virtual-size"), "dirty-flag": j.get("dirty-flag"),
            "backing": j.get("backing-filename"), "bitmaps": data.get("bitmaps"),
            "snapshots": snaps, **{k: data.get(k) for k in INFO_KEYS}}


def bitmap_bits(cwd, log, image, bitmaps):
    """Each consistent bitmap's dirty extents as qemu-nbd serves them."""
    return {bm["name"]: L.nbd_bitmap_map(cwd, image, bm["name"], log)
            for bm in bitmaps or [] if "in-use" not in bm["flags"]}


def header_shape(path):
    """What the header says beyond qemu-img info: its version, length,
    feature bits and extension types."""
    if not path.endswith(".qcow2"):
        return None
    version = L.hdr_get(path, "version")
    shape = {"version": version, "exts": [t for t, _, _ in L.header_extensions(path)]}
    if version >= 3:
        for f in ("header_length", "incompatible_features", "compatible_features",
                  "autoclear_features", "refcount_order"):
            shape[f] = L.hdr_get(path, f)
    return shape


def snapshot_extra(path):
    """Each snapshot entry's extra data size."""
    if not path.endswith(".qcow2"):
        return []
    return [L.read_be(path, pos + 36, 4) for pos in L.snapshot_entries(path)]


def snapshot_all(d):
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if os.path.isfile(p) and not name.startswith("."):
            with open(p, "rb") as f:
                out[name] = f.read()
    return out


def map_flags(cwd, log, image):
    r = L.run([L.QEMU_IMG, "map", "--output=json", image], cwd, log, timeout=TIMEOUT)
    if r.rc != 0:
        raise CaseFailure("qemu-img map %s failed: %s" % (image, r.err[-300:]))
    merged = []
    for e in json.loads(r.out):
        if e["data"]:
            # There `zero` says the host file has a hole under the cluster
            # (QEMU zeroes with write-zeroes on the host file, we write zeros),
            # not how the image maps it.
            e["zero"] = False
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if merged and merged[-1][0] == key and merged[-1][1] + merged[-1][2] == e["start"]:
            merged[-1][2] += e["length"]
        else:
            merged.append([key, e["start"], e["length"]])
    return merged


def guest_view(cwd, log, image, out, snapshot=None):
    argv = [L.QEMU_IMG, "convert", "-O", "raw"]
    if snapshot:
        argv += ["-l", "snapshot.name=%s" % snapshot]
    r = L.run(argv + [image, out], cwd, log, timeout=TIMEOUT)
    if r.rc != 0:
        raise CaseFailure("qemu-img convert %s failed: %s" % (image, r.err[-300:]))


def run_step(binary, workdir, log, qdir, odir, step):
    what = "amend %s" % " ".join(step.args)
    before = snapshot_all(odir)
    for s in step.snapshots:
        guest_view(odir, log, step.image, os.path.join(workdir, "pre-%s.raw" % s), s)
    q = L.run([L.QEMU_IMG, "amend"] + step.args, qdir, log, timeout=TIMEOUT)
    o = L.run([binary, "amend"] + step.args, odir, log, timeout=TIMEOUT)
    if step.ours_refuses:
        if q.rc != 0:
            raise CaseFailure("%s: expected qemu-img to succeed: %s" % (what, q.err[-300:]))
        q_rc = 1
    else:
        q_rc = q.rc
    if o.timed_out or o.signal or o.rc != q_rc:
        raise CaseFailure("%s: %s, qemu-img exit %d\nours: %r\nqemu: %r" % (
            what, o.describe(), q.rc, o.err[-400:], q.err[-400:]))
    if o.rc != 0:
        lines = o.err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("ublk-qcow2: "):
            raise CaseFailure("%s: stderr is not one line 'ublk-qcow2: ...': %r" % (what, o.err))
        if snapshot_all(odir) != before:
            raise CaseFailure("%s: failed, but changed the files" % what)
        tag = "ours refuses" if step.ours_refuses else "both refuse"
        return "%s: %s (%s)" % (what, tag, lines[0][len("ublk-qcow2: "):][:80])
    if o.out != q.out:
        raise CaseFailure("%s: stdout %r, qemu-img %r" % (what, o.out[:300], q.out[:300]))
    if "help" in what or "?" in step.args:
        return "%s: same help" % what
    c = L.run([L.QEMU_IMG, "check", step.image], odir, log, timeout=TIMEOUT)
    if c.rc != 0:
        raise CaseFailure("%s: qemu-img check exit %d:\n%s" % (what, c.rc, c.out[-1500:]))
    qi, oi = info(qdir, log, step.image), info(odir, log, step.image)
    if qi != oi:
        raise CaseFailure("%s: qemu-img info differs\nqemu-img %s\nours     %s" % (what, qi, oi))
    qb = bitmap_bits(qdir, log, step.image, qi["bitmaps"])
    ob = bitmap_bits(odir, log, step.image, oi["bitmaps"])
    if qb != ob:
        raise CaseFailure("%s: bitmap bits differ\nqemu-img %s\nours     %s" % (what, qb, ob))
    qh = header_shape(os.path.join(qdir, step.image))
    oh = header_shape(os.path.join(odir, step.image))
    if step.drops_bitmaps:
        if L.EXT_BITMAPS in oh["exts"]:
            raise CaseFailure("%s: ours kept a bitmaps extension: %s" % (what, oh))
        qh["exts"] = [t for t in qh["exts"] if t != L.EXT_BITMAPS]
    if qh != oh:
        raise CaseFailure("%s: header differs\nqemu-img %s\nours     %s" % (what, qh, oh))
    qx = snapshot_extra(os.path.join(qdir, step.image))
    ox = snapshot_extra(os.path.join(odir, step.image))
    if qx != ox:
        raise CaseFailure("%s: snapshot extra data sizes %s, qemu-img %s" % (what, ox, qx))
    guest_view(qdir, log, step.image, os.path.join(workdir, "q.raw"))
    guest_view(odir, log, step.image, os.path.join(workdir, "o.raw"))
    L.compare_raw(os.path.join(workdir, "q.raw"), os.path.join(workdir, "o.raw"))
    notes = []
    for s in step.snapshots:
        # Ours must read as before the amend. qemu-img 7.2's downgrade
        # writes zeros into a zero-flagged cluster that a snapshot still maps
        # as data, so its twin may have lost the snapshot's data: then only
        # ours is compared with the view from before.
        # (A view is as long as the image now is: after a resize only
        # qemu-img's twin can tell.)
        pre, ours = os.path.join(workdir, "pre-%s.raw" % s), os.path.join(workdir, "o.raw")
        guest_view(odir, log, step.image, ours, s)
        resized = os.path.getsize(pre) != os.path.getsize(ours)
        if not resized:
            try:
                L.compare_raw(pre, ours)
            except CaseFailure as e:
                raise CaseFailure("%s: snapshot %s changed: %s" % (what, s, e))
        guest_view(qdir, log, step.image, os.path.join(workdir, "q.raw"), s)
        try:
            L.compare_raw(os.path.join(workdir, "q.raw"), ours)
        except CaseFailure as e:
            if resized:
                raise CaseFailure("%s: snapshot %s: %s" % (what, s, e))
            notes.append("qemu-img changed snapshot %s" % s)
    qm, om = map_flags(qdir, log, step.image), map_flags(odir, log, step.image)
    if qm != om:
        raise CaseFailure("%s: map flags differ\nqemu-img %s\nours     %s" % (what, qm[:20],
                                                                             om[:20]))
    return "%s: ok%s" % (what, "".join(" (%s)" % n for n in notes))


def run_case(c, workdir, log, binary):
    # Twin trees built by the same seeded steps.
    qdir = os.path.join(workdir, "q")
    odir = os.path.join(workdir, "o")
    os.makedirs(qdir)
    os.makedirs(odir)
    seed = sum(map(ord, c.name))
    steps = c.fn(L.Builder(qdir, log, seed))
    c.fn(L.Builder(odir, log, seed))
    done = []
    for s in steps:
        done.append(run_step(binary, workdir, log, qdir, odir, s))
        if s.ours_refuses:
            break  # the twins differ from here on
    return "; ".join(done)


if __name__ == "__main__":
    sys.exit(L.run_suite("amend_oracle", CASES, sys.argv[1:], run_case))
