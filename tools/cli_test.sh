#!/bin/bash
# End-to-end test of the ublk-qcow2 binary: exit statuses and usage, `info`
# output compared byte for byte with qemu-img's, `convert` output compared
# with qemu-img convert's. Needs qemu-img and qemu-io (Debian qemu-utils).
#
# Usage: cli_test.sh PATH/TO/ublk-qcow2
set -u

BIN=$(realpath "$1")
WORK=$(mktemp -d "${TEST_TMPDIR:-/tmp}/cli_test.XXXXXX")
holder=""  # a qemu-io process holding an image's write lock (see "locking")
trap '[[ -n $holder ]] && kill "$holder" 2>/dev/null; rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1
export TZ=UTC

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# run WANT_STATUS CMD...: runs CMD with stdout in ./out and stderr in ./err.
run() {
  local want=$1
  shift
  "$@" >out 2>err
  local got=$?
  if [[ $got != "$want" ]]; then
    fail "'$*' exited $got, want $want"
    sed 's/^/    stdout: /' out | head -5
    sed 's/^/    stderr: /' err | head -5
    return 1
  fi
}

# The one-line error contract: "ublk-qcow2: ...", mentioning $1.
expect_one_line_error() {
  local lines
  lines=$(wc -l <err)
  [[ $lines == 1 ]] || fail "stderr has $lines lines: $(cat err)"
  grep -q "^ublk-qcow2: .*$1" err || fail "stderr does not name '$1': $(cat err)"
}

# same_as_qemu ARGS...: `ublk-qcow2 info ARGS` prints what `qemu-img info ARGS` does.
same_as_qemu() {
  qemu-img info "$@" >want 2>&1 || { fail "qemu-img info $* failed: $(cat want)"; return; }
  run 0 "$BIN" info "$@" || return
  diff -u want out >diff || { fail "info $* differs from qemu-img:"; cat diff; }
}

command -v qemu-img >/dev/null || { echo "qemu-img not found"; exit 1; }

# --- images ---
qemu-img create -q -f raw base.raw 64M
qemu-io -f raw -c 'write -P 0x5a 1M 192k' base.raw >/dev/null
qemu-img create -q -f qcow2 -F raw -b base.raw mid.qcow2
qemu-io -c 'write -P 0x6b 5M 64k' mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -F qcow2 -b mid.qcow2 top.qcow2 100M
qemu-io -c 'write -P 0x11 0 1300k' -c 'write -z 1M 64k' top.qcow2 >/dev/null
qemu-img snapshot -c snap1 top.qcow2
qemu-io -c 'write -P 0x12 70M 64k' top.qcow2 >/dev/null
qemu-img snapshot -c "second snap" top.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 10M
qemu-img create -q -f qcow2 -o data_file=ext.data,data_file_raw=on,compression_type=zstd \
  -o lazy_refcounts=on,extended_l2=on,refcount_bits=64,cluster_size=16384 ext.qcow2 1G
mkdir sub
qemu-img create -q -f qcow2 -F qcow2 -b ../v2.qcow2 sub/child.qcow2
head -c 3M /dev/urandom >random.raw
qemu-img convert -c -O qcow2 random.raw compressed.qcow2

