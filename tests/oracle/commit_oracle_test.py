#!/usr/bin/python3
"""`ublk-qcow2 commit` against `qemu-img commit` (QEMU 7.2) on twin images.

Each case builds a backing chain with qemu-img/qemu-io under src/, copies it
to q/ and o/ (twin_lib.py), runs `qemu-img commit ARGS IMAGE` in q/ and
`ublk-qcow2 commit ARGS IMAGE` in o/, and requires:

  * the same exit status and stdout ("Image committed."); a refused commit
    of ours prints one line `ublk-qcow2: ...` and changes no file;
  * after a commit: the base's guest view (`qemu-img convert -O raw`, every
    byte) equals qemu-img's twin's and, where the sizes agree, the overlay's
    view before the commit; every other image of the chain reads as its twin
    does; the overlay's own allocation (`qemu-img map` without host offsets,
    depth 0) is its twin's (emptied, or kept with -d / -b); `qemu-img check` is clean on
    every qcow2 image of ours.

The base's allocation is not compared (nor what the overlay's map shows of
it, below depth 0): QEMU's commit job copies whole dirty granules, ours the
exact ranges the layers above decide.

Usage: commit_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
"""

import os
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
import twin_lib as TW  # noqa: E402
from oracle_lib import CaseFailure  # noqa: E402

K = 1 << 10
M = 1 << 20

CASES = []


class Spec:
    """Commit `image` with `args`; `base` receives the data; `others` are
    the rest of the chain ((path, format) pairs, format None for qcow2)."""

    def __init__(self, image, args, base=None, others=()):
        self.image = image
        self.args = list(args)
        self.base = base
        self.others = list(others)


case = L.case_registry(CASES)


def over_base(b, cs, size, base_fmt="qcow2", base_opts=None, top_opts=None):
    """base (with data everywhere it matters) and top.qcow2 over it with data,
    zeros over the base's data, a discard, partial clusters."""
    base = "base." + base_fmt
    b.create(base, size, fmt=base_fmt, opts=base_opts)
    b.io(base, ("noise", 0, 6 * cs), "write -P 0x11 %d %d" % (8 * cs, 8 * cs), fmt=base_fmt)
    b.create("top.qcow2", size, opts=dict(top_opts or {}, cluster_size=cs), backing=base,
             backing_fmt=base_fmt)
    b.io("top.qcow2", "write -P 0x21 %d %d" % (cs, 2 * cs), "write -z %d %d" % (4 * cs, cs),
         "write -P 0x22 %d 512" % (9 * cs + 1024), "write -z %d %d" % (10 * cs, 2 * cs),
         "discard %d %d" % (12 * cs, cs), "write -P 0x23 %d %d" % (20 * cs, cs))
    return base


for cs in (512, 4 * K, 64 * K, 2 * M):
    def make(cs):
        @case("clusters/cs%d" % cs, "cluster_size=%d overlay over a qcow2 base: data, zeros "
              "over data, a discard, partial clusters" % cs)
        def _(b):
            base = over_base(b, cs, max(8 * M, 32 * cs))
            return Spec("top.qcow2", [], base=(base, None))
    make(cs)


@case("features/extl2", "extended L2 overlay (partial subclusters, zero subclusters)")
def _(b):
    base = over_base(b, 64 * K, 8 * M, top_opts={"extended_l2": "on"})
    b.io("top.qcow2", "write -P 0x31 %d 2k" % (30 * 64 * K), "write -z %d 4k" % (31 * 64 * K))
    return Spec("top.qcow2", [], base=(base, None))


