#!/usr/bin/python3
"""Shared helpers for the QEMU oracle tests (standard library only).

Each test script builds images with qemu-img / qemu-io, runs QEMU and our
`ublk-qcow2` on them, and compares.  This module holds what they share:
running commands with time limits, sparse-aware byte comparison, JSON
comparison, qcow2 header patching, and the JUnit XML report (one <testcase>
per image case).
"""

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = shutil.which("qemu-io") or "/usr/bin/qemu-io"

SETUP_TIMEOUT = 120


class CaseFailure(Exception):
    """A case failed; the message says why (one line preferred)."""


class SetupError(Exception):
    """Building the case's images failed (a harness or QEMU problem, not ours)."""


# --------------------------------------------------------------------------
# Running commands


class Result:
    def __init__(self, argv, rc, out, err, elapsed, timed_out, killed_reason=None):
        self.argv = argv
        self.rc = rc
        self.out = out
        self.err = err
        self.elapsed = elapsed
        self.timed_out = timed_out
        self.killed_reason = killed_reason

    @property
    def signal(self):
        return -self.rc if self.rc is not None and self.rc < 0 else None

    def describe(self):
        if self.killed_reason:
            return self.killed_reason
        if self.timed_out:
            return "timed out after %.1f s" % self.elapsed
        if self.signal:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return "killed by signal %s" % name
        return "exit %d" % self.rc


class Log:
    """Collects per-case log text (printed on failure, stored in the XML)."""

    def __init__(self):
        self.lines = []

    def __call__(self, text):
        self.lines.append(text)

    def text(self):
        return "\n".join(self.lines)


def _decode(b):
    return b.decode("utf-8", "replace")


def _qemu_img_env():
    """The environment qemu-img runs in: with //tests/qemu:libprecise_thread_cpu.so preloaded
    when the BUILD rule passes its runfiles path in $QEMU_PRELOAD (oracle.bzl does), so QEMU's
    PBKDF2 timing probe of a LUKS create reads an exact CPU clock instead of failing on a tick-
    accounted one ("Unable to get accurate CPU usage"; see precise_thread_cpu.c)."""
    preload = os.environ.get("QEMU_PRELOAD")
    runfiles = os.environ.get("TEST_SRCDIR")
    workspace = os.environ.get("TEST_WORKSPACE")
    if not (preload and runfiles and workspace):
        return None
    return dict(os.environ, LD_PRELOAD=os.path.join(runfiles, workspace, preload))


QEMU_IMG_ENV = _qemu_img_env()


def run(argv, cwd, log, timeout=60, watch=None, max_alloc=None, stdin=subprocess.DEVNULL):
    """Runs argv; returns a Result.  Never raises for a non-zero exit.

    watch/max_alloc: while it runs, kill it if the file `watch` (relative to
    cwd) ever has more than max_alloc bytes allocated (st_blocks * 512).  That
    keeps a non-sparse convert of a 1 TiB image from filling the disk.
    """
    start = time.monotonic()
    env = QEMU_IMG_ENV if os.path.basename(str(argv[0])) == "qemu-img" else None
    proc = subprocess.Popen(argv, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, env=env)
    killed_reason = None
    timed_out = False
    if watch is None:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
    else:
        # Poll: communicate() with a short timeout keeps the pipes drained.
        watch_path = os.path.join(cwd, watch)
        out_parts, err_parts = [], []
        import threading

        def pump(stream, parts):
            for chunk in iter(lambda: stream.read(65536), b""):
                parts.append(chunk)

        threads = [threading.Thread(target=pump, args=(proc.stdout, out_parts)),
                   threading.Thread(target=pump, args=(proc.stderr, err_parts))]
        for t in threads:
            t.daemon = True
            t.start()
        while proc.poll() is None:
            if time.monotonic() - start > timeout:
                timed_out = True
                _kill_group(proc)
                break
            try:
                st = os.stat(watch_path)
                if st.st_blocks * 512 > max_alloc:
                    killed_reason = ("killed: output %s reached %d allocated bytes "
                                     "(limit %d) — not writing sparse?"
                                     % (watch, st.st_blocks * 512, max_alloc))
                    _kill_group(proc)
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        proc.wait()
        for t in threads:
            t.join()
        out, err = b"".join(out_parts), b"".join(err_parts)
    elapsed = time.monotonic() - start
    res = Result(argv, proc.returncode, _decode(out), _decode(err), elapsed, timed_out,
                 killed_reason)
    log("$ %s   [%s, %.2fs]" % (" ".join(shlex.quote(a) for a in argv), res.describe(), elapsed))
    if res.err.strip():
        for line in res.err.rstrip("\n").split("\n")[:20]:
            log("  stderr: " + line)
    return res


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def must(argv, cwd, log, timeout=SETUP_TIMEOUT):
    """Runs a setup command; raises SetupError unless it exits 0."""
    res = run(argv, cwd, log, timeout=timeout)
    if res.rc != 0 or res.timed_out:
        raise SetupError("setup command failed (%s): %s\n%s" % (
            res.describe(), " ".join(shlex.quote(a) for a in argv),
            (res.out.strip() + "\n" + res.err.strip()).strip()[-2000:]))
    return res


