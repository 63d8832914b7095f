#!/usr/bin/python3
"""`ublk-qcow2 resize` against `qemu-img resize` (QEMU 7.2) on twin images.

Each case builds images with qemu-img/qemu-io in a directory q/, copies the
directory to o/, then runs one or more resize commands: qemu-img's in q/,
ours in o/, with the same arguments. After each step:

  * the exit statuses must be equal, and so must stdout;
  * on failure, ours prints one stderr line naming the image, and leaves
    every file of o/ byte for byte as it was;
  * on success, `qemu-img check` finds nothing wrong with ours, the virtual
    sizes are equal, the guest view (`qemu-img convert -O raw`, and of every
    internal snapshot) is byte-identical, and `qemu-img map --output=json`
    agrees on every range's depth, presence, zero and data flags (host
    offsets may differ: the clusters are placed by different allocators).

A step may expect a documented divergence: ours fails where qemu-img
succeeds; then ours must fail cleanly and change nothing.

Usage: resize_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
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
TIMEOUT = 120

CASES = []
case = L.case_registry(CASES)


class Step:
    """One resize command: its arguments (image included), and whether ours
    is expected to refuse what qemu-img does (a documented divergence)."""

    def __init__(self, *args, image="a.qcow2", ours_refuses=False, snapshots=(), map_upto=None,
                 timeout=TIMEOUT):
        self.args = [str(a) for a in args]
        # For ours: a step qemu-img does in well under a second may get less
        # than TIMEOUT, so that a hang fails fast.
        self.timeout = timeout
        self.image = image
        self.ours_refuses = ours_refuses
        self.snapshots = snapshots
        # Compare map flags only below the image's last `map_upto` bytes
        # (None: all of them).
        self.map_upto = map_upto


def fill(b, img, cs, size, fmt="qcow2"):
    """Data, zeros and holes over the image, at and across cluster bounds."""
    cmds = [("noise", 0, min(size, 3 * cs + 512))]
    if size > 8 * cs:
        cmds += ["write -z %d %d" % (5 * cs, cs), "write -P 0x5a %d %d" % (6 * cs + 512, cs)]
    if size > 40 * cs:
        cmds += ["write -P 0x33 %d %d" % (size - 3 * cs - 1024, 3 * cs + 1024)]
    b.io(img, *cmds, fmt=fmt)


# --------------------------------------------------------------------------
# Cluster sizes and widths: grow past the L1 table's end, shrink into data.

for cs in (512, 4 * K, 64 * K, 2 * M):
    def make(cs):
        @case("clusters/cs%d" % cs, "cluster_size=%d: grow (L1 grows), shrink into data, "
              "to a size inside a cluster" % cs)
        def _(b):
            size = max(4 * M, 48 * cs)
            b.create("a.qcow2", size, opts={"cluster_size": cs})
            fill(b, "a.qcow2", cs, size)
            return [Step("a.qcow2", "+%d" % (64 * M)),
                    Step("--shrink", "a.qcow2", size // 2 + 512),
                    Step("a.qcow2", size + 3 * 512),
                    Step("--shrink", "a.qcow2", "-%d" % (size // 4))]
    make(cs)

for bits in (1, 16, 64):
    def make(bits):
        @case("refcount/bits%d" % bits, "refcount_bits=%d, 4k clusters: grow, shrink" % bits)
        def _(b):
            b.create("a.qcow2", 2 * M, opts={"cluster_size": 4 * K, "refcount_bits": bits})
            fill(b, "a.qcow2", 4 * K, 2 * M)
            return [Step("a.qcow2", "+%d" % (100 * M)), Step("--shrink", "a.qcow2", M + 4096)]
    make(bits)


@case("features/extl2", "extended L2 (32k clusters): grow, shrink inside a cluster")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 32 * K, "extended_l2": "on"})
    b.io("a.qcow2", "write -P 1 0 5k", "write -P 2 %d 3k" % (3 * M + 1024), "write -z 64k 2k")
    return [Step("a.qcow2", "+8M"), Step("--shrink", "a.qcow2", 3 * M + 2048)]


@case("features/compressed", "compressed clusters cut by a shrink")
def _(b):
    b.raw("src.raw", 4 * M, [(0, L.compressible(b.rng, 4 * M))])
    b.qemu_img("convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=4k", "src.raw",
               "a.qcow2")
    return [Step("--shrink", "a.qcow2", "-1M"), Step("a.qcow2", "+1M")]


@case("features/v2", "compat=0.10: grow and shrink")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"compat": "0.10", "cluster_size": 4 * K})
    fill(b, "a.qcow2", 4 * K, 4 * M)
    return [Step("a.qcow2", "+1G"), Step("--shrink", "a.qcow2", 2 * M)]


@case("features/v2_snapshot", "compat=0.10 with a snapshot: both refuse")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"compat": "0.10"})
    b.io("a.qcow2", "write -P 1 0 64k")
    b.snapshot("a.qcow2", "s1")
    return [Step("a.qcow2", "+1M")]


@case("features/snapshots", "v3 with internal snapshots: grow, shrink; snapshots unchanged")
def _(b):
    b.create("a.qcow2", 8 * M, opts={"cluster_size": 4 * K})
    fill(b, "a.qcow2", 4 * K, 8 * M)
    b.snapshot("a.qcow2", "s1")
    b.io("a.qcow2", "write -P 9 %d 1M" % (6 * M))
    b.snapshot("a.qcow2", "s2")
    b.io("a.qcow2", "write -P 10 %d 8k" % (7 * M))
    return [Step("a.qcow2", "+40M", snapshots=("s1", "s2")),
            Step("--shrink", "a.qcow2", 5 * M + 512, snapshots=("s1", "s2"))]


@case("features/bitmaps", "persistent bitmaps follow the size (their bits: bitmap_oracle_test)")
def _(b):
    b.create("a.qcow2", 4 * M)
    b.qemu_img("bitmap", "--add", "a.qcow2", "b0")
    b.io("a.qcow2", "write -P 3 1M 64k")
    return [Step("a.qcow2", "+1M"), Step("--shrink", "a.qcow2", 3 * M)]


@case("features/data_file", "external data file: grow, shrink (the data file follows)")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 4 * K, "data_file": "a.data"})
    fill(b, "a.qcow2", 4 * K, 4 * M)
    return [Step("a.qcow2", "+4M"), Step("--shrink", "a.qcow2", 3 * M)]


@case("features/data_file_raw", "data_file_raw: growing maps the new area 1:1")
def _(b):
    b.create("a.qcow2", 4 * M, opts={"cluster_size": 64 * K, "data_file": "a.data",
                                     "data_file_raw": "on"})
    b.io("a.qcow2", "write -P 3 0 1M")
    return [Step("a.qcow2", "+2M"), Step("--shrink", "a.qcow2", 2 * M)]


# --------------------------------------------------------------------------
# Backing chains: a longer backing file must not show through the new area.

@case("backing/longer_backing", "chain raw <- qcow2 <- qcow2, the base longer than the top")
def _(b):
    b.raw("base.raw", 16 * M, [(0, b"\x11" * M), (10 * M, b"\x22" * (6 * M))])
    b.create("mid.qcow2", 12 * M, opts={"cluster_size": 4 * K}, backing="base.raw",
             backing_fmt="raw")
    b.io("mid.qcow2", "write -P 0x33 %d 64k" % (4 * M))
    b.create("a.qcow2", 6 * M + 1024, opts={"cluster_size": 64 * K}, backing="mid.qcow2",
             backing_fmt="qcow2")
    b.io("a.qcow2", "write -P 0x44 4096 8k")
    return [Step("a.qcow2", "+8M"), Step("--shrink", "a.qcow2", 3 * M), Step("a.qcow2", "16M")]


@case("backing/extl2_longer", "extended L2 over a longer backing file (subcluster zeroing)")
def _(b):
    b.create("base.qcow2", 8 * M)
    b.io("base.qcow2", "write -P 0x61 0 8M")
    b.create("a.qcow2", 2 * M + 512, opts={"cluster_size": 64 * K, "extended_l2": "on"},
             backing="base.qcow2", backing_fmt="qcow2")
    return [Step("a.qcow2", "+3M")]


@case("backing/shorter_backing", "a backing file shorter than the image: nothing to zero")
def _(b):
    b.create("base.qcow2", M)
    b.io("base.qcow2", "write -P 0x61 0 1M")
    b.create("a.qcow2", 2 * M, backing="base.qcow2", backing_fmt="qcow2")
    return [Step("a.qcow2", "+3M")]


# --------------------------------------------------------------------------
# Preallocation.

for mode in ("metadata", "falloc", "full"):
    def make(mode):
        @case("prealloc/%s" % mode, "--preallocation=%s: grow; the new area reads zeros" % mode)
        def _(b):
            b.create("a.qcow2", 3 * M + 512, opts={"cluster_size": 4 * K})
            fill(b, "a.qcow2", 4 * K, 3 * M)
            # With metadata, QEMU ends the image file at the guest's last byte
            # (mid-cluster); qemu-img map then reports that file's last
            # partial 4 KiB block as data, ours (made the same way) as a hole.
            meta = mode == "metadata"
            return [Step("--preallocation=%s" % mode, "a.qcow2", "+5M",
                         map_upto=4096 if meta else None),
                    Step("--preallocation=%s" % mode, "a.qcow2", "+1M",
                         map_upto=M + 4096 if meta else None)]
    make(mode)


@case("prealloc/with_data_file", "--preallocation=metadata/full with an external data file")
def _(b):
    b.create("a.qcow2", 2 * M, opts={"data_file": "a.data"})
    b.io("a.qcow2", "write -P 1 0 1M")
    return [Step("--preallocation=metadata", "a.qcow2", "+2M"),
            Step("--preallocation=full", "a.qcow2", "+1M")]


# --------------------------------------------------------------------------
# Raw images.

@case("raw/grow_shrink", "a raw image: grow, falloc, full, shrink")
def _(b):
    b.raw("a.img", 3 * M, [(0, b"\x77" * 5000)])
    return [Step("-f", "raw", "a.img", "+1M", image="a.img"),
            Step("--preallocation=falloc", "a.img", "+1M", image="a.img"),
            Step("--preallocation=full", "a.img", "+1M", image="a.img"),
            Step("--shrink", "a.img", "4096", image="a.img"),
            Step("--preallocation=metadata", "a.img", "+1M", image="a.img")]


# --------------------------------------------------------------------------
# Sizes and bad input: the same verdicts, the image unchanged.

@case("sizes/huge", "grow a 64k-cluster image to 15T (an L1 table of 480 KiB), then +0")
def _(b):
    b.create("a.qcow2", 64 * M)
    b.io("a.qcow2", "write -P 1 %d 64k" % (63 * M))
    return [Step("a.qcow2", "15T"), Step("a.qcow2", "+0")]


@case("sizes/long_l1_512", "512 B clusters, 64M to +1G: the new L1 (512 clusters) is longer "
      "than one refcount block's range (256 clusters)")
def _(b):
    b.create("a.qcow2", 64 * M, opts={"cluster_size": 512})
    fill(b, "a.qcow2", 512, 64 * M)
    return [Step("a.qcow2", "+1G", timeout=20), Step("a.qcow2", "+1G", timeout=20)]


@case("sizes/long_l1_4k", "4k clusters, 64M to 3T: the new L1 (3072 clusters) spans two "
      "refcount block ranges (2048 clusters each)")
def _(b):
    b.create("a.qcow2", 64 * M, opts={"cluster_size": 4 * K})
    fill(b, "a.qcow2", 4 * K, 64 * M)
    return [Step("a.qcow2", "3T", timeout=20)]


@case("sizes/bad", "sizes qemu-img refuses: each one, same exit, image unchanged")
def _(b):
    b.create("a.qcow2", 4 * M)
    b.io("a.qcow2", "write -P 1 0 4M")
    return [Step("a.qcow2", "+1000"), Step("a.qcow2", "1M"), Step("a.qcow2", "-1M"),
            Step("--shrink", "a.qcow2", "-4M"), Step("--shrink", "a.qcow2", "-5M"),
            Step("a.qcow2", "0"), Step("a.qcow2", "1E"), Step("a.qcow2", "abc"),
            Step("a.qcow2", "12Q"), Step("--shrink", "--preallocation=full", "a.qcow2", "1M"),
            Step("--preallocation=falloc", "a.qcow2", "+0"),
            Step("missing.qcow2", "1G", image="missing.qcow2"),
            Step("-f", "raw", "a.qcow2", "1G")]


@case("sizes/corrupt", "an image marked corrupt: both refuse to write it")
def _(b):
    b.create("a.qcow2", 4 * M)
    L.hdr_set(b.path("a.qcow2"), "incompatible_features", 2)
    return [Step("a.qcow2", "+1M")]


# --------------------------------------------------------------------------


def snapshot_all(d):
    """Every file of directory d: name -> bytes."""
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if os.path.isfile(p) and not name.startswith("."):
            with open(p, "rb") as f:
                out[name] = f.read()
    return out


def map_flags(cwd, log, image, fmt):
    """qemu-img map's ranges without host offsets, neighbours merged."""
    r = L.run([L.QEMU_IMG, "map", "--output=json", "-f", fmt, image], cwd, log, timeout=TIMEOUT)
    if r.rc != 0:
        raise CaseFailure("qemu-img map %s failed: %s" % (image, r.err[-300:]))
    merged = []
    for e in json.loads(r.out):
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if merged and merged[-1][0] == key and merged[-1][1] + merged[-1][2] == e["start"]:
            merged[-1][2] += e["length"]
        else:
            merged.append([key, e["start"], e["length"]])
    return merged