@case("features/compressed", "compressed clusters in the overlay and in the base")
def _(b):
    b.create("base.qcow2", 8 * M)
    b.io("base.qcow2", "write -c -P 1 0 64k", "write -c -P 2 64k 64k", "write -P 3 1M 1M")
    b.create("top.qcow2", 8 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -c -P 4 64k 64k", "write -c -P 5 1M 64k", "write -P 6 3M 64k")
    return Spec("top.qcow2", [], base=("base.qcow2", None))


@case("features/raw_base", "a raw base: data written in place, zeros as holes or zeros")
def _(b):
    base = over_base(b, 64 * K, 8 * M, base_fmt="raw")
    return Spec("top.qcow2", [], base=(base, "raw"))


@case("features/v2_base", "a compat=0.10 base (no zero flag: zeros written as data)")
def _(b):
    base = over_base(b, 64 * K, 8 * M, base_opts={"compat": "0.10"})
    return Spec("top.qcow2", [], base=(base, None))


@case("features/snapshot_top", "an overlay with an internal snapshot: the active clusters "
      "are dropped, the snapshot's stay")
def _(b):
    base = over_base(b, 64 * K, 8 * M)
    b.snapshot("top.qcow2", "s1")
    b.io("top.qcow2", "write -P 0x41 0 64k")
    return Spec("top.qcow2", [], base=(base, None))


for bits in (1, 64):
    def make(bits):
        @case("refcounts/r%d" % bits, "refcount_bits=%d in the overlay and in the base" % bits)
        def _(b):
            opts = {"refcount_bits": bits}
            base = over_base(b, 4 * K, 8 * M, base_opts=opts, top_opts=opts)
            return Spec("top.qcow2", [], base=(base, None))
    make(bits)


@case("datafile/overlay", "an overlay with an external data file (data_file=top.data) over a "
      "qcow2 base")
def _(b):
    base = over_base(b, 64 * K, 8 * M, top_opts={"data_file": "top.data"})
    return Spec("top.qcow2", [], base=(base, None))


@case("datafile/overlay_d", "-d: an overlay with an external data file keeps its clusters")
def _(b):
    base = over_base(b, 64 * K, 8 * M, top_opts={"data_file": "top.data"})
    return Spec("top.qcow2", ["-d"], base=(base, None))


@case("datafile/base", "a base with an external data file (data_file=base.data)")
def _(b):
    base = over_base(b, 64 * K, 8 * M, base_opts={"data_file": "base.data"})
    return Spec("top.qcow2", [], base=(base, None))


@case("datafile/base_raw", "a base with a raw external data file (data_file_raw=on): zeros "
      "written into the data file too")
def _(b):
    base = over_base(b, 64 * K, 8 * M, base_opts={"data_file": "base.data",
                                                   "data_file_raw": "on"})
    return Spec("top.qcow2", [], base=(base, None))


@case("datafile/both", "overlay and base each with an external data file, -b BASE")
def _(b):
    base = over_base(b, 4 * K, 8 * M, base_opts={"data_file": "base.data"},
                     top_opts={"data_file": "top.data"})
    return Spec("top.qcow2", ["-b", base], base=(base, None))


@case("keep/d", "-d: the overlay keeps its clusters")
def _(b):
    base = over_base(b, 64 * K, 8 * M)
    return Spec("top.qcow2", ["-d"], base=(base, None))


@case("keep/progress", "-p: the same result")
def _(b):
    base = over_base(b, 64 * K, 8 * M)
    return Spec("top.qcow2", ["-p"], base=(base, None))


def depth3(b):
    """base.raw (8 MiB) <- mid.qcow2 (4 MiB, shorter) <- top.qcow2 (8 MiB)."""
    b.raw("base.raw", 8 * M, [(0, b"\x01" * (2 * M)), (5 * M, b"\x02" * M)])
    b.create("mid.qcow2", 4 * M, backing="base.raw", backing_fmt="raw")
    b.io("mid.qcow2", "write -P 3 512k 64k", "write -z 1M 64k", ("noise", 3 * M, 128 * K))
    b.create("top.qcow2", 8 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 5 0 4k", "write -P 6 3M 32k", "write -P 7 7M 64k")


@case("chain/b_base", "depth 3, -b base.raw: the short mid's data and the zeros past its "
      "end go into the raw base; the overlay is kept (-b implies -d)")
def _(b):
    depth3(b)
    return Spec("top.qcow2", ["-b", "base.raw"], base=("base.raw", "raw"),
                others=[("mid.qcow2", None)])


@case("chain/b_immediate", "-b naming the immediate backing file (still implies -d)")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.io("base.qcow2", "write -P 1 0 2M")
    b.create("mid.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("mid.qcow2", "write -P 2 1M 1M")
    b.create("top.qcow2", 4 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 3 1536k 1M")
    return Spec("top.qcow2", ["-b", "mid.qcow2"], base=("mid.qcow2", None),
                others=[("base.qcow2", None)])


@case("chain/default_depth3", "depth 3 without -b: into the mid, the raw base untouched")
def _(b):
    b.raw("base.raw", 4 * M, [(0, b"\x01" * (2 * M))])
    b.create("mid.qcow2", 4 * M, opts={"cluster_size": 4 * K}, backing="base.raw",
             backing_fmt="raw")
    b.io("mid.qcow2", "write -P 3 512k 64k")
    b.create("top.qcow2", 4 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 5 0 4k", "write -z 1M 1M", "write -P 6 3M 32k")
    return Spec("top.qcow2", [], base=("mid.qcow2", None), others=[("base.raw", "raw")])


def sub_chain(b):
    """sub/base.qcow2 <- sub/mid.qcow2 (names "base.qcow2") <- top.qcow2."""
    b.mkdir("sub")
    b.create("sub/base.qcow2", 4 * M)
    b.io("sub/base.qcow2", "write -P 1 0 1M")
    b.create("sub/mid.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("sub/mid.qcow2", "write -P 2 512k 1M")
    b.create("top.qcow2", 4 * M, backing="sub/mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 3 0 64k")


@case("chain/b_relative", "-b base.qcow2 in a subdirectory chain: QEMU takes the name "
      "relative to the directory of the image whose backing file it is compared with")
def _(b):
    sub_chain(b)
    return Spec("top.qcow2", ["-b", "base.qcow2"], base=("sub/base.qcow2", None),
                others=[("sub/mid.qcow2", None)])


@case("errors/b_relative_to_cwd", "-b sub/base.qcow2: right from the working directory, "
      "but QEMU resolves it against sub/ (sub/sub/base.qcow2): not found")
def _(b):
    sub_chain(b)
    return Spec("top.qcow2", ["-b", "sub/base.qcow2"])


@case("sizes/short_raw_base", "a raw base shorter than the overlay grows to its size")
def _(b):
    b.raw("base.raw", 2 * M, [(0, b"\x01" * (2 * M))])
    b.create("top.qcow2", 6 * M, backing="base.raw", backing_fmt="raw")
    b.io("top.qcow2", "write -P 2 1M 2M", "write -P 3 5M 64k")
    return Spec("top.qcow2", [], base=("base.raw", "raw"))


@case("sizes/short_qcow2_base", "a qcow2 base shorter than the overlay is resized to its size")
def _(b):
    b.create("base.qcow2", 2 * M)
    b.io("base.qcow2", "write -P 1 0 2M")
    b.create("top.qcow2", 6 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 2 1M 2M", "write -P 3 5M 64k", "write -z 4M 64k")
    return Spec("top.qcow2", [], base=("base.qcow2", None))


@case("sizes/short_qcow2_mid", "-b base: a short qcow2 base over a longer raw file grows, "
      "zeroing what the raw file would show past its old end")
def _(b):
    b.raw("under.raw", 8 * M, [(0, b"\x07" * (8 * M))])
    b.create("base.qcow2", 3 * M, backing="under.raw", backing_fmt="raw")
    b.io("base.qcow2", "write -P 1 0 1M")
    b.create("top.qcow2", 6 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 2 2M 2M")
    return Spec("top.qcow2", [], base=("base.qcow2", None))


@case("sizes/shorter_top", "an overlay shorter than its base: the base keeps its size")
def _(b):
    b.create("base.qcow2", 8 * M)
    b.io("base.qcow2", "write -P 1 0 8M")
    b.create("top.qcow2", 3 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 2 1M 64k", "write -z 2M 64k")
    return Spec("top.qcow2", [], base=("base.qcow2", None))


# --------------------------------------------------------------------------
# Refused


@case("errors/no_backing", "an image without a backing file")
def _(b):
    b.create("solo.qcow2", 1 * M)
    b.io("solo.qcow2", "write -P 1 0 64k")
    return Spec("solo.qcow2", [])


@case("errors/raw_image", "a raw image has no backing file")
def _(b):
    b.create("r.raw", 1 * M, fmt="raw")
    return Spec("r.raw", ["-f", "raw"])


@case("errors/base_not_in_chain", "-b naming a file that is not in the chain")
def _(b):
    depth3(b)
    b.create("other.qcow2", 1 * M)
    return Spec("top.qcow2", ["-b", "other.qcow2"])


@case("errors/base_is_top", "-b naming the image itself")
def _(b):
    depth3(b)
    return Spec("top.qcow2", ["-b", "top.qcow2"])


@case("errors/missing_backing", "the backing file does not exist")
def _(b):
    over_base(b, 64 * K, 4 * M)
    os.unlink(b.path("base.qcow2"))
    return Spec("top.qcow2", [])


@case("errors/missing_image", "the image does not exist")
def _(b):
    return Spec("nothere.qcow2", [])


# --------------------------------------------------------------------------


def fmt_of(path):
    return "raw" if path.endswith(".raw") else None


def run_case(c, workdir, log, binary):
    seed = sum(map(ord, c.name))
    t = TW.Twins(L.Builder(workdir, log, seed), binary)
    spec = c.fn(L.Builder(t.src, log, seed))
    t.copy()
    before = None
    if os.path.exists(os.path.join(t.o, spec.image)) and spec.base is not None:
        before = t.view(t.o, spec.image, fmt_of(spec.image))
    q, o = t.run_both("commit", spec.args + [spec.image])
    if q.rc != 0:
        return "both refused (exit %d)" % q.rc
    if "-p" not in spec.args and o.out != q.out:
        raise CaseFailure("stdout: ours %r, qemu-img's %r" % (o.out, q.out))
    base, base_fmt = spec.base
    ours = t.view(t.o, base, base_fmt)
    t.same_view("base %s, ours against qemu-img's twin" % base, t.view(t.q, base, base_fmt), ours)
    if os.path.getsize(ours) == os.path.getsize(before):
        t.same_view("base %s against the overlay before the commit" % base, before, ours)
    for path, fmt in [(spec.image, None)] + spec.others:
        t.same_view("%s, ours against qemu-img's twin" % path, t.view(t.q, path, fmt),
                    t.view(t.o, path, fmt))
    a_q, a_o = t.alloc(t.q, spec.image, own=True), t.alloc(t.o, spec.image, own=True)
    if a_q != a_o:
        raise CaseFailure("overlay allocation differs:\n  qemu-img %s\n  ours     %s"
                          % (a_q, a_o))
    for path, fmt in [(spec.image, None), spec.base] + spec.others:
        if fmt is None:
            t.check_clean(t.o, path)
    return "committed like qemu-img"


if __name__ == "__main__":
    sys.exit(L.run_suite("commit_oracle", CASES, sys.argv[1:], run_case))