# --------------------------------------------------------------------------
# Image building helpers


class Builder:
    """Builds images inside one case directory (all paths relative to it)."""

    def __init__(self, cwd, log, seed):
        self.cwd = cwd
        self.log = log
        self.rng = random.Random(seed)
        self._noise_n = 0

    def path(self, rel):
        return os.path.join(self.cwd, rel)

    def mkdir(self, rel):
        os.makedirs(self.path(rel), exist_ok=True)

    def qemu_img(self, *args):
        return must([QEMU_IMG] + [str(a) for a in args], self.cwd, self.log)

    def qemu_img_luks_create(self, *args, attempts=60):
        """qemu-img create of a LUKS image. QEMU 7.2 (Debian) times PBKDF2 with the
        thread's user time from getrusage, which tick-accounted kernels often leave
        unmoved across its first probe (2^15 iterations, about 6 ms): it then gives up
        ("Unable to get accurate CPU usage"; 22 of 30 creates on this development machine).
        run() preloads the exact clock into qemu-img under Bazel (QEMU_IMG_ENV); the
        retries are for runs without it. A failure comes quickly (the probe is the
        first thing qemu-img does), so many attempts cost little."""
        for attempt in range(attempts):
            try:
                return self.qemu_img(*args)
            except SetupError:
                if attempt == attempts - 1:
                    raise

    def create(self, name, size, fmt="qcow2", opts=None, backing=None, backing_fmt=None):
        argv = ["create", "-q", "-f", fmt]
        if opts:
            argv += ["-o", ",".join("%s=%s" % kv for kv in opts.items())]
        if backing is not None:
            argv += ["-b", backing]
            if backing_fmt:
                argv += ["-F", backing_fmt]
        argv += [name]
        if size is not None:
            argv += [str(size)]
        self.qemu_img(*argv)
        return name

    def noise_file(self, length):
        """A file of `length` seeded random bytes, for `write -s`."""
        self._noise_n += 1
        name = ".noise%d" % self._noise_n
        with open(self.path(name), "wb") as f:
            f.write(self.rng.randbytes(length))
        return name

    def io(self, img, *cmds, fmt="qcow2"):
        """Runs qemu-io commands on img.  A command is a string; the special
        form ("noise", off, length) writes seeded random bytes."""
        argv = [QEMU_IO, "-f", fmt]
        for c in cmds:
            if isinstance(c, tuple):
                kind, off, length = c
                assert kind == "noise"
                c = "write -s %s %d %d" % (self.noise_file(length), off, length)
            argv += ["-c", c]
        argv.append(img)
        res = must(argv, self.cwd, self.log)
        # qemu-io reports failed commands on stdout/stderr but exits 0.
        text = res.out + res.err
        for bad in ("error", "Error", "failed", "Failed", "Permission denied"):
            if bad in text:
                raise SetupError("qemu-io reported a failure: %s" % text.strip()[:500])

    def raw(self, name, size, chunks=()):
        """A raw file of `size` bytes (sparse) with (offset, bytes) chunks."""
        with open(self.path(name), "wb") as f:
            f.truncate(size)
            for off, data in chunks:
                f.seek(off)
                f.write(data)
        return name

    def snapshot(self, img, snap_name):
        self.qemu_img("snapshot", "-c", snap_name, img)


def compressible(rng, length):
    """Text-like data that compresses well but is not a single byte."""
    words = [b"qcow2 ", b"cluster ", b"refcount ", b"L2-table ", b"backing ", b"zstd ",
             b"zlib ", b"ublk\n", b"0123456789 "]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words)
    return bytes(out[:length])


# --------------------------------------------------------------------------
# qcow2 header patching (all fields big-endian)

