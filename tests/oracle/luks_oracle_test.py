#!/usr/bin/python3
"""LUKS-encrypted qcow2 images: ours against qemu-img / qemu-io (QEMU 7.2).

Images are created by qemu-img with `-o encrypt.format=luks,...` (the
ciphers, modes, IV generators and hashes Debian 12's qemu-img creates: AES,
and on nettle AES-192 in XTS, Serpent, Twofish and CAST5) and
written by qemu-io through `--object secret --image-opts`. Then:

  * read: `ublk-qcow2 convert --key-file K -O raw` must equal, byte for
    byte, `qemu-img convert --object secret,... --image-opts ... -O raw`
    (the IVs number sectors by their *host* offset, which only a matching
    read of data QEMU wrote proves);
  * info: `info --output=json` and the human form equal qemu-img info's
    (the encrypt block: cipher, mode, ivgen, hashes, uuid, key slots);
  * errors: a wrong passphrase, no key, a damaged LUKS header or key slot, a
    hostile iteration count: one stderr line naming the file, exit 1, the
    passphrase in no message, the image unchanged.

QEMU's PBKDF2 timing probe needs an exact CPU clock ("Unable to get accurate CPU
usage" otherwise): oracle_lib preloads one into qemu-img (tests/qemu/).

Usage: luks_oracle_test.py BINARY [--group G] [--case SUBSTR]... [--list] [--keep]
"""

import hashlib
import json
import os
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import oracle_lib as L  # noqa: E402
from oracle_lib import Case, CaseFailure, SetupError  # noqa: E402

K = 1 << 10
M = 1 << 20
TIMEOUT = 120
PASS = "oracle-Pass phrase\n7"  # a newline inside: the key file is taken whole
SECRET = "secret,id=sec0,file=key"

CASES = []
case = L.case_registry(CASES, Case)


def image_opts(img, extra=""):
    return "driver=qcow2,file.filename=%s,encrypt.key-secret=sec0%s" % (img, extra)


def write_key(b):
    with open(b.path("key"), "w") as f:
        f.write(PASS)


def create_luks(b, name, size, enc=None, opts=None, backing=None):
    """qemu-img create with LUKS, retried (QEMU's CPU-time probe is flaky)."""
    write_key(b)
    o = {"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.iter-time": 10}
    o.update(enc or {})
    o.update(opts or {})
    argv = ["create", "-q", "-f", "qcow2", "--object", SECRET,
            "-o", ",".join("%s=%s" % kv for kv in o.items())]
    if backing:
        argv += ["-b", backing, "-F", "qcow2" if backing.endswith("qcow2") else "raw"]
    argv += [name, str(size)]
    b.qemu_img_luks_create(*argv)
    return name


def qio(b, img, *cmds, extra=""):
    """qemu-io commands on an encrypted image (noise tuples as Builder.io)."""
    argv = [L.QEMU_IO, "--object", SECRET, "--image-opts"]
    for c in cmds:
        if isinstance(c, tuple):
            _, off, length = c
            c = "write -s %s %d %d" % (b.noise_file(length), off, length)
        argv += ["-c", c]
    argv.append(image_opts(img, extra))
    res = L.must(argv, b.cwd, b.log)
    text = res.out + res.err
    for bad in ("error", "Error", "failed", "Failed"):
        if bad in text:
            raise SetupError("qemu-io reported a failure: %s" % text.strip()[:500])