# --- usage and exit statuses ---
run 0 "$BIN" --help && { grep -q info out && grep -q convert out || fail "--help lists no verbs"; }
run 0 "$BIN" --version && { grep -q '^ublk-qcow2 [0-9]' out || fail "--version: $(cat out)"; }
run 0 "$BIN" info --help && { grep -q -- --backing-chain out || fail "info --help: $(cat out)"; }
run 0 "$BIN" convert --help && { grep -q -- --output-format out || fail "convert --help"; }
run 2 "$BIN"
run 2 "$BIN" frobnicate top.qcow2 && { head -1 err | grep -q "^ublk-qcow2: unknown command 'frobnicate'$" || fail "unknown verb: $(cat err)"; }
run 2 "$BIN" info && { grep -q IMAGE err || fail "info without IMAGE: usage expected"; }
run 2 "$BIN" info --output=xml top.qcow2
run 2 "$BIN" info --bogus top.qcow2
run 2 "$BIN" info -f vmdk top.qcow2
run 2 "$BIN" convert top.qcow2
run 2 "$BIN" convert -m 0 top.qcow2 x.raw
[[ -e x.raw ]] && fail "convert with a usage error created its output"
# Every verb that names a device takes -n 0..2^20-1 (the kernel's ublk limit) and refuses
# more as a usage error (1 where qemu-img's verb says so), before touching any device.
for verb in "2 add -f top.qcow2" "2 del" "2 recover" "2 upgrade" "2 resize top.qcow2 +1M" \
  "1 snapshot -l" "1 bitmap --add b" "2 map --bitmap b"; do
  # shellcheck disable=SC2086
  run ${verb%% *} "$BIN" ${verb#* } -n 1048576 &&
    { grep -q -- "--id: Value 1048576 not in range" err || fail "${verb#* } -n: $(head -1 err)"; }
done

run 1 "$BIN" info missing.qcow2 && expect_one_line_error missing.qcow2
run 1 "$BIN" info -f qcow2 base.raw && expect_one_line_error base.raw

# --- info, compared with qemu-img ---
for image in top.qcow2 mid.qcow2 base.raw v2.qcow2 ext.qcow2 sub/child.qcow2 compressed.qcow2; do
  same_as_qemu "$image"
  same_as_qemu --output=json "$image"
  same_as_qemu --backing-chain "$image"
  same_as_qemu --output=json --backing-chain "$image"
done
same_as_qemu --output=json -f raw top.qcow2
same_as_qemu "$WORK/sub/child.qcow2"

# A dirty, corrupt image (incompatible feature bits 0 and 1).
qemu-img create -q -f qcow2 dirty.qcow2 1M
printf '\x03' | dd of=dirty.qcow2 bs=1 seek=79 conv=notrunc status=none
same_as_qemu dirty.qcow2
same_as_qemu --output=json dirty.qcow2

# Persistent dirty bitmaps: enabled, disabled, in use (flags patched the way a
# writer that died leaves them), granularities 512 B to 2 GiB.
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=2M bitmaps.qcow2 1G
qemu-img bitmap --add -g 512 bitmaps.qcow2 fine
qemu-img bitmap --add --disable bitmaps.qcow2 disabled
qemu-img bitmap --add -g 2G bitmaps.qcow2 huge
# bitmap_flags IMAGE INDEX FLAGS: sets a directory entry's flags.
bitmap_flags() {
  python3 - "$@" <<'EOF'
import struct, sys
path, index, flags = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "r+b") as f:
    head = f.read(1 << 16)
    pos = struct.unpack(">I", head[100:104])[0]  # header_length: extensions follow
    while True:
        kind, length = struct.unpack(">II", head[pos:pos + 8])
        if kind == 0x23852875:
            offset = struct.unpack(">Q", head[pos + 24:pos + 32])[0]
            break
        pos += 8 + (length + 7) // 8 * 8
    for _ in range(index):
        f.seek(offset + 18)
        name_size, extra_size = struct.unpack(">HI", f.read(6))
        offset += (24 + name_size + extra_size + 7) // 8 * 8
    f.seek(offset + 12)
    f.write(struct.pack(">I", flags))
EOF
}
cp bitmaps.qcow2 in-use.qcow2
bitmap_flags in-use.qcow2 0 3
bitmap_flags in-use.qcow2 1 1
for image in bitmaps.qcow2 in-use.qcow2; do
  same_as_qemu "$image"
  same_as_qemu --output=json "$image"
done
# A bitmap directory that breaks QEMU's rules (reserved flag bit 2) fails info.
cp bitmaps.qcow2 bad-bitmap.qcow2
bitmap_flags bad-bitmap.qcow2 2 6
run 1 "$BIN" info bad-bitmap.qcow2 && expect_one_line_error bad-bitmap.qcow2

# A snapshot's VM state size of 2^64-1 and 2^63: qemu-img's JSON prints them
# signed (-1, -2^63), its table as 16 EiB and 8 EiB.
qemu-img create -q -f qcow2 vmstate.qcow2 1M
qemu-img snapshot -c one vmstate.qcow2
qemu-img snapshot -c two vmstate.qcow2
python3 - vmstate.qcow2 <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    _, offset = struct.unpack(">IQ", f.read(72)[60:72])
    for size in (2**64 - 1, 2**63):
        f.seek(offset + 12)
        id_size, name_size = struct.unpack(">HH", f.read(4))
        f.seek(offset + 36)
        extra_size = struct.unpack(">I", f.read(4))[0]
        f.write(struct.pack(">Q", size))  # extra data +0: the 64-bit VM state size
        offset += (40 + extra_size + id_size + name_size + 7) // 8 * 8
EOF
same_as_qemu vmstate.qcow2
same_as_qemu --output=json vmstate.qcow2

# --- locking: an image QEMU has open for writing ---
qemu-img create -q -f qcow2 busy.qcow2 1M
qemu-io -c 'sleep 600000' busy.qcow2 >/dev/null 2>&1 &
holder=$!
for _ in $(seq 100); do
  qemu-img info busy.qcow2 >/dev/null 2>&1 || break
  sleep 0.1