HDR = {
    "magic": (0, 4), "version": (4, 4), "backing_file_offset": (8, 8),
    "backing_file_size": (16, 4), "cluster_bits": (20, 4), "size": (24, 8),
    "crypt_method": (32, 4), "l1_size": (36, 4), "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4), "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8), "compatible_features": (80, 8),
    "autoclear_features": (88, 8), "refcount_order": (96, 4), "header_length": (100, 4),
}

_FMT = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}


def read_be(path, off, size):
    with open(path, "rb") as f:
        f.seek(off)
        data = f.read(size)
    return struct.unpack(_FMT[size], data)[0]


def write_be(path, off, size, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(_FMT[size], value))


def hdr_get(path, field):
    off, size = HDR[field]
    return read_be(path, off, size)


def hdr_set(path, field, value):
    off, size = HDR[field]
    write_be(path, off, size, value)


def write_bytes(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441


def header_extensions(path):
    """[(type, offset_of_ext_header, length)] in file order."""
    version = hdr_get(path, "version")
    start = hdr_get(path, "header_length") if version >= 3 else 72
    cluster = 1 << hdr_get(path, "cluster_bits")
    exts = []
    with open(path, "rb") as f:
        off = start
        while off + 8 <= cluster:
            f.seek(off)
            typ, length = struct.unpack(">II", f.read(8))
            if typ == EXT_END:
                break
            exts.append((typ, off, length))
            off += 8 + ((length + 7) & ~7)
    return exts


def bitmap_entries(path):
    """Offsets of the bitmap directory's entries, in order (the directory the
    bitmaps extension names; [] without one).  Entry fields (big-endian):
    +0 table offset (8), +8 table size (4), +12 flags (4), +16 type (1),
    +17 granularity bits (1), +18 name size (2), +20 extra data size (4)."""
    for typ, off, _ in header_extensions(path):
        if typ == EXT_BITMAPS:
            nb = read_be(path, off + 8, 4)
            pos = read_be(path, off + 24, 8)
            out = []
            for _ in range(nb):
                out.append(pos)
                name_size = read_be(path, pos + 18, 2)
                extra_size = read_be(path, pos + 20, 4)
                pos += (24 + extra_size + name_size + 7) & ~7
            return out
    return []


def nbd_bitmap_map(d, image, name, log):
    """[(offset, length, dirty)] of bitmap `name` of qcow2 `image` (in `d`) as
    `qemu-nbd -B` serves it and `nbdinfo --map=qemu:dirty-bitmap:` reads it."""
    # A socket path must fit in 108 bytes: Bazel's sandbox paths do not.
    sockdir = tempfile.mkdtemp(prefix="bm-nbd", dir="/tmp")
    sock = os.path.join(sockdir, "s")
    proc = subprocess.Popen(["qemu-nbd", "-r", "-k", sock, "-B", name, "-f", "qcow2", image],
                            cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            if proc.poll() is not None:
                raise CaseFailure("qemu-nbd -B %s: %s" % (name, proc.stderr.read().decode()))
            time.sleep(0.05)
        res = run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name, "nbd+unix:///?socket=" + sock],
                  d, log)
        if res.rc != 0:
            raise CaseFailure("nbdinfo on %s: %s" % (d, res.err))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    out = []
    for line in res.out.splitlines():
        f = line.split()
        out.append((int(f[0]), int(f[1]), int(f[2]) == 1))
    return out


def snapshot_entries(path):
    """Offsets of the snapshot table's entries, in order.  Entry fields:
    +12 id size (2), +14 name size (2), +36 extra data size (4), extra data
    from +40 (+0 in it: the 64-bit VM state size)."""
    pos = hdr_get(path, "snapshots_offset")
    out = []
    for _ in range(hdr_get(path, "nb_snapshots")):
        out.append(pos)
        id_size, name_size = read_be(path, pos + 12, 2), read_be(path, pos + 14, 2)
        extra_size = read_be(path, pos + 36, 4)
        pos += (40 + extra_size + id_size + name_size + 7) & ~7
    return out