def pattern(b, img, cs, size):
    """Data at and across cluster boundaries, partial sectors, zeros, discards."""
    qio(b, img, ("noise", 0, cs), ("noise", 3 * cs + cs // 2, cs),
        "write -P 0x22 %d %d" % (8 * cs, 4 * cs), "write -z %d %d" % (9 * cs, cs),
        "write -P 0x33 %d 700" % (14 * cs + 100), "discard %d %d" % (10 * cs, cs),
        "write -P 0x44 %d %d" % (size - 2 * cs, 2 * cs))


def ours(binary, b, *args, timeout=TIMEOUT):
    return L.run([binary] + [str(a) for a in args], b.cwd, b.log, timeout=timeout)


def expect_same_view(binary, b, img, extra=""):
    """qemu-img convert and ours, both to raw: identical bytes."""
    L.must([L.QEMU_IMG, "convert", "--object", SECRET, "--image-opts", image_opts(img, extra),
            "-O", "raw", "qemu.raw"], b.cwd, b.log)
    res = ours(binary, b, "convert", "--key-file", "key", "-O", "raw", img, "ours.raw")
    if res.rc != 0:
        raise CaseFailure("our convert failed (exit %s): %s" % (res.rc, res.err.strip()))
    L.compare_raw(b.path("qemu.raw"), b.path("ours.raw"))


def expect_same_info(binary, b, img):
    q = L.must([L.QEMU_IMG, "info", "--output=json", img], b.cwd, b.log)
    o = ours(binary, b, "info", "--output=json", img)
    if o.rc != 0:
        raise CaseFailure("our info failed: %s" % o.err.strip())
    diffs = L.compare_json(json.loads(q.out), json.loads(o.out))
    if q.out != o.out and not diffs:
        diffs = ["JSON text differs (key order?)"]
    qh = L.must([L.QEMU_IMG, "info", img], b.cwd, b.log)
    oh = ours(binary, b, "info", img)
    if qh.out != oh.out:
        diffs.append("human info differs:\n--- qemu\n%s--- ours\n%s" % (qh.out, oh.out))
    if diffs:
        raise CaseFailure("info: " + "\n".join(diffs))


def read_case(enc=None, opts=None, size=16 * M, cs=64 * K):
    def fn(binary, b):
        create_luks(b, "a.qcow2", size, enc, dict(opts or {}, cluster_size=cs))
        pattern(b, "a.qcow2", cs, size)
        expect_same_view(binary, b, "a.qcow2")
        expect_same_info(binary, b, "a.qcow2")
    return fn


# --------------------------------------------------------------------------
# The cipher matrix: what QEMU offers and libcrypto has.

CIPHERS = [
    ("aes-256", "xts", "plain64", None, "sha256"),  # QEMU's default
    ("aes-128", "xts", "plain64", None, "sha256"),
    ("aes-128", "xts", "plain", None, "sha1"),
    ("aes-256", "xts", "essiv", "sha256", "sha512"),
    ("aes-128", "cbc", "plain64", None, "sha256"),
    ("aes-128", "cbc", "plain", None, "sha256"),
    ("aes-256", "cbc", "essiv", "sha256", "sha1"),
    ("aes-128", "cbc", "essiv", "md5", "sha256"),
    ("aes-256", "ctr", "plain64", None, "sha384"),
    ("aes-256", "ecb", "plain64", None, "sha224"),
    ("aes-256", "xts", "plain64", None, "ripemd160"),
    # On nettle (libcrypto lacks them). QEMU 7.2 aborts creating any 192-bit
    # key outside XTS (its 24 * 4000 bytes of key material are not whole
    # sectors), so 192 appears in XTS only.
    ("aes-192", "xts", "plain64", None, "sha256"),
    ("aes-192", "xts", "essiv", "sha256", "sha1"),
    ("cast5-128", "cbc", "plain64", None, "sha256"),
    ("cast5-128", "cbc", "essiv", "md5", "sha1"),
    ("cast5-128", "ctr", "plain", None, "sha256"),
    ("cast5-128", "ecb", "plain64", None, "sha512"),
]
for fam in ("serpent", "twofish"):
    CIPHERS += [
        (fam + "-128", "xts", "plain64", None, "sha256"),
        (fam + "-192", "xts", "plain64", None, "sha1"),
        (fam + "-256", "xts", "plain", None, "sha512"),
        (fam + "-256", "xts", "essiv", "sha256", "sha256"),
        (fam + "-128", "cbc", "plain64", None, "sha256"),
        (fam + "-256", "cbc", "essiv", "sha256", "sha256"),
        (fam + "-128", "cbc", "essiv", "md5", "sha224"),
        (fam + "-128", "ctr", "plain64", None, "sha384"),
        (fam + "-256", "ctr", "plain64", None, "sha256"),
        (fam + "-128", "ecb", "plain64", None, "ripemd160"),
        (fam + "-256", "ecb", "plain64", None, "sha256"),
    ]

for alg, mode, ivgen, ivhash, hash_alg in CIPHERS:
    enc = {"encrypt.cipher-alg": alg, "encrypt.cipher-mode": mode, "encrypt.ivgen-alg": ivgen,
           "encrypt.hash-alg": hash_alg}
    if ivhash:
        enc["encrypt.ivgen-hash-alg"] = ivhash
    name = "%s-%s-%s%s-%s" % (alg, mode, ivgen, (":" + ivhash) if ivhash else "", hash_alg)
    case("ciphers/" + name, "created and written by QEMU, read byte for byte")(
        read_case(enc))

@case("ciphers/cast5-xts_refused", "CAST5 in XTS (an 8-byte block): QEMU refuses to create "
      "it; a header naming it (patched in) is refused cleanly, info still shows it")
def _(binary, b):
    create_luks(b, "a.qcow2", 4 * M, {"encrypt.cipher-alg": "aes-128"})
    area = luks_area(b.path("a.qcow2"))
    with open(b.path("a.qcow2"), "r+b") as f:
        f.seek(area + 8)
        f.write(b"cast5\x00")
    expect_error(binary, b, "a.qcow2",
                 ["convert", "--key-file", "key", "-O", "raw", "a.qcow2", "x.raw"],
                 ["cipher cast5-128 in xts mode is not supported"])


# --------------------------------------------------------------------------
# Geometry

for cs in (512, 4 * K, 2 * M):
    case("clusters/cs%d" % cs, "cluster_size=%d" % cs)(
        read_case(cs=cs, size=max(16 * M, 20 * cs)))

case("clusters/extl2_64k", "extended L2, 64 KiB clusters (partial subclusters)")(
    read_case(opts={"extended_l2": "on"}))
case("clusters/extl2_16k", "extended L2, 16 KiB clusters (512-byte subclusters)")(
    read_case(opts={"extended_l2": "on"}, cs=16 * K))


@case("chain/encrypted_over_plain", "an encrypted overlay over a plain qcow2 base")
def _(binary, b):
    b.create("base.qcow2", 8 * M)
    b.io("base.qcow2", ("noise", 0, 4 * M), "write -P 0x77 6M 1M")
    create_luks(b, "top.qcow2", 8 * M, backing="base.qcow2")
    qio(b, "top.qcow2", "write -P 0x11 64k 64k", "write -P 0x12 3000 1000", "write -z 6M 64k")
    expect_same_view(binary, b, "top.qcow2")
    expect_same_info(binary, b, "top.qcow2")


@case("chain/plain_over_encrypted", "a plain overlay over an encrypted base (the same key)")
def _(binary, b):
    create_luks(b, "base.qcow2", 8 * M)
    qio(b, "base.qcow2", ("noise", 0, 2 * M), "write -P 0x66 5M 100k")
    b.create("top.qcow2", 8 * M, backing="base.qcow2", backing_fmt="qcow2")
    L.must([L.QEMU_IO, "--object", SECRET, "--image-opts",
            "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=sec0",
            "-c", "write -P 0x21 1M 64k"], b.cwd, b.log)
    L.must([L.QEMU_IMG, "convert", "--object", SECRET, "--image-opts",
            "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=sec0",
            "-O", "raw", "qemu.raw"], b.cwd, b.log)
    res = ours(binary, b, "convert", "--key-file", "key", "-O", "raw", "top.qcow2", "ours.raw")
    if res.rc != 0:
        raise CaseFailure("our convert failed: %s" % res.err.strip())
    L.compare_raw(b.path("qemu.raw"), b.path("ours.raw"))


@case("chain/compare_map", "compare and map on an encrypted image go through the key")
def _(binary, b):
    create_luks(b, "a.qcow2", 4 * M)
    qio(b, "a.qcow2", "write -P 0x5a 0 1M")
    b.raw("same.raw", 4 * M, [(0, b"\x5a" * M)])
    res = ours(binary, b, "compare", "--key-file", "key", "a.qcow2", "same.raw")
    if res.rc != 0 or "identical" not in res.out:
        raise CaseFailure("compare: exit %s %s %s" % (res.rc, res.out, res.err))
    q = L.must([L.QEMU_IMG, "map", "--output=json", "--object", SECRET, "--image-opts",
                image_opts("a.qcow2")], b.cwd, b.log)
    o = ours(binary, b, "map", "--output=json", "--key-file", "key", "a.qcow2")
    if o.out != q.out:
        raise CaseFailure("map differs:\n%s\n%s" % (q.out, o.out))


# --------------------------------------------------------------------------
# Writes: ours write, qemu-img reads the same bytes and check is clean.


def qemu_view(b, img, out, extra=""):
    L.must([L.QEMU_IMG, "convert", "--object", SECRET, "--image-opts", image_opts(img, extra),
            "-O", "raw", out], b.cwd, b.log)


def qemu_check(b, img):
    res = L.run([L.QEMU_IMG, "check", "--object", SECRET, "--image-opts", image_opts(img)],
                b.cwd, b.log)
    if res.rc != 0:
        raise CaseFailure("qemu-img check: exit %s\n%s%s" % (res.rc, res.out, res.err))


def bench_case(cs, extra_opts=None, size=4 * K, step=None, offset=0, count=300):
    def fn(binary, b):
        create_luks(b, "a.qcow2", 8 * M, opts=dict(extra_opts or {}, cluster_size=cs))
        qio(b, "a.qcow2", ("noise", 0, 8 * M))  # old data around every write (COW)
        qemu_view(b, "a.qcow2", "before.raw")
        st = step or size
        for pattern, off in ((0x5a, offset), (0xa5, offset + size // 2)):
            res = ours(binary, b, "bench", "-q", "--key-file", "key", "-w", "--pattern", pattern,
                       "-c", count, "-d", 16, "-s", size, "-S", st, "-o", off, "a.qcow2")
            if res.rc != 0:
                raise CaseFailure("bench -w: exit %s %s" % (res.rc, res.err.strip()))
        with open(b.path("before.raw"), "rb") as f:
            expect = bytearray(f.read())
        for pattern, off in ((0x5a, offset), (0xa5, offset + size // 2)):
            for i in range(count):
                at = off + i * st
                end = min(at + size, len(expect))
                if at < len(expect):
                    expect[at:end] = bytes([pattern]) * (end - at)
        with open(b.path("expect.raw"), "wb") as f:
            f.write(expect)
        qemu_view(b, "a.qcow2", "after.raw")
        L.compare_raw(b.path("expect.raw"), b.path("after.raw"))
        qemu_check(b, "a.qcow2")
        expect_same_view(binary, b, "a.qcow2")
    return fn


case("writes/in_place_64k", "4 KiB writes into allocated clusters (in place)")(
    bench_case(64 * K))
case("writes/unaligned_cs4k", "1000-byte writes at odd offsets: read-modify-write of sectors")(
    bench_case(4 * K, size=1000, step=3001, offset=77, count=200))
case("writes/extl2_32k", "extended L2: subcluster-sized writes")(
    bench_case(32 * K, {"extended_l2": "on"}, size=1024, step=5 * K, count=200))


@case("writes/commit_into_encrypted", "commit a plain overlay into an encrypted base: "
      "allocating writes with copy-on-write, re-encrypted at their new host offsets")
def _(binary, b):
    create_luks(b, "base.qcow2", 8 * M, opts={"cluster_size": 64 * K})
    qio(b, "base.qcow2", ("noise", 0, 3 * M), "write -P 0x66 5M 100k")
    b.create("top.qcow2", 8 * M, opts={"cluster_size": 512}, backing="base.qcow2",
             backing_fmt="qcow2")
    top_opts = "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=sec0"
    L.must([L.QEMU_IO, "--object", SECRET, "--image-opts", top_opts,
            "-c", "write -P 0x21 1000k 3k", "-c", "write -P 0x22 4M 1536",
            "-c", "write -P 0x23 7M 64k", "-c", "write -z 2M 512"], b.cwd, b.log)
    L.must([L.QEMU_IMG, "convert", "--object", SECRET, "--image-opts", top_opts,
            "-O", "raw", "expect.raw"], b.cwd, b.log)
    res = ours(binary, b, "commit", "--key-file", "key", "top.qcow2")
    if res.rc != 0:
        raise CaseFailure("commit: exit %s %s" % (res.rc, res.err.strip()))
    qemu_view(b, "base.qcow2", "after.raw")
    L.compare_raw(b.path("expect.raw"), b.path("after.raw"))
    qemu_check(b, "base.qcow2")


@case("writes/no_plaintext", "what we write is not in the file in the clear")
def _(binary, b):
    create_luks(b, "a.qcow2", 4 * M)
    res = ours(binary, b, "bench", "-q", "--key-file", "key", "-w", "--pattern", 0x61,
               "-c", 64, "-s", 64 * K, "a.qcow2")
    if res.rc != 0:
        raise CaseFailure("bench -w: exit %s %s" % (res.rc, res.err.strip()))
    with open(b.path("a.qcow2"), "rb") as f:
        if b"a" * 64 in f.read():
            raise CaseFailure("plaintext found in the image file")
    qemu_view(b, "a.qcow2", "after.raw")
    with open(b.path("after.raw"), "rb") as f:
        if f.read(4 * M) != b"a" * (4 * M):
            raise CaseFailure("qemu-img does not read back what we wrote")
    qemu_check(b, "a.qcow2")


# --------------------------------------------------------------------------
# Errors: one line, exit 1, nothing written, never the key.


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def expect_error(binary, b, img, argv, words):
    before = digest(b.path(img))
    res = ours(binary, b, *argv)
    lines = res.err.strip().split("\n")
    # compare numbers an image that will not open 2, as qemu-img compare.
    want = 2 if argv[0] == "compare" else 1
    if res.rc != want or len(lines) != 1 or not lines[0].startswith("ublk-qcow2: "):
        raise CaseFailure("%s: exit %s, stderr %r (want exit %d, one line)"
                          % (" ".join(argv), res.rc, res.err, want))
    for w in words:
        if w not in lines[0]:
            raise CaseFailure("%s: %r lacks %r" % (" ".join(argv), lines[0], w))
    if img not in lines[0]:
        raise CaseFailure("%s: %r does not name %s" % (" ".join(argv), lines[0], img))
    for secret in (PASS, PASS.split("\n")[0], "WRONG-passphrase"):
        if secret in res.err or secret in res.out:
            raise CaseFailure("the passphrase appears in the output")
    if digest(b.path(img)) != before:
        raise CaseFailure("%s changed the image" % " ".join(argv))


# The one line that asks for a key names every way to give it.
KEY_NEEDED = ("a.qcow2: the image is encrypted (LUKS): its passphrase is needed: give --key-file "
              "FILE, or --object secret,id=ID,file=FILE (and --key-secret ID to pick one of "
              "several)")


@case("errors/keys", "wrong passphrase, no key, an empty or missing key file")
def _(binary, b):
    create_luks(b, "a.qcow2", 4 * M)
    qio(b, "a.qcow2", "write -P 0x5a 0 64k")
    with open(b.path("wrong"), "w") as f:
        f.write("WRONG-passphrase")
    open(b.path("empty"), "w").close()
    for verb in (["convert", "-O", "raw"], ["compare"], ["map"], ["bench", "-c", "1"]):
        tail = ["a.qcow2", "x.raw"] if verb[0] == "convert" else (
            ["a.qcow2", "a.qcow2"] if verb[0] == "compare" else ["a.qcow2"])
        expect_error(binary, b, "a.qcow2", verb + ["--key-file", "wrong"] + tail,
                     ["Invalid password"])
        expect_error(binary, b, "a.qcow2", verb + tail, [KEY_NEEDED])
    # add opens the image before it touches ublk: no device is needed. Two
    # secrets and no --key-secret to pick one: no key either.
    for keys in ([], ["--object", "secret,id=s1,file=key", "--object", "secret,id=s2,data=x"]):
        expect_error(binary, b, "a.qcow2", ["add"] + keys + ["-f", "a.qcow2"], [KEY_NEEDED])
    res = ours(binary, b, "convert", "--key-file", "empty", "-O", "raw", "a.qcow2", "x.raw")
    if res.rc != 1 or "empty" not in res.err:
        raise CaseFailure("empty key file: exit %s %r" % (res.rc, res.err))
    res = ours(binary, b, "convert", "--key-file", "nosuch", "-O", "raw", "a.qcow2", "x.raw")
    if res.rc != 1 or "nosuch" not in res.err:
        raise CaseFailure("missing key file: exit %s %r" % (res.rc, res.err))
    # check needs no key, as qemu-img check.
    res = ours(binary, b, "check", "a.qcow2")
    if res.rc != 0:
        raise CaseFailure("check without a key: exit %s %r" % (res.rc, res.err))


def luks_area(path):
    """Offset of the LUKS header (the crypto header extension 0x0537be77)."""
    for typ, off, _ in L.header_extensions(path):
        if typ == L.EXT_CRYPTO:
            return L.read_be(path, off + 8, 8)
    raise SetupError("no crypto header extension")


DAMAGE = [
    # (name, offset in the LUKS header, bytes, words in our error)
    ("magic", 0, b"XUKS", ["bad magic"]),
    ("version", 6, b"\x00\x07", ["version 7"]),
    ("key_bytes", 108, b"\x00\x00\x10\x00", ["master key size"]),
    ("digest_iterations", 164, b"\xff\xff\xff\xff", ["iterations"]),
    ("slot0_iterations", 208 + 4, b"\x7f\xff\xff\xff", ["iterations"]),
    ("slot1_stripes", 208 + 48 + 44, b"\x00\x10\x00\x00", ["stripes"]),
    ("slot0_stripes_zero", 208 + 44, b"\x00\x00\x00\x00", ["stripes"]),
    ("slot2_offset", 208 + 96 + 40, b"\x7f\xff\xff\xff", ["outside the encryption area"]),
    ("slot3_state", 208 + 144, b"\x12\x34\x56\x78", ["neither active nor inactive"]),
    ("cipher", 8, b"blowfish\x00", ["cipher 'blowfish' is not supported"]),
    ("mode", 40, b"xts-bogus\x00", ["IV generator 'bogus'"]),
    ("hash", 72, b"whirlpool\x00", ["hash 'whirlpool'"]),
    ("digest", 112, b"\x00" * 20, ["Invalid password"]),
]


@case("errors/damaged_header", "damaged LUKS header fields: info and convert refuse cleanly")
def _(binary, b):
    create_luks(b, "orig.qcow2", 4 * M)
    qio(b, "orig.qcow2", "write -P 0x5a 0 64k")
    area = luks_area(b.path("orig.qcow2"))
    for name, off, data, words in DAMAGE:
        img = "bad-%s.qcow2" % name
        with open(b.path("orig.qcow2"), "rb") as f:
            content = bytearray(f.read())
        content[area + off:area + off + len(data)] = data
        with open(b.path(img), "wb") as f:
            f.write(content)
        expect_error(binary, b, img, ["convert", "--key-file", "key", "-O", "raw", img, "x.raw"],
                     words)
        # (qemu-img refuses most of these too; slot0_iterations it accepts and
        # runs PBKDF2 for 2^31 iterations, minutes of CPU: not run here.)


@case("errors/slot_material", "a damaged key slot: the passphrase no longer opens it")
def _(binary, b):
    create_luks(b, "a.qcow2", 4 * M)
    area = luks_area(b.path("a.qcow2"))
    with open(b.path("a.qcow2"), "r+b") as f:
        f.seek(area + 4096 + 1000)
        f.write(b"\x00" * 64)
    expect_error(binary, b, "a.qcow2",
                 ["convert", "--key-file", "key", "-O", "raw", "a.qcow2", "x.raw"],
                 ["Invalid password"])


@case("errors/area_overlap", "the crypto extension pointing at the L1 table or past the file")
def _(binary, b):
    create_luks(b, "orig.qcow2", 4 * M)
    l1 = L.hdr_get(b.path("orig.qcow2"), "l1_table_offset")
    area = luks_area(b.path("orig.qcow2"))
    for name, offset, length, words in (("l1", l1, 2 * M, ["overlaps the L1 table"]),
                                        ("past_end", 1 << 30, 2 * M, ["past the end"]),
                                        ("too_short", area, 4096, ["outside the encryption area"]),
                                        ("unaligned", area + 1, 2 * M, ["unaligned"])):
        img = "bad-%s.qcow2" % name

        def patch(exts, offset=offset, length=length):
            out = []
            for t, data in exts:
                if t == L.EXT_CRYPTO:
                    data = offset.to_bytes(8, "big") + length.to_bytes(8, "big")
                out.append((t, data))
            return out
        with open(b.path("orig.qcow2"), "rb") as f, open(b.path(img), "wb") as g:
            g.write(f.read())
        L.rewrite_extensions(b.path(img), patch)
        expect_error(binary, b, img, ["info", img], words)


# --------------------------------------------------------------------------
# Legacy AES (crypt_method 1): read-only, as QEMU's system emulators have it

def create_aes(b, name, size, cs=64 * K, key="key", backing=None):
    """qemu-img create -o encrypt.format=aes (QEMU 7.2 still creates them)."""
    argv = [L.QEMU_IMG, "create", "-q", "-f", "qcow2", "--object",
            "secret,id=sec0,file=%s" % key, "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0,cluster_size=%d" % cs]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    L.must(argv + [name, str(size)], b.cwd, b.log)
    return name


def aes_read_case(cs, key_text=None):
    def fn(binary, b):
        write_key(b)
        if key_text is not None:  # another passphrase: short (zero-padded) or long
            with open(b.path("key"), "w") as f:
                f.write(key_text)
        create_aes(b, "a.qcow2", 16 * M, cs)
        pattern(b, "a.qcow2", cs, 16 * M)
        expect_same_view(binary, b, "a.qcow2")
        expect_same_info(binary, b, "a.qcow2")
        res = ours(binary, b, "bench", "-c", "16", "--key-file", "key", "a.qcow2")
        if res.rc != 0:
            raise CaseFailure("bench (reads) failed: %s" % res.err.strip())
    return fn


case("legacy_aes/cs64k", "AES-CBC image QEMU wrote (a 20-byte passphrase: the key is its "
     "first 16 bytes): read byte for byte, info as qemu-img's")(aes_read_case(64 * K))
case("legacy_aes/cs4k_short_key", "4 KiB clusters, a 3-byte passphrase (zero-padded key)")(
    aes_read_case(4 * K, "abc"))
case("legacy_aes/cs512", "512-byte clusters: every sector its own cluster")(
    aes_read_case(512))


@case("legacy_aes/plain_over_aes", "a plain overlay over an AES base: the base's data "
      "decrypted with the guest offsets, the overlay's plain")
def _(binary, b):
    write_key(b)
    create_aes(b, "base.qcow2", 16 * M)
    pattern(b, "base.qcow2", 64 * K, 16 * M)
    b.create("top.qcow2", 16 * M, backing="base.qcow2", backing_fmt="qcow2")
    top = "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=sec0"
    L.must([L.QEMU_IO, "--object", SECRET, "--image-opts", "-c",
            "write -P 0x77 %d 4096" % (3 * 64 * K), top], b.cwd, b.log)
    L.must([L.QEMU_IMG, "convert", "--object", SECRET, "--image-opts", top, "-O", "raw",
            "qemu.raw"], b.cwd, b.log)
    res = ours(binary, b, "convert", "--key-file", "key", "-O", "raw", "top.qcow2", "ours.raw")
    if res.rc != 0:
        raise CaseFailure("our convert failed: %s" % res.err.strip())
    L.compare_raw(b.path("qemu.raw"), b.path("ours.raw"))


@case("legacy_aes/wrong_key_garbage", "a wrong passphrase: no check exists, QEMU decrypts to "
      "garbage and so do we, the same garbage")
def _(binary, b):
    write_key(b)
    create_aes(b, "a.qcow2", 4 * M)
    qio(b, "a.qcow2", "write -P 0x5a 0 256k")
    with open(b.path("key"), "w") as f:
        f.write("WRONG-passphrase")
    expect_same_view(binary, b, "a.qcow2")
    with open(b.path("ours.raw"), "rb") as f:
        if f.read(512) == b"\x5a" * 512:
            raise CaseFailure("a wrong key read the plaintext")


@case("legacy_aes/refusals", "writing an AES image (resize, commit into it, add without "
      "--read-only) and reading it without a key: one line, exit 1, image unchanged")
def _(binary, b):
    write_key(b)
    create_aes(b, "a.qcow2", 4 * M)
    qio(b, "a.qcow2", "write -P 0x5a 0 64k")
    b.create("top.qcow2", 4 * M, backing="a.qcow2", backing_fmt="qcow2")
    writing = ["AES-CBC encrypted qcow2 images is no longer supported for writing"]
    expect_error(binary, b, "a.qcow2", ["resize", "--key-file", "key", "a.qcow2", "8M"], writing)
    expect_error(binary, b, "a.qcow2", ["amend", "--key-file", "key", "-o", "lazy_refcounts=on",
                                        "a.qcow2"], writing)
    expect_error(binary, b, "a.qcow2", ["convert", "-O", "raw", "a.qcow2", "x.raw"],
                 [KEY_NEEDED.replace("LUKS", "AES")])
    # The check of --read-only comes before any ublk: no device is needed.
    expect_error(binary, b, "a.qcow2", ["add", "--key-file", "key", "-f", "a.qcow2"], writing)
    # check needs no key, as qemu-img check.
    res = ours(binary, b, "check", "a.qcow2")
    if res.rc != 0:
        raise CaseFailure("check without a key: exit %s %r" % (res.rc, res.err))


def run_case(c, workdir, log, binary):
    b = L.Builder(workdir, log, sum(map(ord, c.name)))
    c.fn(binary, b)


if __name__ == "__main__":
    sys.exit(L.run_suite("luks_oracle", CASES, sys.argv[1:], run_case))
