#!/usr/bin/python3
"""Oracle tests for the CLI's writing verbs: `create` and `convert -O qcow2 [-c]`.

Each case makes something with ublk-qcow2 and asks QEMU about it:
  - create: `qemu-img check` clean, `qemu-img info` equal to the image
    qemu-img creates with the same options (but filename/actual-size), and
    qemu-io can write and read it;
  - convert -O qcow2: from images QEMU made (backing chains, compressed,
    extended L2, snapshots...), the output checks clean and `qemu-img compare`
    finds it identical to the source; with -c it really holds compressed
    clusters.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle_lib as L  # noqa: E402

K, M = 1 << 10, 1 << 20
CASES = []


def case(name, doc, group):
    def deco(fn):
        CASES.append(L.Case(name, group, fn, doc))
        return fn
    return deco


CREATE_MATRIX = [
    ("default", "", 64 * M),
    ("c512", "cluster_size=512", 8 * M),
    ("c2m", "cluster_size=2M", 1 << 30),
    ("v2", "compat=0.10", 64 * M),
    ("refcount1", "refcount_bits=1", 64 * M),
    ("refcount64", "refcount_bits=64,cluster_size=4k", 64 * M),
    ("extl2_zstd", "extended_l2=on,compression_type=zstd", 64 * M),
    ("lazy", "lazy_refcounts=on", 64 * M),
    ("datafile_raw", "data_file=img.data,data_file_raw=on", 16 * M),
    ("prealloc", "preallocation=metadata,cluster_size=16k", 64 * M),
    ("odd_size", "", 1000001),
]

for _name, _opts, _size in CREATE_MATRIX:
    def _make(opts=_opts, size=_size):
        def fn(b, binary):
            argv = [binary, "create", "-q"] + (["-o", opts] if opts else []) + ["img.qcow2", str(size)]
            L.must(argv, b.cwd, b.log)
            L.must([L.QEMU_IMG, "check", "img.qcow2"], b.cwd, b.log)
            ref_opts = (opts.replace("img.data", "ref.data")) if opts else ""
            b.qemu_img("create", "-q", "-f", "qcow2", *(["-o", ref_opts] if ref_opts else []), "ref.qcow2", str(size))
            ours = json.loads(L.must([L.QEMU_IMG, "info", "--output=json", "img.qcow2"], b.cwd, b.log).out)
            ref = json.loads(L.must([L.QEMU_IMG, "info", "--output=json", "ref.qcow2"], b.cwd, b.log).out)
            for d in (ours, ref):
                d.pop("filename", None)
                d.pop("actual-size", None)
                fs = d.get("format-specific", {}).get("data", {})
                if "data-file" in fs:
                    fs["data-file"] = "(data file)"
            problems = L.compare_json(ref, ours)
            if problems:
                raise L.CaseFailure("info differs from qemu-img's image:\n" + "\n".join(problems))
            b.io("img.qcow2", "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")
            L.must([L.QEMU_IMG, "check", "img.qcow2"], b.cwd, b.log)
            return "created image matches qemu-img's"
        return fn
    CASES.append(L.Case("create_" + _name, "create", _make(), "create -o " + (_opts or "(defaults)")))


def _relative_data_file(b, binary):
    """QEMU takes a relative data_file name relative to the working directory,
    at create and at open; so must we, or the two tools use different files."""
    b.mkdir("dir")
    b.mkdir("run")
    run, img_dir = b.path("run"), b.path("dir")
    L.must([binary, "create", "-q", "-o", "data_file=y.data", "../dir/img.qcow2", "1M"], run, b.log)
    L.must([L.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "data_file=q.data",
            "../dir/ref.qcow2", "1M"], run, b.log)
    if not os.path.exists(os.path.join(run, "y.data")) or os.path.exists(
            os.path.join(img_dir, "y.data")):
        raise L.CaseFailure("create put the data file elsewhere than the working directory "
                            "(qemu-img: run/q.data exists: %s)"
                            % os.path.exists(os.path.join(run, "q.data")))
    L.must([L.QEMU_IO, "-c", "write -P 0x5a 0 64k", "../dir/img.qcow2"], run, b.log)
    L.must([L.QEMU_IMG, "convert", "-O", "raw", "../dir/img.qcow2", "q.raw"], run, b.log)
    L.must([binary, "convert", "-O", "raw", "../dir/img.qcow2", "o.raw"], run, b.log)
    if open(os.path.join(run, "q.raw"), "rb").read() != open(os.path.join(run, "o.raw"), "rb").read():
        raise L.CaseFailure("convert from the working directory differs from qemu-img's")
    # From the image's own directory neither tool finds the data file.
    q = L.run([L.QEMU_IMG, "convert", "-O", "raw", "img.qcow2", "q2.raw"], img_dir, b.log)
    o = L.run([binary, "convert", "-O", "raw", "img.qcow2", "o2.raw"], img_dir, b.log)
    if q.rc == 0 or o.rc != 1:
        raise L.CaseFailure("from dir/: qemu-img convert exit %d, ours exit %d (want both to fail)"
                            % (q.rc, o.rc))
    L.must([L.QEMU_IMG, "check", "../dir/img.qcow2"], run, b.log)
    return "data file in the working directory, as qemu-img puts and reads it"


CASES.append(L.Case("create_relative_data_file", "create", _relative_data_file,
                    "create/convert with a relative data_file name from another directory"))


def _bitmaps_survive_writes(opts):
    def fn(b, binary):
        """Our writes to an image with QEMU's persistent bitmaps: we maintain
        them (issue 16): after a clean close neither is in use, the enabled
        one has the bits of our writes, the disabled one is unchanged."""
        b.create("img.qcow2", 8 * M, opts=opts)
        b.io("img.qcow2", "write -P 0x11 0 1M")
        b.qemu_img("bitmap", "--add", "-g", "65536", "img.qcow2", "b0")
        b.qemu_img("bitmap", "--add", "--disable", "-g", "1M", "img.qcow2", "b1")
        b.io("img.qcow2", "write -P 0x22 2M 256k")  # b0 gets bits
        before = json.loads(b.qemu_img("info", "--output=json", "img.qcow2").out)
        L.must([binary, "bench", "-w", "-c", "64", "-s", "4k", "-S", "64k", "-o", "4M",
                "img.qcow2"], b.cwd, b.log)
        res = L.run([L.QEMU_IMG, "check", "img.qcow2"], b.cwd, b.log)
        if res.rc != 0:
            raise L.CaseFailure("qemu-img check exit %d after our writes: %s"
                                % (res.rc, (res.out + res.err)[:400]))
        after = json.loads(b.qemu_img("info", "--output=json", "img.qcow2").out)
        bitmaps = after.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        names = sorted(x["name"] for x in bitmaps)
        if names != ["b0", "b1"]:
            raise L.CaseFailure("bitmaps after our writes: %s (before: %s)"
                                % (bitmaps, before["format-specific"]["data"].get("bitmaps")))
        for x in bitmaps:
            if "in-use" in x["flags"]:
                raise L.CaseFailure("bitmap %s left in use: %s" % (x["name"], x))
        res = L.must([binary, "map", "--bitmap", "b0", "--output=json", "img.qcow2"], b.cwd,
                     b.log)
        dirty = [(e["start"], e["length"]) for e in json.loads(res.out) if e["dirty"]]
        if dirty != [(2 * M, 256 * 1024), (4 * M, 64 * 64 * 1024)]:
            raise L.CaseFailure("b0 after our writes: %s" % dirty)
        # QEMU still opens, writes and checks it.
        b.io("img.qcow2", "write -P 0x33 6M 64k")
        L.must([L.QEMU_IMG, "check", "img.qcow2"], b.cwd, b.log)
        return "bitmaps maintained; qemu-img check clean"
    return fn


for _name, _opts in (("", None), ("_extl2", {"extended_l2": "on", "cluster_size": "32k"}),
                     ("_c512", {"cluster_size": "512"})):
    CASES.append(L.Case("bitmaps_survive_writes" + _name, "bitmaps", _bitmaps_survive_writes(_opts),
                        "our writes keep QEMU's bitmaps (marked in use) " + str(_opts or "")))


def convert_case(name, doc, compress=False, out_opts=""):
    def deco(prepare):
        def fn(b, binary):
            src = prepare(b)
            argv = [binary, "convert", "-O", "qcow2"] + (["-c"] if compress else [])
            argv += (["-o", out_opts] if out_opts else []) + [src, "out.qcow2"]
            L.must(argv, b.cwd, b.log, timeout=120)
            res = L.run([L.QEMU_IMG, "check", "--output=json", "out.qcow2"], b.cwd, b.log)
            if res.rc != 0:
                raise L.CaseFailure("qemu-img check exit %d: %s" % (res.rc, res.out[:500] + res.err[:500]))
            report = json.loads(res.out)
            res = L.run([L.QEMU_IMG, "compare", src, "out.qcow2"], b.cwd, b.log, timeout=120)
            if res.rc != 0:
                raise L.CaseFailure("qemu-img compare: %s" % (res.out + res.err)[:500])
            if compress and report.get("compressed-clusters", 0) == 0:
                raise L.CaseFailure("convert -c wrote no compressed cluster: %s" % report)
            return "identical; %s compressed clusters" % report.get("compressed-clusters", 0)
        CASES.append(L.Case(name, "convert", fn, doc))
        return prepare
    return deco


def filled(b, opts=None, size=32 * M):
    b.create("src.qcow2", size, opts=opts or {})
    b.io("src.qcow2", ("noise", 0, 3 * M), "write -P 0x11 5M 4M", "write -z 12M 1M",
         "write -P 0x22 20M 123k")
    return "src.qcow2"


@convert_case("qcow2_to_qcow2", "a plain image")
def _(b):
    return filled(b)


@convert_case("compress_zlib", "compressed output, zlib", compress=True)
def _(b):
    return filled(b)


@convert_case("compress_zstd_4k", "compressed output, zstd, 4 KiB clusters", compress=True,
              out_opts="compression_type=zstd,cluster_size=4k")
def _(b):
    return filled(b)


@convert_case("compress_2m", "compressed output, 2 MiB clusters", compress=True, out_opts="cluster_size=2M")
def _(b):
    return filled(b, size=24 * M)


@convert_case("from_chain", "a three-deep chain (raw base) flattened")
def _(b):
    b.raw("base.raw", 16 * M)
    b.io("base.raw", "write -P 0xa1 0 8M", fmt="raw")
    b.create("mid.qcow2", 16 * M, backing="base.raw", backing_fmt="raw")
    b.io("mid.qcow2", "write -P 0xb2 1M 2M", "write -z 6M 1M")
    b.create("top.qcow2", 24 * M, opts={"extended_l2": "on"}, backing="mid.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 0xc3 2M 4k", "discard 4M 64k")
    return "top.qcow2"


@convert_case("from_compressed_extl2", "a compressed source to extended L2 output",
              out_opts="extended_l2=on,cluster_size=32k")
def _(b):
    b.raw("src.raw", 8 * M)
    b.io("src.raw", "write -P 0x31 0 5M", fmt="raw")
    b.qemu_img("convert", "-c", "-O", "qcow2", "src.raw", "src.qcow2")
    return "src.qcow2"


@convert_case("from_raw_v2", "a raw source to a v2 image", out_opts="compat=0.10,refcount_bits=16")
def _(b):
    b.raw("src.raw", 8 * M + 512)
    b.io("src.raw", ("noise", 1 * M, 2 * M), fmt="raw")
    return "src.raw"


# Sources whose virtual size is not a multiple of the output cluster size,
# with data up to the last byte: the partial last cluster must be written
# (convert once dropped the final run of data clusters of the last chunk).
# Each source also has a hole and a data run that ends a chunk, so the tail
# is not the only run of its chunk.
ODD_SIZES = [
    ("977k", 977 * K, ""),
    ("1m_512", M + 512, ""),
    ("3m_c2m", 3 * M, "cluster_size=2M"),
    ("5m_4k_c64k", 5 * M + 4 * K, ""),
    ("2m_1536_c512", 2 * M + 1536, "cluster_size=512"),
    ("1000001_c4k", 1000001, "cluster_size=4k"),
    ("9m_512_extl2", 9 * M + 512, "extended_l2=on,cluster_size=32k"),
    ("3m_2560_v2", 3 * M + 2560, "compat=0.10"),
]

for _name, _size, _opts in ODD_SIZES:
    for _compress in (False, True):
        def _prepare(b, size=_size):
            data = bytearray(b.rng.randbytes(size))
            # Every other 512-byte block a pattern, so that -c has something
            # to compress at any cluster size.
            for at in range(0, size, 1024):
                data[at:at + 512] = bytes([0x5a]) * len(data[at:at + 512])
            # A hole inside the first megabyte (whole clusters of any size here).
            data[64 * K:192 * K] = bytes(128 * K)
            b.raw("src.raw", size, [(0, bytes(data))])
            return "src.raw"
        convert_case("odd_size_%s%s" % (_name, "_c" if _compress else ""),
                     "a raw source of %d bytes, data to the last byte%s%s" % (
                         _size, " (-o %s)" % _opts if _opts else "", ", compressed" if _compress else ""),
                     compress=_compress, out_opts=_opts)(_prepare)


def run_case(c, workdir, log, binary):
    b = L.Builder(workdir, log, sum(map(ord, c.name)))
    return c.fn(b, binary)


if __name__ == "__main__":
    sys.exit(L.run_suite("write_matrix", CASES, sys.argv[1:], run_case))