def rewrite_extensions(path, transform):
    """Rewrites the header extension area: transform(list of (type, data))
    returns the new list.  The backing file name (if any) is moved to just
    after the new extensions and backing_file_offset updated."""
    version = hdr_get(path, "version")
    start = hdr_get(path, "header_length") if version >= 3 else 72
    cluster = 1 << hdr_get(path, "cluster_bits")
    exts = []
    with open(path, "rb") as f:
        for typ, off, length in header_extensions(path):
            f.seek(off + 8)
            exts.append((typ, f.read(length)))
        bfo = hdr_get(path, "backing_file_offset")
        name = b""
        if bfo:
            f.seek(bfo)
            name = f.read(hdr_get(path, "backing_file_size"))
    new = bytearray()
    for typ, data in transform(exts):
        new += struct.pack(">II", typ, len(data)) + data + b"\0" * ((-len(data)) % 8)
    new += b"\0" * 8
    if name:
        new_bfo = start + len(new)
        new += name
    if start + len(new) > cluster:
        raise SetupError("rewritten header extensions do not fit in the header cluster")
    write_bytes(path, start, bytes(new) + b"\0" * (cluster - start - len(new)))
    if name:
        hdr_set(path, "backing_file_offset", new_bfo)


def l1_entries(path):
    off = hdr_get(path, "l1_table_offset")
    n = hdr_get(path, "l1_size")
    with open(path, "rb") as f:
        f.seek(off)
        data = f.read(8 * n)
    return [struct.unpack(">Q", data[i:i + 8])[0] for i in range(0, len(data), 8)]


# --------------------------------------------------------------------------
# Comparing outputs


