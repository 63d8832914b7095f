#!/bin/bash
# Power-failure replay through the host file system (issue 21): two loop devices (data, log)
# -> dm-log-writes -> a host file system -> a qcow2 image -> `ublk-qcow2 add` -> plr-writer
# (O_DIRECT random/sequential, allocating/overwriting writes, some RWF_DSYNC, BLKZEROOUT,
# BLKDISCARD, fdatasync flushes; a log mark after each acknowledged flush or DSYNC write).
# Then the log is replayed, incrementally, onto a copy of the data device, and at every
# writer mark, every FLUSH and FUA entry, and random entries between, a copy of that state:
#   - mounts (the host file system replays its journal),
#   - passes `qemu-img check` (leaks allowed: exit 0 or 3),
#   - holds, read through the image (`qemu-img convert -O raw`), every block the writer saw
#     acknowledged before the last flush (or DSYNC write) that completed before that point
#     with its content, and nothing torn or misplaced (plr-writer verify).
# Prints "states N corruptions C lost-flushed-writes L" per case and in total.
#
# Cases: UBLK_PLR_CASES (default "ext4:none ext4:writeback"; "xfs:none" as well costs about
# 4 s of TCG per state, so the default suite leaves it to the soak run, docs/power-failure.md).
# Knobs: UBLK_PLR_OPS writer operations per case (default 64), UBLK_PLR_RANDOM random states
# per case (default 24), UBLK_PLR_SEED, UBLK_PLR_MIN_STATES (the run fails with fewer states
# checked in total; default 200; each case plans at least its share, topping up with random
# states). UBLK_PLR_RECORD_ONLY=1: record the cases and keep their logs on the scratch disk,
# check nothing (tests/power/soak checks them on the host). The checks themselves are
# tests/power/replay-check.bash.
# The suite runs it on one kernel (the replay checks the host file system, not ublk):
# vm-kernels: 6.12
source "$(dirname "$0")/lib.bash"

find_tool() {  # find_tool ENV_VALUE BAZEL_PATH
  local p=${1:-$PWD/$2}
  [[ -x "$p" ]] || p=/.vm-host$p
  echo "$p"
}
PLR_WRITER=$(find_tool "${UBLK_PLR_WRITER:-}" bazel-bin/tests/power/plr-writer)
PLR_REPLAY=$(find_tool "${UBLK_PLR_REPLAY:-}" bazel-bin/tests/power/plr-replay)
source "$(dirname "$0")/../../power/replay-check.bash"

