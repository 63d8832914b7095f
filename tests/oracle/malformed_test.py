#!/usr/bin/python3
"""CLI-level bad input: each case makes a valid image with qemu-img, corrupts
it (header fields are big-endian; see oracle_lib.HDR), and expects from both
`ublk-qcow2 info --output=json IMG` and `ublk-qcow2 convert -O raw IMG OUT`:

  * exit status exactly 1 (no signal, no timeout: 20 s each),
  * exactly one line on stderr, starting `ublk-qcow2: `, that names the image
    (its file name; for backing-file problems the backing file's name is
    accepted too), plus case-specific words (the feature's name, "encrypt").

Where a corruption lies only in the data mapping (an L1 or L2 entry), `info`
never needs to read it, so info may succeed (exit 0 with JSON) or fail as
above; convert must fail.  Likewise plain `info` does not open backing or
external data files (qemu-img info does not either), so for a missing or
looping backing file / missing data file plain info may succeed, while
`info --backing-chain` (backing cases) and convert must fail.  What qemu-img says on the same image is recorded
in each case's log for comparison (it is not the oracle here: QEMU reads
several of these images happily, e.g. an L2 table past EOF reads as zeros).

Usage: malformed_test.py BINARY [--case SUBSTR]... [--list] [--keep]
"""

import json
import os
import re
import struct
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import Case, CaseFailure, SetupError  # noqa: E402

K = 1024
M = K * K
G = K * M
T = K * G

TIMEOUT = 20
CLUSTER = 64 * K


class Expect:
    def __init__(self, image, info="fail", names=None, words=(), convert="fail",
                 chain_info=None, forced_qcow2=False):
        self.image = image            # path relative to the case directory
        # Files without the qcow2 magic probe as raw, as with qemu-img; the
        # failure is then required when the caller insists on qcow2 (-f qcow2).
        self.forced_qcow2 = forced_qcow2
        self.info = info              # "fail" or "any"
        self.convert = convert        # "fail" or "any"
        self.chain_info = chain_info  # None (not run), "fail" or "any": info --backing-chain
        self.names = names or [os.path.basename(image)]  # any one must appear
        self.words = list(words)      # each entry: regex, all must match (case-insensitive)


def valid_image(b, name="bad.qcow2", size=16 * M, opts=None):
    """A 64k-cluster image with data in L2 table 0, one compressed cluster at 1 MiB."""
    o = {"cluster_size": CLUSTER}
    o.update(opts or {})
    b.create(name, size, opts=o)
    b.io(name, ("noise", 0, 200 * K), "write -c -P 0x42 %d %d" % (M, CLUSTER),
         ("noise", 8 * M, 100 * K))
    return b.path(name)


CASES = []


def case(name, doc=""):
    def deco(fn):
        CASES.append(Case(name, "malformed", fn, doc))
        return fn
    return deco


def header_case(name, doc, field, value, **expect):
    def fn(b):
        p = valid_image(b)
        L.hdr_set(p, field, value(p) if callable(value) else value)
        return Expect("bad.qcow2", **expect)
    CASES.append(Case(name, "malformed", fn, doc))


@case("truncated_header_50_bytes", "the first 50 bytes of a valid image")
def _(b):
    p = valid_image(b)
    with open(p, "r+b") as f:
        f.truncate(50)
    return Expect("bad.qcow2")


@case("empty_file", "a 0-byte file: probes as raw (like qemu-img); -f qcow2 must fail")
def _(b):
    b.raw("bad.qcow2", 0)
    return Expect("bad.qcow2", forced_qcow2=True)


header_case("bad_magic", "magic changed: probes as raw (like qemu-img); -f qcow2 must fail",
            "magic", 0x584649FB, forced_qcow2=True)
header_case("version_1", "version 1", "version", 1)
header_case("version_4", "version 4", "version", 4)
header_case("cluster_bits_8", "256-byte clusters", "cluster_bits", 8)
header_case("cluster_bits_22", "4 MiB clusters (qcow2 stops at 2 MiB)", "cluster_bits", 22)
header_case("header_length_100_v3", "v3 header_length below 104", "header_length", 100)
header_case("header_length_105_v3", "v3 header_length not a multiple of 8", "header_length", 105)
header_case("l1_offset_past_eof", "l1_table_offset = 1 TiB (aligned, past EOF)",
            "l1_table_offset", T)