def clip(ranges, end):
    """The merged map ranges cut at `end`."""
    out = []
    for key, start, length in ranges:
        if start < end:
            out.append([key, start, min(length, end - start)])
    return out


def image_format(path):
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def guest_view(cwd, log, image, fmt, out, snapshot=None):
    argv = [L.QEMU_IMG, "convert", "-f", fmt, "-O", "raw"]
    if snapshot:
        argv += ["-l", "snapshot.name=%s" % snapshot]
    r = L.run(argv + [image, out], cwd, log, timeout=TIMEOUT)
    if r.rc != 0:
        raise CaseFailure("qemu-img convert %s failed: %s" % (image, r.err[-300:]))


def run_step(binary, workdir, log, qdir, odir, step):
    what = "resize %s" % " ".join(step.args)
    before = snapshot_all(odir)
    q = L.run([L.QEMU_IMG, "resize"] + step.args, qdir, log, timeout=TIMEOUT)
    o = L.run([binary, "resize"] + step.args, odir, log, timeout=step.timeout)
    if step.ours_refuses:
        if q.rc != 0:
            raise CaseFailure("%s: expected qemu-img to succeed: %s" % (what, q.err[-300:]))
        q_rc = 1
    else:
        q_rc = q.rc
    if o.rc != q_rc:
        raise CaseFailure("%s: exit %s, qemu-img exit %d\nours: %r\nqemu: %r" % (
            what, o.describe(), q.rc, o.err[-400:], q.err[-400:]))
    if o.rc != 0:
        lines = o.err.splitlines()
        if o.rc == 1 and (len(lines) != 1 or not lines[0].startswith("ublk-qcow2: ")):
            raise CaseFailure("%s: stderr is not one line 'ublk-qcow2: ...': %r" % (what, o.err))
        if o.rc == 1 and step.image not in lines[0] and "size" not in lines[0]:
            raise CaseFailure("%s: the error names neither the image nor the size: %r"
                              % (what, o.err))
        if snapshot_all(odir) != before:
            raise CaseFailure("%s: failed, but changed the files" % what)
        return "%s: both refuse" % what if not step.ours_refuses else "%s: ours refuses" % what
    if o.out != q.out:
        raise CaseFailure("%s: stdout %r, qemu-img %r" % (what, o.out, q.out))
    fmt = image_format(os.path.join(odir, step.image))
    if fmt == "qcow2":
        c = L.run([L.QEMU_IMG, "check", step.image], odir, log, timeout=TIMEOUT)
        if c.rc != 0:
            raise CaseFailure("%s: qemu-img check exit %d:\n%s" % (what, c.rc, c.out[-1500:]))
    qsize = os.path.getsize(os.path.join(qdir, step.image)) if fmt == "raw" else None
    osize = os.path.getsize(os.path.join(odir, step.image)) if fmt == "raw" else None
    if qsize != osize:
        raise CaseFailure("%s: raw file size %d, qemu-img's %d" % (what, osize, qsize))
    guest_view(qdir, log, step.image, fmt, os.path.join(workdir, "q.raw"))
    guest_view(odir, log, step.image, fmt, os.path.join(workdir, "o.raw"))
    L.compare_raw(os.path.join(workdir, "q.raw"), os.path.join(workdir, "o.raw"))
    for s in step.snapshots:
        guest_view(qdir, log, step.image, fmt, os.path.join(workdir, "q.raw"), s)
        guest_view(odir, log, step.image, fmt, os.path.join(workdir, "o.raw"), s)
        L.compare_raw(os.path.join(workdir, "q.raw"), os.path.join(workdir, "o.raw"))
    if fmt == "raw":
        # qemu-img map on a raw file reports the host file system's extents
        # (fallocated, written, in the page cache), not anything we chose.
        return "%s: ok" % what
    qm, om = map_flags(qdir, log, step.image, fmt), map_flags(odir, log, step.image, fmt)
    if step.map_upto is not None:
        end = sum(e[2] for e in qm) - step.map_upto
        qm, om = clip(qm, end), clip(om, end)
    if qm != om:
        raise CaseFailure("%s: map flags differ\nqemu-img %s\nours     %s" % (what, qm[:20],
                                                                             om[:20]))
    return "%s: ok" % what


def run_case(c, workdir, log, binary):
    # Twin trees built by the same seeded steps (a copy could turn runs of
    # zeros into holes, which map would then report).
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
    sys.exit(L.run_suite("resize_oracle", CASES, sys.argv[1:], run_case))
