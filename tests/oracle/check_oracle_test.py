#!/usr/bin/python3
"""`ublk-qcow2 check` against `qemu-img check` at the command line.

Each case builds an image with qemu-img, damages it with Python where the
case needs it, then runs both checks on it and compares:

  * the exit status (0 clean, 1 failed / cannot open, 2 corruptions,
    3 leaks, 63 no checks for the format);
  * stderr: for a check that ran, every line qemu-img prints, in order, with
    its "qemu-img: " prefix removed (ours prints the same words); when the
    image cannot be opened (exit 1 or 63 with no check run), exactly one
    line `ublk-qcow2: …` naming the image or the file that is missing;
  * for repair cases, `check -r all` on twin copies: the same exit status,
    then `qemu-img check` and `qemu-img snapshot -l` must say the same of
    both repaired images (unless QEMU's own repair is known to go wrong,
    when only the exit status is compared).

Usage: check_oracle_test.py BINARY [--case SUBSTR]... [--list] [--keep]
"""

import json
import os
import shutil
import struct
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import Case, CaseFailure  # noqa: E402

M = 1 << 20
TIMEOUT = 60


class Expect:
    def __init__(self, image, args=(), repair=True, same_state=True, repair_lines=True,
                 open_error=None):
        self.image = image                # relative to the case directory
        self.args = list(args)            # extra check arguments (-f raw)
        self.repair = repair              # also compare -r all on twins
        self.same_state = same_state      # ... and the repaired images
        self.repair_lines = repair_lines  # ... and -r all's stderr lines
        # None: a check runs, stderr lines compared with qemu-img's. Else the
        # image cannot be checked: one stderr line naming one of these.
        self.open_error = open_error


CASES = []


case = L.case_registry(CASES, Case)


# --------------------------------------------------------------------------
# Images that qemu-img check cannot check


@case("open/raw_probed", "a raw file, format probed: exit 63, no checks for raw")
def _(b):
    b.raw("disk.img", M, [(0, b"hello")])
    return Expect("disk.img", open_error=["disk.img"])


@case("open/raw_forced", "a raw file with -f raw: exit 63")
def _(b):
    b.raw("disk.img", M)
    return Expect("disk.img", args=["-f", "raw"], open_error=["disk.img"])


@case("open/raw_as_qcow2", "a raw file with -f qcow2: exit 1, not qcow2")
def _(b):
    b.raw("disk.img", M)
    return Expect("disk.img", args=["-f", "qcow2"], open_error=["disk.img"])


