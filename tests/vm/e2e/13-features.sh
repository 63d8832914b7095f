#!/bin/bash
# `ublk-qcow2 features` on the running kernel (issue 20): the flags GET_FEATURES reports,
# by name, the same in text and JSON; which of them `add` uses; a device's flags in
# `list --output=json`; one error line when there is no ublk. The product gates on what the
# kernel reports; this test knows which kernel it runs on (6.12 or 7.3) and checks the
# report against the kernel's history: the flags of 6.13 and later on 7.3 only.
source "$(dirname "$0")/lib.bash"

kernel=$(uname -r | cut -d. -f1,2)
echo "kernel $kernel"

# Flags by the first kernel that has them (Linux's include/uapi/linux/ublk_cmd.h).
since_6_5=(CMD_IOCTL_ENCODE USER_COPY)
# INTEGRITY (7.0) is left out: the kernel offers it only with CONFIG_BLK_DEV_INTEGRITY,
# which the rig's fragment does not set.
since_6_13=(USER_RECOVERY_FAIL_IO UPDATE_SIZE AUTO_BUF_REG QUIESCE PER_IO_DAEMON
  BUF_REG_OFF_DAEMON BATCH_IO SAFE_STOP_DEV NO_AUTO_PART_SCAN SHMEM_ZC IO_DESC_SIZE)

json=$WORK/features.json
text=$WORK/features.txt
check "features and features --output=json exit 0" bash -c \
  "'$UQ' features >'$text' && '$UQ' features --output=json >'$json' && cat '$text'"

# The JSON: the documented keys, names matching the mask bit by bit, nothing unknown (this
# program names every flag up to Linux 7.3), add using exactly CMD_IOCTL_ENCODE.
json_consistent() {
  python3 - "$json" "$text" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
assert list(j) == ["get-features", "mask", "features", "unknown", "used-by-add"], list(j)
assert j["get-features"] is True, j
assert j["unknown"] == [], j["unknown"]
names = j["features"]
print("features:", " ".join(names))
assert len(names) == bin(j["mask"]).count("1"), (names, hex(j["mask"]))
# add asks for user recovery with re-issue where offered (both rig kernels), for zero copy
# (AUTO_BUF_REG with USER_COPY) where both are offered and for QUIESCE (upgrade) where
# offered (7.3).
want = ["USER_RECOVERY", "USER_RECOVERY_REISSUE", "CMD_IOCTL_ENCODE"]
if "AUTO_BUF_REG" in names:
    want += ["USER_COPY", "AUTO_BUF_REG"]
if "QUIESCE" in names:
    want.append("QUIESCE")
assert j["used-by-add"] == want, j["used-by-add"]
# The text table: the same names in the same order; yes only for what add uses.
rows = [l.split() for l in open(sys.argv[2]).read().splitlines()]
assert rows[0] == ["FEATURE", "BIT", "USED", "BY", "ADD"], rows[0]
assert [r[0] for r in rows[1:]] == names, rows
assert [r[0] for r in rows[1:] if r[2] == "yes"] == j["used-by-add"], rows
assert all(j["mask"] >> int(r[1]) & 1 for r in rows[1:]), rows
PY
}
check "JSON and table agree, every bit named, add uses CMD_IOCTL_ENCODE, user recovery, zero copy where offered" json_consistent

has() { python3 -c 'import json,sys; sys.exit(sys.argv[2] not in json.load(open(sys.argv[1]))["features"])' "$json" "$1"; }

expect_flags() {  # expect_flags yes|no FLAG...: each FLAG reported (yes) or not (no)
  local want=$1 f bad=0
  shift
  for f in "$@"; do
    if has "$f"; then [[ $want == yes ]] || { echo "$f reported"; bad=1; }; else
      [[ $want == no ]] || { echo "$f missing"; bad=1; }
    fi
  done
  return $bad
}
check "6.5 flags reported (${since_6_5[*]})" expect_flags yes "${since_6_5[@]}"
check "INTEGRITY not reported (CONFIG_BLK_DEV_INTEGRITY is off)" expect_flags no INTEGRITY
case $kernel in
  6.12)
    check "6.12: none of the 6.13+ flags (UPDATE_SIZE, SAFE_STOP_DEV, ...)" \
      expect_flags no "${since_6_13[@]}"
    ;;
  7.3)
    check "7.3: every 6.13-7.3 flag (UPDATE_SIZE, SAFE_STOP_DEV, BATCH_IO, ...)" \
      expect_flags yes "${since_6_13[@]}"
    ;;
  *)
    check "a kernel this test knows (6.12 or 7.3; got $kernel)" false
    ;;