CASES=${UBLK_PLR_CASES:-ext4:none ext4:writeback}
OPS=${UBLK_PLR_OPS:-64}
RANDOM_STATES=${UBLK_PLR_RANDOM:-24}
SEED=${UBLK_PLR_SEED:-$((RANDOM * 32768 + RANDOM))}
MIN_STATES=${UBLK_PLR_MIN_STATES:-200}
# Record only (tests/power/soak): each case's log and journal stay in $WORK/recorded/FS-CACHE/
# on the scratch disk, for the host to check at native speed; nothing is replayed here.
RECORD_ONLY=${UBLK_PLR_RECORD_ONLY:-0}
# Each case plans at least its share of the floor (random states topping up the marks and
# flushes), so the floor fails only when a log has too few entries, not with an unlucky seed.
read -r -a case_list <<<"$CASES"
PER_CASE=$(((MIN_STATES + ${#case_list[@]} - 1) / ${#case_list[@]}))
DM=plr-$$
REPLAY_DIR=/tmp/plr   # tmpfs: the replayed device and its per-state copies
mkdir -p "$REPLAY_DIR"

total_states=0
total_corrupt=0
total_lost=0

check "tools present" bash -c "[[ -x $PLR_WRITER && -x $PLR_REPLAY ]] && command -v dmsetup"
check "kernel has dm-log-writes" bash -c 'dmsetup targets | grep -w log-writes'
echo "      | seed $SEED, $OPS operations and $RANDOM_STATES random states per case"

# record_workload FS CACHE WORKLOAD: data and log loop devices -> dm-log-writes -> FS -> image ->
# device -> writer; leaves $WORK/log.img, $WORK/journal.
record_workload() {
  local fs=$1 cache=$2 workload=$3 ldata llog dev
  rm -f "$WORK/data.img" "$WORK/log.img"
  truncate -s "$(plr_data_size "$fs")" "$WORK/data.img"
  truncate -s 2G "$WORK/log.img"
  ldata=$(losetup -f --show "$WORK/data.img") || return 1
  llog=$(losetup -f --show "$WORK/log.img") || return 1
  # No udev in the VM: dmsetup makes the /dev/mapper node itself.
  dmsetup create --noudevsync "$DM" --table "0 $(blockdev --getsz "$ldata") log-writes $ldata $llog" || return 1
  dmsetup mknodes "$DM"
  if [[ $fs == xfs ]]; then mkfs.xfs -q -f "/dev/mapper/$DM"; else mkfs.ext4 -q -F "/dev/mapper/$DM"; fi || return 1
  dmsetup message "$DM" 0 mark mkfs
  mount "/dev/mapper/$DM" "$MNT" || return 1
  qemu-img create -q -f qcow2 "$MNT/img.qcow2" 64M || return 1
  sync -f "$MNT" && sync
  dmsetup message "$DM" 0 mark ready
  dev=$(add_device -f "$MNT/img.qcow2" --cache="$cache") || return 1
  if [[ $workload == files ]]; then
    # ext4 on the device, files replaced and fsynced on it (file_workload.h).
    mkfs.ext4 -q -F "$dev" || return 1
    mkdir -p "$MNT-inner"
    mount "$dev" "$MNT-inner" || return 1
    "$PLR_WRITER" files --dir "$MNT-inner" --journal "$WORK/journal" --ops "$OPS" --seed "$SEED" \
      --dm "$DM" || return 1
    umount "$MNT-inner" || return 1
  else
    "$PLR_WRITER" write --dev "$dev" --journal "$WORK/journal" --ops "$OPS" --seed "$SEED" \
      --dm "$DM" || return 1
  fi
  "$UQ" del -n "$(dev_id "$dev")" || return 1
  umount "$MNT" || return 1
  dmsetup remove --noudevsync "$DM" || return 1
  losetup -d "$ldata" "$llog"
  echo "log: $("$PLR_REPLAY" list --log "$WORK/log.img" | wc -l) entries, journal: $(grep -c '^[WZDFU]' "$WORK/journal") operations, $(grep -c '^M' "$WORK/journal") marks"
}

# replay_and_check FS WORKLOAD: every planned state of $WORK/log.img (replay-check.bash).
replay_and_check() {
  local fs=$1 workload=$2 out
  "$PLR_REPLAY" plan --log "$WORK/log.img" --start ready --random "$RANDOM_STATES" \
    --at-least "$PER_CASE" --seed "$SEED" >"$WORK/plan" || return 1
  DATA_SIZE=$(plr_data_size "$fs") PLR_WORKLOAD=$workload replay_states "$fs" "$WORK/log.img" "$WORK/journal" \
    "$WORK/plan" "$REPLAY_DIR" | tee "$WORK/states.out"
  local rc=${PIPESTATUS[0]}
  out=$(sed -n 's/^states \([0-9]*\) corruptions \([0-9]*\) lost-flushed-writes \([0-9]*\) .*/\1 \2 \3/p' \
    "$WORK/states.out")
  read -r s c l <<<"${out:-0 0 0}"
  total_states=$((total_states + s))
  total_corrupt=$((total_corrupt + c))
  total_lost=$((total_lost + l))
  return "$rc"
}

for c in $CASES; do
  IFS=: read -r fs cache workload <<<"$c"
  workload=${workload:-blocks}
  check "$c: workload recorded through dm-log-writes" record_workload "$fs" "$cache" "$workload" || {
    "$UQ" del --all --force >/dev/null 2>&1
    mountpoint -q "$MNT-inner" && umount "$MNT-inner"
    mountpoint -q "$MNT" && umount "$MNT"
    dmsetup remove --noudevsync "$DM" 2>/dev/null
    losetup -j "$WORK/data.img" -O NAME -n | xargs -r losetup -d
    losetup -j "$WORK/log.img" -O NAME -n | xargs -r losetup -d
    continue
  }
  if ((RECORD_ONLY)); then
    mkdir -p "$WORK/recorded/${c//:/-}"
    mv "$WORK/log.img" "$WORK/journal" "$WORK/recorded/${c//:/-}/"
    echo "$fs $workload" >"$WORK/recorded/${c//:/-}/case"
    continue
  fi
  # Not through check(): its subshell would lose the totals.
  replay_and_check "$fs" "$workload" >"$WORK/replay.out" 2>&1
  rc=$?
  check "$c: every replayed state mounts, checks clean, keeps flushed writes" \
    bash -c "cat $WORK/replay.out; exit $rc"
done

if ((!RECORD_ONLY)); then
  echo "power-failure replay: states $total_states corruptions $total_corrupt lost-flushed-writes $total_lost"
  check "at least $MIN_STATES states checked" test "$total_states" -ge "$MIN_STATES"
fi
check "nothing left" no_leftovers
rm -rf "$REPLAY_DIR"
finish