header_case("l1_offset_misaligned", "l1_table_offset not cluster aligned",
            "l1_table_offset", lambda p: L.hdr_get(p, "l1_table_offset") + 512)
header_case("l1_size_huge", "l1_size = 0x7fffffff", "l1_size", 0x7FFFFFFF)
header_case("refcount_table_clusters_huge", "refcount_table_clusters = 0xffffff",
            "refcount_table_clusters", 0xFFFFFF)
header_case("refcount_table_offset_misaligned", "refcount_table_offset not cluster aligned",
            "refcount_table_offset", lambda p: L.hdr_get(p, "refcount_table_offset") + 8)
header_case("refcount_order_7", "refcount_order 7 (128-bit refcounts)", "refcount_order", 7)
header_case("backing_file_offset_past_eof", "backing_file_offset/size point past EOF",
            "backing_file_offset", T)
header_case("nb_snapshots_huge", "nb_snapshots = 0xffffffff (no snapshot table)",
            "nb_snapshots", 0xFFFFFFFF)


@case("l1_size_too_small", "8 GiB image whose L1 has 1 entry (it needs 16)")
def _(b):
    p = valid_image(b, size=8 * G)
    L.hdr_set(p, "l1_size", 1)
    return Expect("bad.qcow2")


@case("l2_offset_misaligned", "L1[0] points at an L2 table 512 bytes off cluster alignment")
def _(b):
    p = valid_image(b)
    l1 = L.hdr_get(p, "l1_table_offset")
    e = L.read_be(p, l1, 8)
    if not e & 0x00FFFFFFFFFFFE00:
        raise SetupError("L1[0] unused")
    L.write_be(p, l1, 8, e + 512)
    return Expect("bad.qcow2", info="any")


@case("l2_offset_past_eof", "L1[0] points at an L2 table at 1 TiB (past EOF)")
def _(b):
    p = valid_image(b)
    l1 = L.hdr_get(p, "l1_table_offset")
    e = L.read_be(p, l1, 8)
    L.write_be(p, l1, 8, (e & (1 << 63)) | T)
    return Expect("bad.qcow2", info="any")


