#!/usr/bin/python3
"""`ublk-qcow2 snapshot` against `qemu-img snapshot` (QEMU 7.2) on twin images.

Each case builds an image (and its backing file) under src/, copies it to
q/ and o/, then runs steps on both copies: qemu-io writes (the same on each),
and snapshot commands, qemu-img's in q/, ours in o/, with the same
arguments. After each snapshot step (twin_lib's rules for exit statuses,
stderr and refusals that change nothing), and at the end:

  * `qemu-img check` finds nothing wrong with either copy;
  * `qemu-img snapshot -l` lists the same snapshots (id, tag, vm size, vm
    clock, icount; the dates differ) on both, and our `snapshot -l` prints
    exactly what `qemu-img snapshot -l` prints, on our image and on
    qemu-img's;
  * the guest view of the active layer and of every snapshot
    (`qemu-img convert -l snapshot.id=ID -O raw`) is equal byte for byte,
    and so are the virtual sizes.

A step may expect a documented divergence (ours refuses what qemu-img does);
ours must then fail cleanly.

Usage: snapshot_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
"""

import json
import os
import re
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
import twin_lib as TW  # noqa: E402
from oracle_lib import CaseFailure  # noqa: E402

K = 1 << 10
M = 1 << 20

CASES = []
case = L.case_registry(CASES)


class Snap:
    """`snapshot ARGS a.qcow2` on both copies."""

    def __init__(self, *args, image="a.qcow2", ours_refuses=False):
        self.args = [str(a) for a in args] + ([image] if image else [])
        self.image = image or "a.qcow2"
        self.ours_refuses = ours_refuses


class Io:
    """qemu-io commands on both copies (the same bytes: noise is made once)."""

    def __init__(self, *cmds, image="a.qcow2"):
        self.cmds = cmds
        self.image = image


class Img:
    """Another qemu-img command on both copies (resize, say)."""

    def __init__(self, *args):
        self.args = [str(a) for a in args]


def fill(b, cs, size, pattern):
    """Writes over the image: at cluster bounds, partial, zeros."""
    return Io("write -P %d 0 %d" % (pattern, min(size, 3 * cs + 512)),
              "write -z %d %d" % (5 * cs, cs),
              "write -P %d %d %d" % (pattern + 1, 6 * cs + 512, cs),
              "write -P %d %d %d" % (pattern + 2, size - 2 * cs - 1024, 2 * cs + 1024))