done
if qemu-img info busy.qcow2 >/dev/null 2>&1; then
  fail "qemu-io did not lock busy.qcow2"
else
  # qemu-img info/check/convert refuse it (exit 1) and read it with -U.
  run 1 "$BIN" info busy.qcow2 && expect_one_line_error busy.qcow2
  grep -q '"write" lock' err || fail "info on a locked image: $(cat err)"
  run 1 "$BIN" info --output=json --backing-chain busy.qcow2 && expect_one_line_error busy.qcow2
  same_as_qemu -U busy.qcow2
  same_as_qemu --force-share --output=json busy.qcow2
  run 1 "$BIN" check busy.qcow2 && expect_one_line_error busy.qcow2
  run 0 "$BIN" check -U busy.qcow2
  run 1 "$BIN" check -U -r all busy.qcow2 && expect_one_line_error busy.qcow2
  run 1 "$BIN" convert busy.qcow2 busy.raw && expect_one_line_error busy.qcow2
  run 0 "$BIN" convert -U busy.qcow2 busy.raw
  run 0 "$BIN" convert --force-share -O qcow2 busy.qcow2 busy-copy.qcow2
fi
kill "$holder"
wait "$holder" 2>/dev/null
holder=""
# Released: a plain info works again, and info itself does not keep QEMU out.
run 0 "$BIN" info busy.qcow2
qemu-io -c 'write 0 4k' busy.qcow2 >/dev/null || fail "qemu-io cannot write busy.qcow2 after info"

# --- convert ---
for image in top.qcow2 mid.qcow2 base.raw compressed.qcow2 v2.qcow2; do
  qemu-img convert -O raw "$image" want.raw
  for io in auto sync; do
    rm -f got.raw
    run 0 "$BIN" convert --io=$io "$image" got.raw || continue
    cmp -s want.raw got.raw || fail "convert --io=$io $image: content differs from qemu-img convert"
  done
done
# io_uring itself, where this host (or sandbox) lets us set up a ring.
rm -f got.raw
"$BIN" convert --io=uring top.qcow2 got.raw >out 2>err
status=$?
case $status in
  0) qemu-img convert -O raw top.qcow2 want.raw
     cmp -s want.raw got.raw || fail "convert --io=uring top.qcow2: content differs" ;;
  1) grep -q '^ublk-qcow2: io_uring' err || fail "convert --io=uring: $(cat err)"
     echo "note: no io_uring here ($(cat err)); --io=uring not exercised" ;;
  *) fail "convert --io=uring exited $status" ;;
esac
# Sparse where the image reads as zeros: top.qcow2 is 100 MiB with ~2 MiB of data.
run 0 "$BIN" convert -p -m 32 top.qcow2 sparse.raw
grep -q '(100.00/100%)' out || fail "convert -p: no final progress line: $(cat out)"
[[ $(stat -c %s sparse.raw) == 104857600 ]] || fail "convert: output size $(stat -c %s sparse.raw)"
allocated=$(($(stat -c %b sparse.raw) * $(stat -c %B sparse.raw)))
((allocated < 8 * 1024 * 1024)) || fail "convert: output not sparse ($allocated bytes allocated)"
# A character device: neither truncated nor synced.
run 0 "$BIN" convert top.qcow2 /dev/null
# Converting over an existing, larger file truncates it first.
head -c 200M /dev/zero | tr '\0' 'x' >old.raw
run 0 "$BIN" convert -f qcow2 -O raw mid.qcow2 old.raw
qemu-img convert -O raw mid.qcow2 want.raw
cmp -s want.raw old.raw || fail "convert over an old file: content differs"

run 0 "$BIN" convert -O qcow2 top.qcow2 new.qcow2
qemu-img compare -q top.qcow2 new.qcow2 || fail "convert -O qcow2: content differs"
qemu-img check -q new.qcow2 || fail "convert -O qcow2: qemu-img check failed"
cp top.qcow2 keep.qcow2
run 1 "$BIN" convert top.qcow2 top.qcow2 && expect_one_line_error top.qcow2
cmp -s keep.qcow2 top.qcow2 || fail "convert onto its own input damaged it"
run 1 "$BIN" convert missing.qcow2 never.raw && expect_one_line_error missing.qcow2
[[ -e never.raw ]] && fail "convert created its output although the input failed to open"
run 1 "$BIN" convert top.qcow2 no/such/dir/out.raw && expect_one_line_error no/such/dir/out.raw

# bench --poll-us: polled runs read the same; without io_uring the flag is
# ignored, and said so.
qemu-img create -q -f qcow2 poll.qcow2 16M
run 0 "$BIN" bench -q -c 200 -d 4 --poll-us=100 poll.qcow2 &&
  { grep -q '^IOPS: ' out || fail "bench --poll-us: $(cat out)"; }