@case("open/backing_missing", "the backing file was deleted: exit 1")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.create("top.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    os.unlink(b.path("base.qcow2"))
    return Expect("top.qcow2", open_error=["base.qcow2"])


@case("open/backing_missing_deeper", "the bottom of a 3-image chain was deleted: exit 1")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.create("mid.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.create("top.qcow2", 4 * M, backing="mid.qcow2", backing_fmt="qcow2")
    os.unlink(b.path("base.qcow2"))
    return Expect("top.qcow2", open_error=["base.qcow2"])


@case("open/backing_present", "neighbour: a backing chain that opens checks clean")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.io("base.qcow2", "write -P 1 0 1M")
    b.create("top.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 2 64k 64k")
    return Expect("top.qcow2")


@case("open/data_file_missing", "the external data file was deleted: exit 1")
def _(b):
    b.create("img.qcow2", 4 * M, opts={"data_file": "img.data"})
    b.io("img.qcow2", "write -P 1 0 64k")
    os.unlink(b.path("img.data"))
    return Expect("img.qcow2", open_error=["img.data"])


@case("open/data_file_present", "neighbour: an image with its data file checks clean")
def _(b):
    b.create("img.qcow2", 4 * M, opts={"data_file": "img.data"})
    b.io("img.qcow2", "write -P 1 0 64k")
    return Expect("img.qcow2")


# --------------------------------------------------------------------------
# Snapshot tables


def snapshot_image(b):
    """One snapshot; its table is the file's last cluster, so a field that
    grows runs past the end of the file."""
    b.create("img.qcow2", 16 * M)
    b.io("img.qcow2", "write -P 1 0 128k")
    b.snapshot("img.qcow2", "s1")
    return b.path("img.qcow2")


def rewrite_entry(path, extra_size, id_=b"1", name=b"s1", keep=None):
    """Rewrites snapshot entry 0: `extra_size` bytes of extra data (the stored
    bytes, then 0x5a), id and name; then cuts the file `keep` bytes after the
    table's start, if given."""
    so = L.hdr_get(path, "snapshots_offset")
    with open(path, "r+b") as f:
        f.seek(so)
        fixed = bytearray(f.read(40))
        old = f.read(struct.unpack_from(">I", fixed, 36)[0])
        extra = (old + b"\x5a" * max(0, extra_size - len(old)))[:extra_size]
        struct.pack_into(">HH", fixed, 12, len(id_), len(name))
        struct.pack_into(">I", fixed, 36, extra_size)
        f.seek(so)
        f.write(bytes(fixed) + extra + id_ + name)
        if keep is not None:
            f.truncate(so + keep)


def extra_case(size, doc):
    def fn(b):
        rewrite_entry(snapshot_image(b), size)
        return Expect("img.qcow2")
    CASES.append(Case("extra_data_%d" % size, "snapshot", fn, doc))


extra_case(1024, "neighbour: 1024 bytes of extra data, QEMU's limit: clean")
extra_case(1025, "1025 bytes of extra data: check fails (1), -r all cuts it to 1024")
extra_case(2000, "2000 bytes of extra data: check fails (1), -r all cuts it to 1024")


def eof_case(name, doc, extra, id_, nm, keep):
    def fn(b):
        rewrite_entry(snapshot_image(b), extra, id_, nm, keep)
        return Expect("img.qcow2")
    CASES.append(Case(name, "snapshot", fn, doc))


eof_case("name_past_eof", "the name runs past EOF (reads as zeros, as in QEMU)",
         24, b"1", b"n" * 200, 40 + 24 + 1 + 10)
eof_case("id_past_eof", "the id runs past EOF", 24, b"1" * 300, b"s1", 40 + 24 + 5)
eof_case("extra_past_eof", "1000 bytes of extra data, most past EOF", 1000, b"1", b"s1", 40 + 100)
eof_case("fixed_part_past_eof", "the file ends 20 bytes into entry 0: incomplete entry",
         24, b"1", b"s1", 20)


@case("snapshot/table_past_eof_by_clusters",
      "id and name of 65535 bytes past EOF: a reference beyond EOF (2); QEMU's own "
      "-r all goes wrong, so only its exit status is compared")
def _(b):
    rewrite_entry(snapshot_image(b), 1000, b"1" * 65535, b"n" * 65535, 40 + 100)
    return Expect("img.qcow2", same_state=False)


def count_case(n, doc, **kw):
    def fn(b):
        L.hdr_set(snapshot_image(b), "nb_snapshots", n)
        return Expect("img.qcow2", **kw)
    CASES.append(Case("nb_snapshots_%d" % n, "snapshot", fn, doc))


count_case(2, "nb_snapshots 2, one entry: the second reads as zeros, incomplete (2)")
count_case(100, "nb_snapshots 100, one entry: 99 incomplete entries (2)")
count_case(70000, "nb_snapshots 70000: over QEMU's 65536, check fails (1); -r all drops "
           "4464 and fails later (QEMU on an overlap, ours on the refcounts)",
           same_state=False, repair_lines=False)


# --------------------------------------------------------------------------
# Bitmaps: qemu-img check reads every bitmap's table (QEMU's open reads only
# the consistent ones) and counts what they name.


def bitmap_image(b):
    """Two bitmaps, b0 and b1, each with a table naming one data cluster.
    Returns the file offset of b0's directory entry."""
    b.create("img.qcow2", 4 * M)
    b.io("img.qcow2", "write -P 0x11 0 256k")
    b.qemu_img("bitmap", "--add", "img.qcow2", "b0")
    b.io("img.qcow2", "write -P 0x22 1M 64k")
    b.qemu_img("bitmap", "--add", "img.qcow2", "b1")
    return L.bitmap_entries(b.path("img.qcow2"))[0]


@case("bitmap/valid", "neighbour: two bitmaps, their tables and data counted: clean "
      "(QEMU's -r all stores the bitmaps anew at close, in new clusters, which ours does "
      "not: the repaired images are not compared)")
def _(b):
    bitmap_image(b)
    return Expect("img.qcow2", same_state=False)


def bad_table_entry_case(name, change, doc):
    def fn(b):
        p, entry = b.path("img.qcow2"), bitmap_image(b)
        table = L.read_be(p, entry, 8)
        L.write_be(p, table, 8, change(L.read_be(p, table, 8)))
        L.write_be(p, entry + 12, 4, L.read_be(p, entry + 12, 4) | 1)  # in_use
        return Expect("img.qcow2")
    CASES.append(Case(name, "bitmap", fn, doc))


bad_table_entry_case("table_entry_reserved_bit_in_use", lambda e: e | 0x2,
                     "b0 in use, its table entry with a reserved bit: Check failed: "
                     "Invalid argument (1)")
bad_table_entry_case("table_entry_all_ones_with_offset_in_use", lambda e: (e or 0x10000) | 1,
                     "b0 in use, its table entry with an offset and the all-ones flag: "
                     "Check failed: Invalid argument (1)")


@case("bitmap/in_use", "b0 marked in use (a writer died): inconsistent, not an error; "
      "-r all leaves it listed, in use, as qemu-img's does (QEMU stores b1 anew at close, "
      "so the repaired images' end offsets differ and are not compared)")
def _(b):
    p, entry = b.path("img.qcow2"), bitmap_image(b)
    L.write_be(p, entry + 12, 4, L.read_be(p, entry + 12, 4) | 1)  # in_use
    return Expect("img.qcow2", same_state=False)


@case("bitmap/table_past_eof",
      "b0's table past the end of the file: QEMU opens it (zeros) and its check reports a "
      "reference beyond EOF (2); QEMU's -r all then stores the bitmaps anew at close, which "
      "ours does not, so only the exit status of -r all is compared")
def _(b):
    p, entry = b.path("img.qcow2"), bitmap_image(b)
    L.write_be(p, entry, 8, 100 * M)
    return Expect("img.qcow2", same_state=False, repair_lines=False)


def bad_directory_case(name, field, width, value, doc):
    """b0's directory entry with `field` (offset in the entry, `width` bytes) set to `value`,
    breaking QEMU's rules: qemu-img cannot open the image to check it (exit 1, one line, no
    report on stdout)."""
    def fn(b):
        p, entry = b.path("img.qcow2"), bitmap_image(b)
        L.write_be(p, entry + field, width, value)
        return Expect("img.qcow2", open_error=["doesn't satisfy the constraints"])
    CASES.append(Case("bitmap/directory_" + name, "bitmap", fn, doc))


bad_directory_case("granularity_out_of_range", 17, 1, 40,
                   "granularity_bits 40: Could not open (Bitmap 'b0' doesn't satisfy the "
                   "constraints), exit 1")
bad_directory_case("type_not_dirty_tracking", 16, 1, 2,
                   "type 2: Could not open, exit 1")
bad_directory_case("reserved_flag", 12, 4, 1 << 5,
                   "a reserved flag bit: Could not open, exit 1")


# --------------------------------------------------------------------------


def stderr_lines(text, strip_prefix):
    out = []
    for line in text.split("\n"):
        if strip_prefix and line.startswith("qemu-img: "):
            line = line[len("qemu-img: "):]
        if line:
            out.append(line)
    return out


def compare_check(label, image, args, binary, b, log, exp, problems):
    q = L.run([L.QEMU_IMG, "check"] + args + [image], b.cwd, log, timeout=TIMEOUT)
    o = L.run([binary, "check"] + args + [image], b.cwd, log, timeout=TIMEOUT)
    if o.timed_out or o.signal:
        problems.append("%s: ours %s" % (label, o.describe()))
        return q, o
    if o.rc != q.rc:
        problems.append("%s: exit %d, qemu-img %d" % (label, o.rc, q.rc))
    ours = stderr_lines(o.err, False)
    if exp.open_error is not None:
        if len(ours) != 1 or not ours[0].startswith("ublk-qcow2: ") or \
                not any(n in ours[0] for n in exp.open_error):
            problems.append("%s: want one stderr line 'ublk-qcow2: ...' naming %s, got %r"
                            % (label, exp.open_error, o.err[:400]))
        if o.out != q.out:  # qemu-img prints no report for an image it cannot open
            problems.append("%s: stdout differs:\n  qemu-img %r\n  ours     %r"
                            % (label, q.out, o.out))
    else:
        theirs = stderr_lines(q.err, True)
        if ours != theirs:
            problems.append("%s: stderr differs:\n  qemu-img %r\n  ours     %r"
                            % (label, theirs[:8], ours[:8]))
        if o.rc in (0, 2, 3) and o.out != q.out:
            problems.append("%s: stdout differs:\n  qemu-img %r\n  ours     %r"
                            % (label, q.out, o.out))
    return q, o


def run_case(c, workdir, log, binary):
    b = L.Builder(workdir, log, sum(map(ord, c.name)))
    exp = c.fn(b)
    problems = []
    q, _ = compare_check("check", exp.image, exp.args, binary, b, log, exp, problems)
    note = "qemu-img check exit %d" % q.rc
    if exp.repair:
        stem, ext = os.path.splitext(exp.image)
        mine, theirs = stem + "-ours" + ext, stem + "-qemu" + ext
        shutil.copy(b.path(exp.image), b.path(mine))
        shutil.copy(b.path(exp.image), b.path(theirs))
        qr = L.run([L.QEMU_IMG, "check", "-r", "all"] + exp.args + [theirs], b.cwd, log,
                   timeout=TIMEOUT)
        orr = L.run([binary, "check", "-r", "all"] + exp.args + [mine], b.cwd, log,
                    timeout=TIMEOUT)
        note += ", -r all exit %d" % qr.rc
        if orr.rc != qr.rc:
            problems.append("check -r all: exit %s, qemu-img %d" % (orr.describe(), qr.rc))
        elif exp.repair_lines and exp.open_error is None:
            a, o = stderr_lines(qr.err, True), stderr_lines(orr.err, False)
            # The copies have different names; messages do not name them.
            if a != o:
                problems.append("check -r all: stderr differs:\n  qemu-img %r\n  ours     %r"
                                % (a[:8], o[:8]))
        if exp.open_error is None and orr.rc == qr.rc and qr.rc in (0, 2, 3):
            # The bitmaps each repair leaves, with their flags (in use, auto).
            lists = []
            for image in (theirs, mine):
                r = L.run([L.QEMU_IMG, "info", "--output=json", image], b.cwd, log,
                          timeout=TIMEOUT)
                data = json.loads(r.out).get("format-specific", {}).get("data", {}) \
                    if r.rc == 0 else {}
                lists.append(data.get("bitmaps"))
            if lists[0] != lists[1]:
                problems.append("after -r all, bitmaps differ:\n  QEMU's repair %r\n  ours  %r"
                                % tuple(lists))
        if exp.same_state and exp.open_error is None:
            for what in (["check"], ["snapshot", "-l"]):
                r1 = L.run([L.QEMU_IMG] + what + [theirs], b.cwd, log, timeout=TIMEOUT)
                r2 = L.run([L.QEMU_IMG] + what + [mine], b.cwd, log, timeout=TIMEOUT)
                if (r1.rc, r1.out, r1.err.replace(theirs, "X")) != \
                        (r2.rc, r2.out, r2.err.replace(mine, "X")):
                    problems.append(
                        "after -r all, qemu-img %s differs:\n  on QEMU's repair (%d) %r\n"
                        "  on ours (%d)         %r"
                        % (" ".join(what), r1.rc, (r1.out + r1.err)[:400], r2.rc,
                           (r2.out + r2.err)[:400]))
    if problems:
        raise CaseFailure("\n".join(problems))
    return note


if __name__ == "__main__":
    sys.exit(L.run_suite("check_oracle", CASES, sys.argv[1:], run_case))