def cycle(b, cs, size):
    """Snapshots interleaved with writes: create, write, create, apply,
    write, delete by name and by id, create again, apply by id."""
    return [fill(b, cs, size, 0x10), Snap("-c", "s1"), fill(b, cs, size, 0x20),
            Snap("-c", "s2"), Io("write -P 0x51 %d %d" % (cs, cs // 2 + 512)),
            Snap("-a", "s1"), fill(b, cs, size, 0x30), Snap("-c", "s3"),
            Snap("-d", "s2"), Io("write -P 0x61 %d 4096" % (size // 2)),
            Snap("-a", "3"), Snap("-d", "1"), Snap("-d", "s1"), Snap("-c", "s4"),
            Snap("-d", "s3"),
            Snap("-a", "s4"), Snap("-d", "s4")]


# --------------------------------------------------------------------------

for cs in (512, 4 * K, 64 * K, 2 * M):
    def make(cs):
        @case("clusters/cs%d" % cs, "cluster_size=%d: create/apply/delete amid writes" % cs)
        def _(b):
            size = max(2 * M, 48 * cs)
            b.create("a.qcow2", size, opts={"cluster_size": cs})
            return cycle(b, cs, size)
    make(cs)

@case("clusters/long_l1", "512 B clusters, 1G: the snapshot's L1 copy (512 clusters) is longer "
      "than one refcount block's range (256 clusters)")
def _(b):
    b.create("a.qcow2", 1 << 30, opts={"cluster_size": 512})
    return [fill(b, 512, 1 << 30, 0x10), Snap("-c", "s1"), fill(b, 512, 1 << 30, 0x20),
            Snap("-c", "s2"), Snap("-a", "s1"), Snap("-d", "s2"), Snap("-c", "s3")]


for bits in (1, 16, 64):
    def make(bits):
        @case("refcounts/r%d" % bits, "refcount_bits=%d (1: a shared cluster overflows)" % bits)
        def _(b):
            b.create("a.qcow2", 2 * M, opts={"cluster_size": 4 * K, "refcount_bits": bits})
            return [Snap("-c", "empty"), Snap("-d", "empty")] + cycle(b, 4 * K, 2 * M)
    make(bits)


@case("features/extended_l2", "extended L2 with subcluster writes")
def _(b):
    b.create("a.qcow2", 2 * M, opts={"cluster_size": 64 * K, "extended_l2": "on"})
    return [Io("write -P 1 2048 2048", "write -z 70000 10000"), Snap("-c", "a"),
            Io("write -P 2 4096 2048"), Snap("-c", "b"), Snap("-a", "a"),
            Io("write -P 3 0 1024"), Snap("-d", "a"), Snap("-a", "b")]


@case("features/compressed", "compressed clusters shared by snapshots")
def _(b):
    b.create("a.qcow2", 2 * M, opts={"cluster_size": 4 * K})
    return [Io("write -c -P 7 0 64k", "write -c -P 8 64k 4k"), Snap("-c", "a"),
            Io("write -P 9 0 2k", "write -c -P 10 128k 4k"), Snap("-c", "b"),
            Snap("-d", "a"), Snap("-a", "b"), Snap("-d", "b")]


@case("features/backing", "an overlay over a backing file")
def _(b):
    b.create("base.qcow2", 2 * M)
    b.io("base.qcow2", "write -P 0x0b 0 2M")
    b.create("a.qcow2", 2 * M, opts={"cluster_size": 4 * K}, backing="base.qcow2",
             backing_fmt="qcow2")
    return [Io("write -P 1 4k 8k"), Snap("-c", "a"), Io("write -z 0 64k"), Snap("-c", "b"),
            Snap("-a", "a"), Io("write -P 2 1M 4k"), Snap("-d", "b")]


@case("features/v2", "compat=0.10 (version 2)")
def _(b):
    b.create("a.qcow2", 2 * M, opts={"compat": "0.10", "cluster_size": 4 * K})
    return cycle(b, 4 * K, 2 * M)


@case("features/resize", "apply restores the snapshot's virtual size (grown and shrunk)")
def _(b):
    b.create("a.qcow2", 1 * M, opts={"cluster_size": 512})
    return [Io("write -P 1 0 1M"), Snap("-c", "small"), Img("resize", "a.qcow2", "+5M"),
            Io("write -P 2 5M 512k"), Snap("-c", "big"), Snap("-a", "small"),
            Io("write -P 3 0 4k"), Snap("-a", "big"), Snap("-d", "small")]


@case("features/resize_backing", "apply grows the image back over a longer backing file")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.io("base.qcow2", "write -P 0x0b 0 4M")
    b.create("a.qcow2", 2 * M, opts={"cluster_size": 64 * K}, backing="base.qcow2",
             backing_fmt="qcow2")
    return [Io("write -P 1 64k 64k", "write -P 2 1536k 4k"), Snap("-c", "two"),
            Img("resize", "--shrink", "a.qcow2", "1M"), Io("write -P 3 0 4k"),
            Snap("-c", "one"), Snap("-a", "two"), Io("write -P 4 1M 4k"), Snap("-a", "one"),
            Img("resize", "a.qcow2", "3M"), Snap("-a", "two")]


@case("names/duplicates", "duplicate names, names that are ids, ids that are names")
def _(b):
    b.create("a.qcow2", 1 * M)
    return [Snap("-c", "x"), Io("write -P 1 0 64k"), Snap("-c", "x"), Snap("-c", "1"),
            Io("write -P 2 0 64k"), Snap("-a", "1"),  # id 1 first (-a)
            Snap("-d", "1"),                          # the name "1" first (-d)
            Snap("-d", "x"), Snap("-a", "x"), Snap("-c", ""), Snap("-c", "n" * 300),
            Snap("-c", "sp ace"), Snap("-d", "")]


@case("names/ids", "ids after deletions: one past the largest")
def _(b):
    b.create("a.qcow2", 1 * M)
    return [Snap("-c", "a"), Snap("-c", "b"), Snap("-c", "c"), Snap("-d", "b"),
            Snap("-c", "d"), Snap("-d", "d"), Snap("-c", "e"), Snap("-d", "a"),
            Snap("-c", "f")]


@case("errors/missing", "apply and delete of a snapshot that does not exist")
def _(b):
    b.create("a.qcow2", 1 * M)
    return [Snap("-a", "nope"), Snap("-d", "nope"), Snap("-c", "s"), Snap("-a", "2"),
            Snap("-d", "2"), Snap("-l")]


@case("errors/command_line", "mixed actions, no image, two images, no action, -U with a write")
def _(b):
    b.create("a.qcow2", 1 * M)
    return [Snap("-c", "s"), Snap("-l", "-c", "x"), Snap("-c", "x", "-d", "s"),
            Snap("-a", "s", "-a", "s"), Snap("-l", image=None), Snap("-l", "a.qcow2"),
            Snap(), Snap("-l", image="missing.qcow2"), Snap("-U", "-c", "y"), Snap("-U", "-l"),
            Snap("-U", "-d", "s"), Snap("-U")]


@case("errors/raw", "a raw image: nothing to list, no snapshots to make")
def _(b):
    b.create("a.raw", 1 * M, fmt="raw")
    return [Snap("-l", image="a.raw"), Snap("-c", "x", image="a.raw"),
            Snap("-d", "x", image="a.raw")]


@case("errors/data_file", "an external data file: QEMU refuses internal snapshots")
def _(b):
    b.create("a.qcow2", 1 * M, opts={"data_file": "a.data"})
    return [Io("write -P 1 0 64k"), Snap("-c", "x"), Snap("-a", "x"), Snap("-d", "x"),
            Snap("-l")]


@case("errors/bitmaps", "persistent bitmaps: apply refused by both; -c/-d done by both")
def _(b):
    b.create("a.qcow2", 1 * M)
    b.qemu_img("snapshot", "-c", "old", "a.qcow2")
    b.qemu_img("bitmap", "--add", "a.qcow2", "bm")
    return [Snap("-a", "old"), Snap("-c", "x"), Snap("-d", "old"), Snap("-l")]


@case("errors/refcount_overflow", "refcount_bits=1: a snapshot of data overflows (EINVAL)")
def _(b):
    b.create("a.qcow2", 1 * M, opts={"refcount_bits": 1})
    return [Io("write -P 1 0 64k"), Snap("-c", "x"), Snap("-l")]


# --------------------------------------------------------------------------


def listing(t, d, image, binary=None):
    """(rc, stdout) of `snapshot -l` by qemu-img or by `binary`."""
    argv = ([binary] if binary else [L.QEMU_IMG]) + ["snapshot", "-l", image]
    r = L.run(argv, d, t.log, timeout=TW.TIMEOUT)
    return r.rc, r.out


def without_dates(text):
    """The -l table's rows with the dates cut out: the twins were
    snapshotted at different times."""
    return [re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", line)
            for line in text.splitlines()]


def snapshot_ids(t, d, image):
    info = json.loads(L.must([L.QEMU_IMG, "info", "--output=json", image], d, t.log).out)
    return [s["id"] for s in info.get("snapshots", [])], info["virtual-size"]


def compare(t, image):
    rc_q, out_q = listing(t, t.q, image)
    rc_o, out_o = listing(t, t.o, image)
    if rc_q != 0 or rc_o != 0:
        raise CaseFailure("qemu-img snapshot -l failed: q %d, o %d" % (rc_q, rc_o))
    if without_dates(out_q) != without_dates(out_o):
        raise CaseFailure("snapshot lists differ:\nqemu-img's twin:\n%s\nours:\n%s"
                          % (out_q, out_o))
    for d, out in ((t.o, out_o), (t.q, out_q)):  # our image, and qemu-img's
        rc_ours, out_ours = listing(t, d, image, t.binary)
        if rc_ours != 0 or out_ours != out:
            raise CaseFailure("our snapshot -l (exit %d) differs from qemu-img's on the same "
                              "image in %s/:\nqemu-img:\n%s\nours:\n%s"
                              % (rc_ours, os.path.basename(d), out, out_ours))
    ids_q, size_q = snapshot_ids(t, t.q, image)
    ids_o, size_o = snapshot_ids(t, t.o, image)
    if size_q != size_o:
        raise CaseFailure("virtual size: qemu-img's twin %d, ours %d" % (size_q, size_o))
    t.same_view("active layer", t.view(t.q, image), t.view(t.o, image))
    for sid in ids_o:
        views = []
        for d in (t.q, t.o):
            out = os.path.join(t.views, "snap-%s-%s.raw" % (os.path.basename(d), sid))
            L.must([L.QEMU_IMG, "convert", "-l", "snapshot.id=%s" % sid, "-O", "raw", image,
                    out], d, t.log, timeout=TW.TIMEOUT)
            views.append(out)
        t.same_view("snapshot id %s" % sid, views[0], views[1])
    # qemu-img leaks what a failed create had counted (refcount overflow).
    r = L.run([L.QEMU_IMG, "check", image], t.q, t.log, timeout=TW.TIMEOUT)
    if r.rc not in (0, 3):
        raise CaseFailure("qemu-img check of qemu-img's twin: exit %d" % r.rc)
    t.check_clean(t.o, image)


def run_case(c, workdir, log, binary):
    seed = sum(map(ord, c.name))
    t = TW.Twins(L.Builder(workdir, log, seed), binary)
    b = L.Builder(t.src, log, seed)
    steps = c.fn(b)
    t.copy()
    done = refused = 0
    for step in steps:
        if isinstance(step, Io):
            for d in (t.q, t.o):
                L.Builder(d, log, seed).io(step.image, *step.cmds)
            continue
        if isinstance(step, Img):
            for d in (t.q, t.o):
                L.must([L.QEMU_IMG] + step.args, d, log)
            continue
        if step.ours_refuses:
            before = t.fingerprint(t.o)
            q = L.run([L.QEMU_IMG, "snapshot"] + step.args, t.q, log, timeout=TW.TIMEOUT)
            o = L.run([binary, "snapshot"] + step.args, t.o, log, timeout=TW.TIMEOUT)
            lines = o.err.splitlines()
            if q.rc != 0 or o.rc != 1 or len(lines) != 1 or t.fingerprint(t.o) != before:
                raise CaseFailure("snapshot %s: want qemu-img to succeed and ours to refuse "
                                  "cleanly; qemu-img exit %d, ours %s %r"
                                  % (" ".join(step.args), q.rc, o.describe(), o.err[-300:]))
            # The twins part ways: continue from qemu-img's image on both.
            L.must(["cp", "-a", os.path.join(t.q, step.image), os.path.join(t.o, step.image)],
                   workdir, log)
            refused += 1
            continue
        q, o = t.run_both("snapshot", step.args)
        if without_dates(q.out) != without_dates(o.out):
            raise CaseFailure("snapshot %s: stdout differs:\nqemu-img:\n%s\nours:\n%s"
                              % (" ".join(step.args), q.out, o.out))
        if q.rc == 0 and step.image.endswith(".qcow2") and os.path.exists(
                os.path.join(t.o, step.image)):
            compare(t, step.image)
        done += 1
    if os.path.exists(os.path.join(t.o, "a.qcow2")):
        compare(t, "a.qcow2")
    return "%d snapshot steps like qemu-img's%s" % (
        done, ", %d refused as documented" % refused if refused else "")


if __name__ == "__main__":
    sys.exit(L.run_suite("snapshot_oracle", CASES, sys.argv[1:], run_case))
