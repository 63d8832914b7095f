#!/usr/bin/python3
"""`ublk-qcow2 rebase` against `qemu-img rebase` (QEMU 7.2) on twin images.

Each case builds a backing chain with qemu-img/qemu-io under src/, copies it
to q/ and o/ (twin_lib.py), runs `qemu-img rebase ARGS IMAGE` in q/ and
`ublk-qcow2 rebase ARGS IMAGE` in o/, and requires:

  * the same exit status; a refused rebase of ours prints one line
    `ublk-qcow2: ...` and changes no file;
  * after a rebase: our overlay's guest view (`qemu-img convert -O raw`, every
    byte) equals qemu-img's twin's, and, in safe mode, the view before the
    rebase; the same backing file name and format (`qemu-img info`); the same
    allocation (`qemu-img map` without host offsets: the same ranges copied
    in, as data or zeros, as QEMU copies); `qemu-img check` clean.

Usage: rebase_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
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
    """Rebase `image` with `args`; `safe`: the guest view must not change."""

    def __init__(self, image, args, safe=True, snapshots=()):
        self.image = image
        self.args = list(args)
        self.safe = safe
        # Internal snapshots of `image`: each one's view (read through the
        # backing file the header names after the rebase) must be the twin's.
        self.snapshots = list(snapshots)


case = L.case_registry(CASES)


def two_bases(b, cs, size, opts=None):
    """old.qcow2 and new.qcow2 that agree in places and differ in others
    (whole clusters, single sectors, zeros against data), and top.qcow2 over
    old.qcow2 with some clusters of its own."""
    o = dict(opts or {}, cluster_size=cs)
    b.create("old.qcow2", size, opts=o)
    b.io("old.qcow2", ("noise", 0, 4 * cs), "write -P 0x11 %d %d" % (8 * cs, 4 * cs),
         "write -z %d %d" % (12 * cs, cs), "write -P 0x12 %d 512" % (16 * cs + 1024))
    b.create("new.qcow2", size, opts=o)
    b.io("new.qcow2", "write -P 0x11 %d %d" % (8 * cs, 2 * cs),    # half the same
         "write -P 0x21 %d %d" % (12 * cs, cs),                     # data over zeros
         "write -P 0x22 %d %d" % (20 * cs, 2 * cs))                 # data over nothing
    b.create("top.qcow2", size, opts=o, backing="old.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 0x31 %d %d" % (cs, cs), "write -z %d %d" % (9 * cs, cs),
         "write -P 0x32 %d 512" % (20 * cs + 512))


for cs in (512, 4 * K, 64 * K, 2 * M):
    def make(cs):
        @case("clusters/cs%d" % cs, "cluster_size=%d: safe rebase onto a qcow2 that differs "
              "in whole clusters, single sectors, zeros" % cs)
        def _(b):
            two_bases(b, cs, max(8 * M, 32 * cs))
            return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"])
    make(cs)


@case("features/extl2", "extended L2 overlay and bases: partial subclusters copied in")
def _(b):
    two_bases(b, 64 * K, 8 * M, opts={"extended_l2": "on"})
    b.io("top.qcow2", "write -P 0x41 %d 2k" % (16 * 64 * K))
    return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"])


@case("features/extl2_16k", "extended L2 with 16 KiB clusters (512-byte subclusters)")
def _(b):
    two_bases(b, 16 * K, 4 * M, opts={"extended_l2": "on"})
    return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"])


@case("features/compressed", "compressed clusters in the old base and in the overlay")
def _(b):
    b.create("old.qcow2", 8 * M)
    b.io("old.qcow2", "write -c -P 1 0 64k", "write -c -P 2 64k 64k", "write -P 3 1M 128k")
    b.create("new.qcow2", 8 * M)
    b.io("new.qcow2", "write -c -P 1 0 64k", "write -P 4 1M 64k")
    b.create("top.qcow2", 8 * M, backing="old.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -c -P 5 2M 64k")
    return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"])


@case("features/v2", "compat=0.10 overlay (no zero flag): zeros are written as data")
def _(b):
    b.create("old.raw", 4 * M, fmt="raw")
    b.io("old.raw", "write -P 1 0 1M", fmt="raw")
    b.create("new.qcow2", 8 * M)
    b.io("new.qcow2", "write -P 2 512k 1M", "write -P 3 5M 64k")
    b.create("top.qcow2", 8 * M, opts={"compat": "0.10"}, backing="old.raw", backing_fmt="raw")
    b.io("top.qcow2", "write -P 4 64k 4k")
    return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"])


@case("features/zero_clusters", "zero clusters in the overlay hide differences; zero "
      "clusters in the old base against data in the new")
def _(b):
    b.create("old.qcow2", 4 * M)
    b.io("old.qcow2", "write -P 1 0 4M", "write -z 1M 1M")
    b.create("new.raw", 4 * M, fmt="raw")
    b.io("new.raw", "write -P 2 0 4M", fmt="raw")
    b.create("top.qcow2", 4 * M, backing="old.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -z 0 512k", "write -z -u 3M 64k")
    return Spec("top.qcow2", ["-b", "new.raw", "-F", "raw"])


for bits in (1, 64):
    def make(bits):
        @case("refcounts/r%d" % bits, "refcount_bits=%d overlay and bases: safe rebase" % bits)
        def _(b):
            two_bases(b, 4 * K, 4 * M, opts={"refcount_bits": bits})
            return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"])
    make(bits)


def snapshotted_top(b):
    """two_bases, then two internal snapshots of top.qcow2 with writes
    between them and after (the snapshots share clusters with the active
    layer and map clusters it no longer does)."""
    two_bases(b, 64 * K, 4 * M)
    b.snapshot("top.qcow2", "s1")
    b.io("top.qcow2", "write -P 0x51 %d %d" % (64 * K, 64 * K), "write -z %d %d" % (20 * 64 * K,
                                                                                  64 * K))
    b.snapshot("top.qcow2", "s2")
    b.io("top.qcow2", "write -P 0x52 %d %d" % (2 * 64 * K, 2 * 64 * K),
         "discard %d %d" % (64 * K, 64 * K))
    return ["s1", "s2"]


@case("snapshots/safe", "an overlay with two internal snapshots, safe rebase: the active "
      "layer keeps its view; each snapshot reads as qemu-img's twin's")
def _(b):
    snaps = snapshotted_top(b)
    return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"], snapshots=snaps)


@case("snapshots/unsafe", "an overlay with two internal snapshots, -u: only the header "
      "changes; each snapshot reads as qemu-img's twin's")
def _(b):
    snaps = snapshotted_top(b)
    return Spec("top.qcow2", ["-u", "-b", "new.qcow2", "-F", "qcow2"], safe=False,
                snapshots=snaps)


@case("snapshots/remove", "an overlay with two internal snapshots, -b \"\": the old "
      "backing file's data copied into the active layer only")
def _(b):
    snaps = snapshotted_top(b)
    return Spec("top.qcow2", ["-b", ""], snapshots=snaps)


@case("chain/depth3_onto_raw_base", "raw base, qcow2 mid, qcow2 top: rebase top onto the "
      "raw base below its backing file (mid's data copied up)")
def _(b):
    b.raw("base.raw", 8 * M, [(0, b"\x01" * (64 * K)), (1 * M, b"\x02" * 4096),
                              (5 * M + 512, b"\x03" * 100)])
    b.create("mid.qcow2", 8 * M, backing="base.raw", backing_fmt="raw")
    b.io("mid.qcow2", "write -P 3 512k 64k", "write -z 1M 64k", "write -P 4 6M 100k")
    b.create("top.qcow2", 8 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 5 0 4k", "write -P 6 6M 32k")
    return Spec("top.qcow2", ["-b", "base.raw", "-F", "raw"])


@case("chain/depth3_onto_other", "qcow2 base, mid and top: rebase the top onto an unrelated "
      "qcow2 with a 4 KiB cluster size")
def _(b):
    b.create("base.qcow2", 8 * M)
    b.io("base.qcow2", ("noise", 0, 3 * M))
    b.create("mid.qcow2", 8 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("mid.qcow2", ("noise", 2 * M, 2 * M))
    b.create("top.qcow2", 8 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 7 1M 1M")
    b.create("other.qcow2", 8 * M, opts={"cluster_size": 4 * K})
    b.io("other.qcow2", ("noise", 0, 64 * K), "write -P 9 4M 1M")
    return Spec("top.qcow2", ["-b", "other.qcow2", "-F", "qcow2"])


@case("sizes/short_old_backing", "old backing shorter than the overlay: zeros past its end "
      "written as zeros where the new backing has data")
def _(b):
    b.create("old.qcow2", 2 * M)
    b.io("old.qcow2", "write -P 1 0 2M")
    b.create("new.raw", 8 * M, fmt="raw")
    b.io("new.raw", "write -P 2 1M 6M", fmt="raw")
    b.create("top.qcow2", 8 * M, backing="old.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 3 5M 64k")
    return Spec("top.qcow2", ["-b", "new.raw", "-F", "raw"])


@case("sizes/short_new_backing", "new backing shorter than the overlay, ending inside a "
      "cluster")
def _(b):
    b.create("old.qcow2", 8 * M)
    b.io("old.qcow2", "write -P 1 0 8M")
    b.raw("new.raw", 3 * M + 1536, [(0, b"\x01" * (1 * M))])
    b.create("top.qcow2", 8 * M, backing="old.qcow2", backing_fmt="qcow2")
    return Spec("top.qcow2", ["-b", "new.raw", "-F", "raw"])


@case("sizes/unaligned_past_old_end", "past the old backing file's end, the new one has "
      "data inside clusters: QEMU zeroes whole clusters (the rest reads as zeros already)")
def _(b):
    b.create("old.qcow2", 1 * M)
    b.io("old.qcow2", "write -P 1 0 1M")
    b.raw("new.raw", 4 * M, [(2 * M + 1024, b"\x07" * 1024), (3 * M + 64 * K - 512, b"\x08" * 1024)])
    b.create("top.qcow2", 4 * M, backing="old.qcow2", backing_fmt="qcow2")
    return Spec("top.qcow2", ["-b", "new.raw", "-F", "raw"])


@case("sizes/unaligned_extl2", "as above on an extended L2 overlay: zeroed subclusters")
def _(b):
    b.create("old.qcow2", 1 * M)
    b.io("old.qcow2", "write -P 1 0 1M")
    b.raw("new.raw", 4 * M, [(2 * M + 1024, b"\x07" * 3000), (3 * M + 64 * K - 512, b"\x08" * 1024)])
    b.create("top.qcow2", 4 * M, opts={"extended_l2": "on"}, backing="old.qcow2",
             backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 2 %d 2k" % (3 * M))
    return Spec("top.qcow2", ["-b", "new.raw", "-F", "raw"])


@case("remove/safe", "-b \"\": everything the depth-3 chain provided copied in")
def _(b):
    b.raw("base.raw", 4 * M, [(0, b"\x05" * (256 * K)), (3 * M, b"\x06" * 512)])
    b.create("mid.qcow2", 4 * M, backing="base.raw", backing_fmt="raw")
    b.io("mid.qcow2", "write -P 7 1M 1M", "write -z 0 64k")
    b.create("top.qcow2", 4 * M, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 8 1536k 64k")
    return Spec("top.qcow2", ["-b", ""])


@case("remove/unsafe", "-u -b \"\": only the header changes")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-u", "-b", ""], safe=False)


@case("unsafe/other", "-u -b new.qcow2 -F qcow2: the header names the new file, nothing copied")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-u", "-b", "new.qcow2", "-F", "qcow2"], safe=False)


@case("unsafe/moved", "-u: the old backing file was moved away (cannot be opened); the "
      "header is fixed to its new place")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    b.mkdir("moved")
    os.rename(b.path("old.qcow2"), b.path("moved/old.qcow2"))
    return Spec("top.qcow2", ["-u", "-b", "moved/old.qcow2", "-F", "qcow2"], safe=False)


@case("unsafe/no_b", "-u without -b removes the backing file name, as qemu-img does")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-u"], safe=False)


@case("paths/relative", "overlay in a subdirectory: -b is relative to the overlay's directory")
def _(b):
    b.mkdir("sub")
    b.create("sub/old.qcow2", 4 * M)
    b.io("sub/old.qcow2", "write -P 1 0 1M")
    b.create("sub/new.raw", 4 * M, fmt="raw")
    b.create("sub/top.qcow2", 4 * M, backing="old.qcow2", backing_fmt="qcow2")
    return Spec("sub/top.qcow2", ["-b", "new.raw", "-F", "raw"])


@case("paths/progress", "-p: the same result (progress lines on stdout)")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-p", "-b", "new.qcow2", "-F", "qcow2"])


# --------------------------------------------------------------------------
# Refused


@case("errors/missing_new_backing", "the new backing file does not exist (safe mode)")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-b", "nothere.qcow2", "-F", "qcow2"])


@case("errors/no_backing_format", "-b without -F: 'backing format must be specified' "
      "(qemu-img copies first; ours refuses before writing)")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-b", "new.qcow2"])


@case("errors/no_b_safe", "neither -b nor -u")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", [])


@case("errors/bad_format", "-F with a format name that does not exist")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "nosuchfmt"])


@case("errors/wrong_format", "-F vmdk for a qcow2 file (qemu-img cannot open it as vmdk; ours knows qcow2 and raw only)")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-b", "new.qcow2", "-F", "vmdk"])


@case("errors/raw_image", "rebasing a raw image: Operation not supported")
def _(b):
    b.create("new.raw", 1 * M, fmt="raw")
    b.create("r.raw", 1 * M, fmt="raw")
    return Spec("r.raw", ["-f", "raw", "-u", "-b", "new.raw", "-F", "raw"])


@case("errors/name_too_long", "a backing file name of 1024 bytes: Invalid argument")
def _(b):
    two_bases(b, 64 * K, 4 * M)
    return Spec("top.qcow2", ["-u", "-b", "a" * 1024, "-F", "raw"])


# 512-byte clusters: the 112-byte header, the backing format extension (16)
# and the end marker (8) leave 376 bytes for the name.
LONG_NAME = "/".join(["x"] * 187) + "/ab"


@case("errors/header_full", "512-byte clusters: a 377-byte name does not fit beside the "
      "header")
def _(b):
    b.create("top.qcow2", 1 * M, opts={"cluster_size": 512})
    return Spec("top.qcow2", ["-u", "-b", LONG_NAME + "c", "-F", "raw"])


@case("unsafe/header_exact", "512-byte clusters: a 376-byte name fills the header cluster "
      "exactly")
def _(b):
    b.create("top.qcow2", 1 * M, opts={"cluster_size": 512})
    b.mkdir(os.path.dirname(LONG_NAME))
    b.create(LONG_NAME, 1 * M, fmt="raw")
    b.io(LONG_NAME, "write -P 1 0 4k", fmt="raw")
    assert len(LONG_NAME) == 376
    return Spec("top.qcow2", ["-u", "-b", LONG_NAME, "-F", "raw"], safe=False)


@case("errors/data_file_raw", "an image with a raw external data file cannot get a backing "
      "file")
def _(b):
    b.create("top.qcow2", 1 * M, opts={"data_file": "top.data", "data_file_raw": "on"})
    b.create("new.raw", 1 * M, fmt="raw")
    return Spec("top.qcow2", ["-u", "-b", "new.raw", "-F", "raw"])


# --------------------------------------------------------------------------


def run_case(c, workdir, log, binary):
    seed = sum(map(ord, c.name))
    t = TW.Twins(L.Builder(workdir, log, seed), binary)
    spec = c.fn(L.Builder(t.src, log, seed))
    t.copy()
    fmt = "raw" if spec.image.endswith(".raw") else None
    before = t.view(t.o, spec.image, fmt) if spec.safe and fmt is None else None
    q, _ = t.run_both("rebase", spec.args + [spec.image])
    if q.rc != 0:
        return "both refused (exit %d)" % q.rc
    if t.backing(t.o, spec.image) != t.backing(t.q, spec.image):
        raise CaseFailure("backing file/format: ours %r, qemu-img's %r"
                          % (t.backing(t.o, spec.image), t.backing(t.q, spec.image)))
    ours = t.view(t.o, spec.image)
    t.same_view("guest view, ours against qemu-img's twin", t.view(t.q, spec.image), ours)
    if before is not None:
        t.same_view("guest view, ours against before the rebase", before, ours)
    a_q, a_o = t.alloc(t.q, spec.image), t.alloc(t.o, spec.image)
    if a_q != a_o:
        raise CaseFailure("allocation differs:\n  qemu-img %s\n  ours     %s" % (a_q, a_o))
    for name in spec.snapshots:
        views = []
        for d in (t.q, t.o):
            out = os.path.join(t.views, "snap-%s-%s.raw" % (os.path.basename(d), name))
            L.must([L.QEMU_IMG, "convert", "-l", "snapshot.name=%s" % name, "-O", "raw",
                    spec.image, out], d, t.log, timeout=TW.TIMEOUT)
            views.append(out)
        t.same_view("snapshot %s, ours against qemu-img's twin" % name, views[0], views[1])
    t.check_clean(t.o, spec.image)
    return "rebased like qemu-img" + (" (%d snapshot views equal)" % len(spec.snapshots)
                                      if spec.snapshots else "")


if __name__ == "__main__":
    sys.exit(L.run_suite("rebase_oracle", CASES, sys.argv[1:], run_case))