[[ -s err ]] && fail "bench --poll-us with io_uring warned: $(cat err)"
run 0 "$BIN" bench -q -c 200 -d 4 -i threads --poll-us=100 poll.qcow2 &&
  { grep -q -- '--poll-us ignored: no io_uring' err || fail "bench -i threads --poll-us: $(cat err)"; }
run 2 "$BIN" bench --poll-us=-5 poll.qcow2

# --- resize -n: the client side of a live resize, against a stand-in daemon ---
# A Python server on the device's control socket answers "info" with 1 GiB and
# "resize" with what it was asked (or the error a kernel without UPDATE_SIZE
# gets), and logs each request: the sizes the CLI computes, its flags and its
# one-line errors. The real daemon is tested in the VM (tests/vm/e2e/14-live-resize.sh).
STATE=$(mktemp -d /tmp/cli_state.XXXXXX)
trap '[[ -n $holder ]] && kill "$holder" 2>/dev/null; rm -rf "$WORK" "$STATE"' EXIT
fake_daemon() {  # fake_daemon SOCKET LOG REFUSE(0|1): serves until killed
  python3 - "$@" <<'PY' &
import json, os, socket, sys
path, log, refuse = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path); s.listen(4)
while True:
    c, _ = s.accept()
    req = json.loads(c.makefile().readline())
    with open(log, "a") as f: f.write(json.dumps(req, sort_keys=True) + "\n")
    if req["verb"] == "info": ans = {"ok": True, "size": 1 << 30}
    elif refuse: ans = {"error": "device 3: live resize needs UBLK_F_UPDATE_SIZE (Linux 6.16+), which this kernel's ublk does not offer"}
    else: ans = {"ok": True, "size": req["size"]}
    c.sendall((json.dumps(ans) + "\n").encode()); c.close()
PY
  for _ in $(seq 50); do [[ -S $1 ]] && return; sleep 0.1; done
}
export UBLK_QCOW2_STATE_DIR=$STATE
fake_daemon "$STATE/3.sock" "$STATE/log" 0
fake=$!
run 0 "$BIN" resize -n 3 +256M && { [[ $(cat out) == "Image resized." ]] || fail "resize -n: $(cat out)"; }
run 0 "$BIN" resize -q -n 3 -- -512M
run 0 "$BIN" resize -n 3 --shrink -512M
run 0 "$BIN" resize --id=3 2G
want='{"verb": "info"}
{"shrink": false, "size": 1342177280, "verb": "resize"}
{"verb": "info"}
{"shrink": false, "size": 536870912, "verb": "resize"}
{"verb": "info"}
{"shrink": true, "size": 536870912, "verb": "resize"}
{"verb": "info"}
{"shrink": false, "size": 2147483648, "verb": "resize"}'
[[ $(cat "$STATE/log") == "$want" ]] || fail "resize -n sent: $(cat "$STATE/log")"
: >"$STATE/log"
run 1 "$BIN" resize -n 3 -2G && expect_one_line_error "ublk device 3: New image size must be positive"
run 1 "$BIN" resize -n 3 +1X && expect_one_line_error "size"
[[ -s $STATE/log && $(cat "$STATE/log") != '{"verb": "info"}' ]] && fail "a bad size was sent: $(cat "$STATE/log")"
kill "$fake"; wait "$fake" 2>/dev/null; rm -f "$STATE/3.sock"
fake_daemon "$STATE/3.sock" "$STATE/log" 1
fake=$!
run 1 "$BIN" resize -n 3 +256M && expect_one_line_error "device 3: live resize needs UBLK_F_UPDATE_SIZE"
kill "$fake"; wait "$fake" 2>/dev/null
# The socket file of a daemon that is gone: nobody listens.
run 1 "$BIN" resize -n 3 +256M && expect_one_line_error "ublk device 3"
run 1 "$BIN" resize -n 9 +256M && expect_one_line_error "ublk device 9 does not exist"
run 2 "$BIN" resize -n 3 top.qcow2 +1G && { head -1 err | grep -q "give SIZE, not IMAGE" || fail "resize -n with IMAGE: $(cat err)"; }
run 2 "$BIN" resize -n 3
run 2 "$BIN" resize -n 3 --preallocation=full +1G
run 2 "$BIN" resize -n 3 -f raw +1G
run 2 "$BIN" resize top.qcow2
unset UBLK_QCOW2_STATE_DIR

if ((failures > 0)); then
  echo "$failures failure(s)"
  exit 1
fi
echo "PASS"