def data_extents(path):
    """[(start, end)] of data (non-hole) ranges via SEEK_DATA/SEEK_HOLE."""
    size = os.path.getsize(path)
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no more data
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def merge_ranges(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def compare_range(fa, fb, start, end, chunk=1 << 20):
    """Returns the first differing offset in [start, end), or None."""
    pos = start
    while pos < end:
        n = min(chunk, end - pos)
        fa.seek(pos)
        fb.seek(pos)
        a = fa.read(n)
        b = fb.read(n)
        a += b"\0" * (n - len(a))  # reads past EOF are compared as zeros;
        b += b"\0" * (n - len(b))  # sizes are checked separately
        if a != b:
            for i in range(n):
                if a[i] != b[i]:
                    return pos + i
        pos += n
    return None


FULL_COMPARE_LIMIT = 256 << 20


def compare_raw(expected, got, extra_ranges=()):
    """Byte-exact comparison of two raw files; raises CaseFailure.

    Files up to 256 MiB are read whole.  Larger ones are compared over the
    union of both files' data extents (holes read as zeros, so outside that
    union both are zero) plus extra_ranges."""
    se, sg = os.path.getsize(expected), os.path.getsize(got)
    if se != sg:
        raise CaseFailure("raw size differs: qemu %d, ours %d" % (se, sg))
    if se <= FULL_COMPARE_LIMIT:
        ranges = [(0, se)]
    else:
        ranges = merge_ranges(data_extents(expected) + data_extents(got) + list(extra_ranges))
        total = sum(e - s for s, e in ranges)
        if total > 4 << 30:
            raise CaseFailure("refusing to compare %d data bytes (no sparse support?)" % total)
    with open(expected, "rb") as fa, open(got, "rb") as fb:
        for s, e in ranges:
            diff = compare_range(fa, fb, s, min(e, se))
            if diff is not None:
                fa.seek(diff)
                fb.seek(diff)
                raise CaseFailure(
                    "content differs first at offset %d (0x%x): qemu %s… ours %s…"
                    % (diff, diff, fa.read(8).hex(), fb.read(8).hex()))


def compare_json(expected, got, path="$"):
    """Lists differences (strings) between two JSON values, field by field."""
    diffs = []
    if isinstance(expected, dict) and isinstance(got, dict):
        for k in expected:
            if k not in got:
                diffs.append("%s.%s missing (qemu: %s)" % (path, k, json.dumps(expected[k])))
            else:
                diffs += compare_json(expected[k], got[k], "%s.%s" % (path, k))
        for k in got:
            if k not in expected:
                diffs.append("%s.%s unexpected (ours: %s)" % (path, k, json.dumps(got[k])))
    elif isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            diffs.append("%s: length qemu %d, ours %d" % (path, len(expected), len(got)))
        for i, (e, g) in enumerate(zip(expected, got)):
            diffs += compare_json(e, g, "%s[%d]" % (path, i))
    else:
        # bool vs int must not compare equal (json true vs 1).
        if type(expected) is not type(got) or expected != got:
            diffs.append("%s: qemu %s, ours %s" % (path, json.dumps(expected), json.dumps(got)))
    return diffs


# --------------------------------------------------------------------------
# Cases and the JUnit report


class Case:
    def __init__(self, name, group, fn, doc=""):
        self.name = name
        self.group = group
        self.fn = fn
        self.doc = doc


def case_registry(cases, make=Case):
    """Returns the decorator @case("group/name", doc) that appends
    make(name, group, fn, doc) to `cases`."""
    def case(name, doc):
        def deco(fn):
            group, short = name.split("/")
            cases.append(make(short, group, fn, doc))
            return fn
        return deco
    return case


def parse_args(argv, suite):
    p = argparse.ArgumentParser(description="QEMU oracle test: " + suite)
    p.add_argument("binary", help="path to ublk-qcow2 (or a stand-in)")
    p.add_argument("--group", action="append", default=[],
                   help="run only cases of this group (repeatable)")
    p.add_argument("--case", action="append", default=[],
                   help="run only cases whose name contains this (repeatable)")
    p.add_argument("--list", action="store_true", help="list cases and exit")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def select(cases, args):
    out = []
    for c in cases:
        if args.group and c.group not in args.group:
            continue
        if args.case and not any(s in c.name for s in args.case):
            continue
        out.append(c)
    return out


def run_suite(suite, cases, argv, run_case):
    """Runs run_case(case, workdir, log, binary) for each case; writes the
    JUnit XML and returns the process exit code."""
    args = parse_args(argv, suite)
    chosen = select(cases, args)
    if args.list:
        for c in chosen:
            print("%-10s %s  %s" % (c.group, c.name, c.doc))
        return 0
    if not chosen:
        print("no cases selected", file=sys.stderr)
        return 2
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        print("binary not executable: %s" % binary, file=sys.stderr)
        return 2
    base = os.environ.get("TEST_TMPDIR") or os.path.join(os.getcwd(), "oracle-tmp")
    base = os.path.abspath(os.path.join(base, suite))
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    print("%s: %d case(s); binary %s; work dir %s" % (suite, len(chosen), binary, base))
    sys.stdout.flush()

    suite_el = ET.Element("testsuite", name=suite)
    failures = 0
    errors = 0
    t0 = time.monotonic()
    for case in chosen:
        workdir = os.path.join(base, case.name)
        os.makedirs(workdir)
        log = Log()
        if case.doc:
            log("# " + case.doc)
        start = time.monotonic()
        status, reason = "ok", ""
        note = None
        try:
            note = run_case(case, workdir, log, binary)
        except CaseFailure as e:
            status, reason = "FAIL", str(e)
        except SetupError as e:
            status, reason = "ERROR", str(e)
        except Exception:  # a harness bug: report, keep going
            status, reason = "ERROR", "harness exception:\n" + traceback.format_exc()
        elapsed = time.monotonic() - start
        tc = ET.SubElement(suite_el, "testcase", name=case.name,
                           classname="oracle.%s.%s" % (suite, case.group),
                           time="%.3f" % elapsed)
        if status == "FAIL":
            failures += 1
            el = ET.SubElement(tc, "failure", message=reason.split("\n")[0][:300])
            el.text = reason
        elif status == "ERROR":
            errors += 1
            el = ET.SubElement(tc, "error", message=reason.split("\n")[0][:300])
            el.text = reason
        so = ET.SubElement(tc, "system-out")
        so.text = log.text()
        first = reason.split("\n")[0]
        print("%-5s %s/%s (%.1fs)%s" % (status, case.group, case.name, elapsed,
                                        (": " + first) if first else ""))
        if note:
            print("      " + note)
        if status != "ok":
            for line in reason.split("\n")[1:]:
                print("      " + line)
            for line in log.lines:
                print("      | " + line)
        sys.stdout.flush()
        if status == "ok" and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - t0
    suite_el.set("tests", str(len(chosen)))
    suite_el.set("failures", str(failures))
    suite_el.set("errors", str(errors))
    suite_el.set("time", "%.3f" % total)
    root = ET.Element("testsuites")
    root.append(suite_el)
    xml_path = os.environ.get("XML_OUTPUT_FILE")
    if xml_path:
        ET.ElementTree(root).write(xml_path, encoding="utf-8", xml_declaration=True)
    passed = len(chosen) - failures - errors
    print("%s: %d case(s) in %.1fs" % (suite, len(chosen), total))
    print("%s: %d passed, %d failed" % (suite, passed, failures + errors))
    return 0 if failures + errors == 0 else 1
