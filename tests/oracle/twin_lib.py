"""Twin images for the oracle tests of verbs that change images (rebase,
commit): the case's images are built once under src/, copied to q/ (for
qemu-img's verb) and o/ (for ours), the verb runs in each copy's directory
with the same arguments, and the results are compared with QEMU's tools:

  * exit status: ours must equal qemu-img's; a failing run of ours prints one
    stderr line `ublk-qcow2: ...` and leaves every file of o/ as it was;
  * guest views (`qemu-img convert -O raw`, every byte);
  * allocation (`qemu-img map --output=json` without host offsets, runs
    merged), backing links (`qemu-img info --output=json`);
  * `qemu-img check` clean on every qcow2 image touched.

Relative backing names keep the copies independent of each other.
"""

import hashlib
import json
import os
import shutil

import oracle_lib as L
from oracle_lib import CaseFailure

TIMEOUT = 120


class Twins:
    def __init__(self, b, binary):
        self.b = b
        self.log = b.log
        self.binary = binary
        self.src = b.path("src")
        self.q = b.path("q")
        self.o = b.path("o")
        self.views = b.path("views")
        os.makedirs(self.src, exist_ok=True)
        os.makedirs(self.views, exist_ok=True)
        self._n = 0

    def copy(self):
        """src/ -> q/ and o/ (sparse files stay sparse)."""
        for d in (self.q, self.o):
            shutil.rmtree(d, ignore_errors=True)
            L.must(["cp", "-a", "--sparse=always", self.src, d], self.b.cwd, self.log)

    def view(self, d, image, fmt=None):
        """The guest view of d/image as a raw file; returns its path."""
        self._n += 1
        out = os.path.join(self.views, "v%d.raw" % self._n)
        argv = [L.QEMU_IMG, "convert", "-O", "raw"] + (["-f", fmt] if fmt else []) + [image, out]
        L.must(argv, d, self.log, timeout=TIMEOUT)
        return out

    def same_view(self, what, expected, got):
        try:
            L.compare_raw(expected, got)
        except CaseFailure as e:
            raise CaseFailure("%s: %s" % (what, e))

    def alloc(self, d, image, fmt=None, own=False):
        """qemu-img map's entries without host offsets, equal neighbours merged.
        `zero` is dropped from data ranges: there it says the host file has a
        hole under an allocated cluster (QEMU fills copy-on-write areas that
        read as zeros with write-zeroes on the host file, we write zeros),
        not how the image maps the range. With `own`, ranges below depth 0
        are only "below": what the image itself maps is compared."""
        argv = [L.QEMU_IMG, "map", "--output=json"] + (["-f", fmt] if fmt else []) + [image]
        out = []
        for e in json.loads(L.must(argv, d, self.log).out):
            e.pop("offset", None)
            if e["data"]:
                e["zero"] = False
            if own and e["depth"] > 0:
                e.update(depth=1, present=None, zero=None, data=None)
            if out and all(out[-1][k] == e[k] for k in ("depth", "present", "zero", "data")):
                out[-1]["length"] += e["length"]
            else:
                out.append(e)
        return out

    def backing(self, d, image):
        info = json.loads(L.must([L.QEMU_IMG, "info", "--output=json", image], d, self.log).out)
        return info.get("backing-filename"), info.get("backing-filename-format")

    def check_clean(self, d, image):
        r = L.run([L.QEMU_IMG, "check", image], d, self.log, timeout=TIMEOUT)
        if r.rc != 0:
            raise CaseFailure("qemu-img check %s in %s/: exit %d: %s"
                              % (image, os.path.basename(d), r.rc, (r.out + r.err)[-400:]))

    def fingerprint(self, d):
        """Every file's bytes, to see that a refused verb changed nothing."""
        out = {}
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    out[name] = hashlib.sha256(f.read()).hexdigest()
        return out

    def run_both(self, verb, args):
        """Runs `qemu-img VERB ARGS` in q/ and ours in o/; compares exit
        statuses; on failure checks our stderr and that o/ is unchanged.
        Returns (qemu result, our result)."""
        before = self.fingerprint(self.o)
        q = L.run([L.QEMU_IMG, verb] + args, self.q, self.log, timeout=TIMEOUT)
        o = L.run([self.binary, verb] + args, self.o, self.log, timeout=TIMEOUT)
        if o.timed_out or o.signal or o.rc != q.rc:
            raise CaseFailure("%s %s: ours %s, qemu-img exit %d (our stderr %r)"
                              % (verb, " ".join(args), o.describe(), q.rc, o.err[-300:]))
        if o.rc != 0:
            lines = o.err.splitlines()
            if len(lines) != 1 or not lines[0].startswith("ublk-qcow2: "):
                raise CaseFailure("%s: want one stderr line 'ublk-qcow2: ...', got %r"
                                  % (verb, o.err[:400]))
            if self.fingerprint(self.o) != before:
                raise CaseFailure("%s failed but changed files in o/" % verb)
        return q, o