esac

# A device's flags, as the kernel reports them: named, among the kernel's features, and
# including what add asked for.
img=$WORK/a.qcow2
qemu-img create -q -f qcow2 "$img" 64M
device_flags() {
  local dev
  dev=$(add_device -f "$img") || return 1
  "$UQ" list --output=json | python3 -c '
import json, sys
dev, features = sys.argv[1], set(json.load(open(sys.argv[2]))["features"])
d = {x["device"]: x for x in json.load(sys.stdin)}[dev]
print("flags:", " ".join(d["flags"]))
assert "CMD_IOCTL_ENCODE" in d["flags"], d["flags"]
assert "USER_RECOVERY" in d["flags"] and "USER_RECOVERY_REISSUE" in d["flags"], d["flags"]
assert d["recovery"] == "reissue", d["recovery"]
assert set(d["flags"]) <= features, set(d["flags"]) - features
' "$dev" "$json" || return 1
  "$UQ" del -n "$(dev_id "$dev")"
}
check "list --output=json: the device's flags, named, a subset of the features" device_flags

# add --no-partition-scan (UBLK_F_NO_AUTO_PART_SCAN, 7.0+): an image holding an MBR with
# one partition. Without the option the kernel finds the partition (/sys/block/ublkbN has
# ublkbNp1, the scan may come a moment after add returns); with it, no partition appears.
# On 6.12 the option is refused in one line naming the flag, and nothing is created.
part_raw=$WORK/part.raw
part_img=$WORK/part.qcow2
python3 - "$part_raw" <<'PY'
import struct, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(64 << 20)
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, (64 << 11) - 2048)
    f.seek(446); f.write(entry); f.seek(510); f.write(b"\x55\xaa")
PY
qemu-img convert -q -f raw -O qcow2 "$part_raw" "$part_img"
partition_seen() {  # partition_seen DEV SECONDS: ublkbNp1 appears within SECONDS
  local name i
  name=$(basename "$1")
  for ((i = 0; i < $2 * 10; i++)); do
    [[ -e /sys/block/$name/${name}p1 ]] && return 0
    sleep 0.1
  done
  return 1
}
scan_default() {
  local dev
  dev=$(add_device -f "$part_img") || return 1
  partition_seen "$dev" 5 || { echo "no ${dev}p1 after 5 s"; "$UQ" del -n "$(dev_id "$dev")"; return 1; }
  "$UQ" del -n "$(dev_id "$dev")"
}
check "add: the kernel scans the partition table (p1 appears)" scan_default
case $kernel in
  6.12)
    expect_error "6.12: add --no-partition-scan refused in one line, exit 1" 1 \
      "$UQ" add -f "$part_img" --no-partition-scan
    check "6.12: the error names UBLK_F_NO_AUTO_PART_SCAN" bash -c \
      "'$UQ' add -f '$part_img' --no-partition-scan 2>&1 | grep -q UBLK_F_NO_AUTO_PART_SCAN"
    check "6.12: nothing created by the refused add" no_leftovers
    ;;
  7.3)
    no_scan() {
      local dev
      dev=$(add_device -f "$part_img" --no-partition-scan) || return 1
      "$UQ" list --output=json | python3 -c '
import json, sys
d = {x["device"]: x for x in json.load(sys.stdin)}[sys.argv[1]]
assert "NO_AUTO_PART_SCAN" in d["flags"], d["flags"]' "$dev" || { "$UQ" del -n "$(dev_id "$dev")"; return 1; }
      if partition_seen "$dev" 3; then echo "${dev}p1 appeared"; "$UQ" del -n "$(dev_id "$dev")"; return 1; fi
      "$UQ" del -n "$(dev_id "$dev")"
    }
    check "7.3: add --no-partition-scan: flag in list, no p1" no_scan
    ;;
esac

# No ublk: a private /dev without ublk-control (mount namespace), one line, exit 1.
# shellcheck disable=SC2016  # $0 expands in the inner shell
no_ublk() { unshare -m bash -c 'mount -t tmpfs none /dev && exec "$0" features' "$UQ"; }
expect_error "features without /dev/ublk-control: one line, exit 1" 1 no_ublk

check "no device, daemon or record left" no_leftovers
finish