@case("compressed_cluster_past_eof", "the L2 entry of a compressed cluster points past EOF")
def _(b):
    p = valid_image(b)
    l1 = L.hdr_get(p, "l1_table_offset")
    l2 = L.read_be(p, l1, 8) & 0x00FFFFFFFFFFFE00
    slot = l2 + 8 * (M // CLUSTER)
    e = L.read_be(p, slot, 8)
    if not e & (1 << 62):
        raise SetupError("cluster at 1 MiB is not compressed (entry %x)" % e)
    x = 62 - (16 - 8)   # offset bits for 64k clusters
    offset_mask = (1 << x) - 1
    L.write_be(p, slot, 8, (e & ~offset_mask) | (T + 1234))
    return Expect("bad.qcow2", info="any")


@case("incompatible_bit20_unnamed", "unknown incompatible feature bit 20, no name in the table")
def _(b):
    p = valid_image(b)
    L.hdr_set(p, "incompatible_features", L.hdr_get(p, "incompatible_features") | (1 << 20))
    return Expect("bad.qcow2", words=[r"(\b20\b|0x0*100000\b|\b100000\b)"])


FEATURE_NAME = b"oracle test feature"


@case("incompatible_bit20_named",
      "unknown incompatible bit 20 named in the feature name table ('%s')" % FEATURE_NAME.decode())
def _(b):
    p = valid_image(b)

    def rename(exts):
        out = []
        done = False
        for typ, data in exts:
            if typ == L.EXT_FEATURE_TABLE and not done:
                entries = [bytearray(data[i:i + 48]) for i in range(0, len(data), 48)]
                for ent in entries:
                    # Repurpose the "extended L2" entry (incompatible bit 4; unused here).
                    if ent[0] == 0 and ent[1] == 4:
                        ent[1] = 20
                        ent[2:48] = FEATURE_NAME.ljust(46, b"\0")
                        done = True
                data = b"".join(bytes(e) for e in entries)
            out.append((typ, data))
        if not done:
            raise SetupError("no feature name table entry for incompatible bit 4")
        return out

    L.rewrite_extensions(p, rename)
    L.hdr_set(p, "incompatible_features", L.hdr_get(p, "incompatible_features") | (1 << 20))
    return Expect("bad.qcow2", words=[re.escape(FEATURE_NAME.decode())])


@case("encrypted_aes_crypt_method_1", "crypt_method = 1 (legacy AES), no key given: info shows "
      "it (as qemu-img info), reading it needs the passphrase")
def _(b):
    p = valid_image(b)
    L.hdr_set(p, "crypt_method", 1)
    return Expect("bad.qcow2", info="any", words=[r"encrypted \(AES\)", r"passphrase"])


@case("encrypted_method_3", "crypt_method = 3 (no such method)")
def _(b):
    p = valid_image(b)
    L.hdr_set(p, "crypt_method", 3)
    return Expect("bad.qcow2", words=[r"Unsupported encryption method 3"])


@case("encrypted_luks", "a real LUKS-encrypted qcow2 image (crypt_method 2), no key given: "
      "info shows it (as qemu-img info), reading it needs the passphrase")
def _(b):
    # A short PBKDF iteration time keeps this fast.
    b.qemu_img_luks_create("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=oracle",
                           "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                           "bad.qcow2", "4M")
    return Expect("bad.qcow2", info="any", words=[r"encrypted", r"passphrase"])


@case("backing_loop_two", "a.qcow2 backed by b.qcow2 backed by a.qcow2")
def _(b):
    b.create("a.qcow2", 4 * M)
    b.create("b.qcow2", 4 * M, backing="a.qcow2", backing_fmt="qcow2")
    b.qemu_img("rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", "a.qcow2")
    return Expect("a.qcow2", names=["a.qcow2", "b.qcow2"], info="any", chain_info="fail")


@case("backing_loop_self", "a.qcow2 backed by itself")
def _(b):
    b.create("a.qcow2", 4 * M)
    b.qemu_img("rebase", "-u", "-F", "qcow2", "-b", "a.qcow2", "a.qcow2")
    return Expect("a.qcow2", info="any", chain_info="fail")


@case("backing_missing", "the backing file does not exist")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.create("top.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    os.unlink(b.path("base.qcow2"))
    return Expect("top.qcow2", names=["top.qcow2", "base.qcow2"], info="any",
                  chain_info="fail")


@case("backing_missing_deep", "the base of a three-level chain does not exist")
def _(b):
    b.create("base.qcow2", 4 * M)
    b.create("mid.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    b.create("top.qcow2", 4 * M, backing="mid.qcow2", backing_fmt="qcow2")
    os.unlink(b.path("base.qcow2"))
    return Expect("top.qcow2", names=["top.qcow2", "mid.qcow2", "base.qcow2"], info="any",
                  chain_info="fail")


@case("backing_name_too_long", "backing_file_size 1100 (qcow2 allows at most 1023)")
def _(b):
    p = valid_image(b)
    name = ("x" * 1094 + ".qcow2").encode()  # 1100 bytes
    off = 4096  # unused space in the 64 KiB header cluster
    L.write_bytes(p, off, name)
    L.hdr_set(p, "backing_file_offset", off)
    L.hdr_set(p, "backing_file_size", len(name))
    return Expect("bad.qcow2")


@case("snapshots_offset_past_eof", "one snapshot, snapshots_offset = 1 TiB")
def _(b):
    p = valid_image(b)
    b.snapshot("bad.qcow2", "s1")
    L.hdr_set(p, "snapshots_offset", T)
    return Expect("bad.qcow2")


@case("snapshots_offset_misaligned", "one snapshot, snapshots_offset + 8")
def _(b):
    p = valid_image(b)
    b.snapshot("bad.qcow2", "s1")
    L.hdr_set(p, "snapshots_offset", L.hdr_get(p, "snapshots_offset") + 8)
    return Expect("bad.qcow2")


@case("nb_snapshots_huge_with_table", "one real snapshot, nb_snapshots = 0xffffffff")
def _(b):
    p = valid_image(b)
    b.snapshot("bad.qcow2", "s1")
    L.hdr_set(p, "nb_snapshots", 0xFFFFFFFF)
    return Expect("bad.qcow2")


@case("data_file_missing", "external data file deleted")
def _(b):
    b.create("bad.qcow2", 4 * M, opts={"data_file": "bad.data"})
    b.io("bad.qcow2", "write -P 1 0 4096")
    os.unlink(b.path("bad.data"))
    return Expect("bad.qcow2", names=["bad.qcow2", "bad.data"], info="any")


@case("data_file_bit_without_extension", "incompatible bit 2 (external data file) but no name")
def _(b):
    p = valid_image(b)
    L.hdr_set(p, "incompatible_features", L.hdr_get(p, "incompatible_features") | 4)
    return Expect("bad.qcow2", info="any")


# --------------------------------------------------------------------------


# -- the bitmap directory: qemu-img refuses each of these when it opens the
# image. Our info reads the directory and must fail; convert does not read it
# yet (the engine opens images without it), so it may succeed.

def bitmap_image(b):
    p = valid_image(b)
    b.qemu_img("bitmap", "--add", "bad.qcow2", "first")
    b.qemu_img("bitmap", "--add", "-g", "1M", "bad.qcow2", "second")
    return p


def bitmap_case(name, doc, patch, words=("bitmap",)):
    def fn(b):
        p = bitmap_image(b)
        patch(p, L.bitmap_entries(p))
        return Expect("bad.qcow2", convert="any", words=words)
    CASES.append(Case(name, "malformed", fn, doc))


def _bitmaps_ext(p):
    return [off for typ, off, _ in L.header_extensions(p) if typ == L.EXT_BITMAPS][0]


bitmap_case("bitmap_reserved_flag", "bitmap flags with reserved bit 2 set",
            lambda p, e: L.write_be(p, e[0] + 12, 4, 2 | 4))
bitmap_case("bitmap_granularity_bits_8", "granularity_bits 8 (QEMU allows 9 to 31)",
            lambda p, e: L.write_be(p, e[1] + 17, 1, 8))
bitmap_case("bitmap_granularity_bits_32", "granularity_bits 32 (QEMU allows 9 to 31)",
            lambda p, e: L.write_be(p, e[1] + 17, 1, 32))
bitmap_case("bitmap_type_2", "bitmap type 2 (only 1, dirty tracking, exists)",
            lambda p, e: L.write_be(p, e[0] + 16, 1, 2))
bitmap_case("bitmap_table_misaligned", "bitmap table offset 512 bytes off cluster alignment",
            lambda p, e: L.write_be(p, e[0], 8, L.read_be(p, e[0], 8) + 512))
bitmap_case("bitmap_table_size_0", "bitmap table size 0",
            lambda p, e: L.write_be(p, e[1] + 8, 4, 0))
bitmap_case("bitmap_table_too_small", "a bitmap not in use whose table cannot cover the disk",
            lambda p, e: (L.write_be(p, e[0] + 17, 1, 9), L.hdr_set(p, "size", 512 * M)))
bitmap_case("bitmap_name_past_directory", "the last name runs past the directory's end",
            lambda p, e: L.write_be(p, e[1] + 18, 2, 200))
bitmap_case("bitmap_name_1024", "name_size 1024 (QEMU allows 1023)",
            lambda p, e: L.write_be(p, e[1] + 18, 2, 1024))
bitmap_case("bitmap_extra_data", "extra_data_size 8 (QEMU supports none)",
            lambda p, e: L.write_be(p, e[0] + 20, 4, 8))
bitmap_case("bitmap_count_more", "the extension says 3 bitmaps, the directory holds 2",
            lambda p, e: L.write_be(p, _bitmaps_ext(p) + 8, 4, 3))
bitmap_case("bitmap_count_fewer", "the extension says 1 bitmap, the directory holds 2",
            lambda p, e: L.write_be(p, _bitmaps_ext(p) + 8, 4, 1))
bitmap_case("bitmap_duplicate_name", "two bitmaps named 'first'",
            lambda p, e: (L.write_be(p, e[1] + 18, 2, 5), L.write_bytes(p, e[1] + 24, b"first")))


def first_line(text):
    lines = text.strip().split("\n")
    return lines[0] if lines and lines[0] else ""


QEMU_TIMEOUT = 5  # qemu-img spins on backing loops; it is only recorded


def qemu_record(b, log, exp):
    """What qemu-img says about the same image (logged, and returned as one line)."""
    out = []
    image = exp.image
    variants = [("info", [])] + ([("info --backing-chain", ["--backing-chain"])]
                                 if exp.chain_info else [])
    for label, extra in variants:
        q = L.run([L.QEMU_IMG, "info", "-f", "qcow2", "--output=json"] + extra + [image],
                  b.cwd, log, timeout=QEMU_TIMEOUT)
        out.append("%s %s%s" % (label, q.describe(), (": " + first_line(q.err)) if q.rc else ""))
    os.makedirs(b.path("out"), exist_ok=True)
    q = L.run([L.QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", image, "out/qemu.raw"],
              b.cwd, log, timeout=QEMU_TIMEOUT)
    out.append("convert %s%s" % (q.describe(), (": " + first_line(q.err)) if q.rc else ""))
    for f in ("out/qemu.raw",):
        try:
            os.unlink(b.path(f))
        except FileNotFoundError:
            pass
    return "; ".join(out)


def check_failure(label, res, exp, problems):
    if res.timed_out or res.killed_reason:
        problems.append("%s: %s" % (label, res.describe()))
        return
    if res.signal:
        problems.append("%s: crashed (%s)" % (label, res.describe()))
        return
    if res.rc != 1:
        problems.append("%s: exit %d, want 1 (stdout %r)" % (label, res.rc, res.out[:200]))
        return
    err = res.err
    lines = err.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != 1:
        problems.append("%s: want exactly one stderr line, got %d: %r"
                        % (label, len(lines), err[:400]))
        return
    line = lines[0]
    if not line.startswith("ublk-qcow2: "):
        problems.append("%s: stderr does not start with 'ublk-qcow2: ': %r" % (label, line))
    if not any(n in line for n in exp.names):
        problems.append("%s: message names none of %s: %r" % (label, exp.names, line))
    for w in exp.words:
        if not re.search(w, line, re.IGNORECASE):
            problems.append("%s: message lacks /%s/: %r" % (label, w, line))


def run_case(c, workdir, log, binary):
    b = L.Builder(workdir, log, sum(map(ord, c.name)))
    exp = c.fn(b)
    log("expect: info %s, info --backing-chain %s, convert %s; names %s; words %s"
        % (exp.info, exp.chain_info or "(not run)", exp.convert, exp.names, exp.words))
    qemu = qemu_record(b, log, exp)
    log("qemu-img says: " + qemu)
    problems = []

    fmt = ["-f", "qcow2"] if exp.forced_qcow2 else []
    if exp.forced_qcow2:
        res = L.run([binary, "info", "--output=json", exp.image], workdir, log, timeout=TIMEOUT)
        if res.rc != 0 or json.loads(res.out or "{}").get("format") != "raw":
            problems.append("probe: want exit 0 and format raw, got %s %r" % (res.rc, res.out[:200]))
    variants = [("info", fmt, exp.info)]
    if exp.chain_info:
        variants.append(("info --backing-chain", ["--backing-chain"], exp.chain_info))
    for label, extra, want in variants:
        res = L.run([binary, "info", "--output=json"] + extra + [exp.image], workdir, log,
                    timeout=TIMEOUT)
        if want == "any" and res.rc == 0 and not res.timed_out:
            try:
                json.loads(res.out)
                log("our %s succeeded (allowed here)" % label)
            except ValueError:
                problems.append("%s: exit 0 but stdout is not JSON: %r" % (label, res.out[:200]))
        else:
            check_failure(label, res, exp, problems)

    os.makedirs(b.path("out"), exist_ok=True)
    out = "out/ours.raw"
    res = L.run([binary, "convert"] + fmt + ["-O", "raw", exp.image, out], workdir, log,
                timeout=TIMEOUT, watch=out, max_alloc=256 * M)
    if exp.convert == "any" and res.rc == 0 and not res.timed_out:
        log("our convert succeeded (allowed here)")
    else:
        check_failure("convert", res, exp, problems)
    if os.path.exists(b.path(out)):
        log("note: convert left %s behind (%d bytes)" % (out, os.path.getsize(b.path(out))))
        os.unlink(b.path(out))
    if problems:
        raise CaseFailure("\n".join(problems) + "\n(qemu-img: %s)" % qemu)
    return "qemu-img: " + qemu


if __name__ == "__main__":
    sys.exit(L.run_suite("malformed", CASES, sys.argv[1:], run_case))
