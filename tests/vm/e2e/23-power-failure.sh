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
# states). Soak: raise UBLK_PLR_OPS and UBLK_PLR_RANDOM.
# The suite runs it on one kernel (the replay checks the host file system, not ublk):
# vm-kernels: 6.12
source "$(dirname "$0")/lib.bash"

find_tool() {  # find_tool ENV_VALUE BAZEL_PATH
  local p=${1:-$PWD/$2}
  [[ -x "$p" ]] || p=/.vm-host$p
  echo "$p"
}
WRITER=$(find_tool "${UBLK_PLR_WRITER:-}" bazel-bin/tests/power/plr-writer)
REPLAY=$(find_tool "${UBLK_PLR_REPLAY:-}" bazel-bin/tests/power/plr-replay)

CASES=${UBLK_PLR_CASES:-ext4:none ext4:writeback}
OPS=${UBLK_PLR_OPS:-64}
RANDOM_STATES=${UBLK_PLR_RANDOM:-24}
SEED=${UBLK_PLR_SEED:-$((RANDOM * 32768 + RANDOM))}
MIN_STATES=${UBLK_PLR_MIN_STATES:-200}
# Each case plans at least its share of the floor (random states topping up the marks and
# flushes), so the floor fails only when a log has too few entries, not with an unlucky seed.
read -r -a case_list <<<"$CASES"
PER_CASE=$(((MIN_STATES + ${#case_list[@]} - 1) / ${#case_list[@]}))
DM=plr-$$
REPLAY_DIR=/tmp/plr   # tmpfs: the replayed device and its per-state copies
CHK=/mnt/$TEST_NAME-check
mkdir -p "$CHK" "$REPLAY_DIR"

total_states=0
total_corrupt=0
total_lost=0

check "tools present" bash -c "[[ -x $WRITER && -x $REPLAY ]] && command -v dmsetup"
check "kernel has dm-log-writes" bash -c 'dmsetup targets | grep -w log-writes'
echo "      | seed $SEED, $OPS operations and $RANDOM_STATES random states per case"

data_size() {  # data_size FS: of the data device (mkfs.xfs wants more than 300 MB)
  if [[ $1 == xfs ]]; then echo 320M; else echo 256M; fi
}

# record_workload FS CACHE: data and log loop devices -> dm-log-writes -> FS -> image ->
# device -> writer; leaves $WORK/log.img, $WORK/journal.
record_workload() {
  local fs=$1 cache=$2 ldata llog dev
  rm -f "$WORK/data.img" "$WORK/log.img"
  truncate -s "$(data_size "$fs")" "$WORK/data.img"
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
  "$WRITER" write --dev "$dev" --journal "$WORK/journal" --ops "$OPS" --seed "$SEED" --dm "$DM" || return 1
  "$UQ" del -n "$(dev_id "$dev")" || return 1
  umount "$MNT" || return 1
  dmsetup remove --noudevsync "$DM" || return 1
  losetup -d "$ldata" "$llog"
  echo "log: $("$REPLAY" list --log "$WORK/log.img" | wc -l) entries, journal: $(grep -c '^[WZD]' "$WORK/journal") operations, $(grep -c '^M' "$WORK/journal") marks"
}

# Seconds spent per step (TCG makes every process start count), printed per case.
declare -A spent
timed() {  # timed STEP CMD...: runs CMD, adds its wall time (microseconds) to spent[STEP]
  local step=$1 t0=${EPOCHREALTIME/./} rc
  shift
  "$@"
  rc=$?
  spent[$step]=$((${spent[$step]:-0} + ${EPOCHREALTIME/./} - t0))
  return $rc
}

# check_state FS MARK: the replayed state, checked on its copy $REPLAY_DIR/copy.img.
# Prints what is wrong; returns 0 if nothing, 1 on corruption, 2 on lost flushed writes.
check_state() {
  local fs=$1 mark=$2 loop rc=0 out
  # mount -o loop attaches the copy and umount detaches it (fewer processes under TCG).
  if ! timed mount mount -t "$fs" -o loop "$REPLAY_DIR/copy.img" "$CHK" 2>"$REPLAY_DIR/err"; then
    echo "mount failed: $(cat "$REPLAY_DIR/err")"
    return 1
  fi
  timed check qemu-img check "$CHK/img.qcow2" >"$REPLAY_DIR/err" 2>&1
  rc=$?
  if ((rc != 0 && rc != 3)); then
    echo "qemu-img check exit $rc:"
    head -n 20 "$REPLAY_DIR/err"
    rc=1
  elif ! timed convert qemu-img convert -O raw "$CHK/img.qcow2" "$REPLAY_DIR/raw" 2>"$REPLAY_DIR/err"; then
    echo "qemu-img convert failed: $(cat "$REPLAY_DIR/err")"
    rc=1
  else
    timed verify "$WRITER" verify --journal "$WORK/journal" --raw "$REPLAY_DIR/raw" --mark "$mark" \
      >"$REPLAY_DIR/verify"
    case $? in
      0) rc=0 ;;
      1) cat "$REPLAY_DIR/verify"; grep -q '^blocks .* corrupt 0$' "$REPLAY_DIR/verify" && rc=2 || rc=1 ;;
      *) cat "$REPLAY_DIR/verify"; rc=1 ;;
    esac
    lost_blocks=$(sed -n 's/^blocks [0-9]* lost \([0-9]*\) .*/\1/p' "$REPLAY_DIR/verify")
  fi
  timed umount umount "$CHK"
  return $rc
}

# replay_and_check FS: every planned state of $WORK/log.img.
replay_and_check() {
  local fs=$1 entry mark why rc states=0 corrupt=0 lost=0 start=$SECONDS shown_kind=(0 0 0)
  rm -f "$REPLAY_DIR"/*
  truncate -s "$(data_size "$fs")" "$REPLAY_DIR/state.img"
  "$REPLAY" plan --log "$WORK/log.img" --start ready --random "$RANDOM_STATES" \
    --at-least "$PER_CASE" --seed "$SEED" >"$WORK/plan" || return 1
  spent=()
  while read -r -u 9 entry mark why; do
    timed apply "$REPLAY" apply --log "$WORK/log.img" --target "$REPLAY_DIR/state.img" \
      --state "$REPLAY_DIR/position" --upto "$entry" --copy-to "$REPLAY_DIR/copy.img" || return 1
    lost_blocks=0
    check_state "$fs" "$mark" >"$WORK/state.out"
    rc=$?
    states=$((states + 1))
    if ((rc == 1)); then corrupt=$((corrupt + 1)); fi
    lost=$((lost + ${lost_blocks:-0}))
    # The first three of each kind of failure.
    if ((rc != 0 && shown_kind[rc]++ < 3)); then
      echo "state at entry $entry ($why, last mark m$mark):"
      sed 's/^/  /' "$WORK/state.out"
    fi
  done 9<"$WORK/plan"
  local step times=
  for step in apply mount check convert verify umount; do
    times+=" $step $((${spent[$step]:-0} / 1000000))"
  done
  echo "seconds per step:$times"
  echo "states $states corruptions $corrupt lost-flushed-writes $lost ($((SECONDS - start)) s)"
  total_states=$((total_states + states))
  total_corrupt=$((total_corrupt + corrupt))
  total_lost=$((total_lost + lost))
  ((states > 0 && corrupt == 0 && lost == 0))
}

for c in $CASES; do
  fs=${c%%:*}
  cache=${c#*:}
  check "$fs, --cache=$cache: workload recorded through dm-log-writes" record_workload "$fs" "$cache" || {
    "$UQ" del --all --force >/dev/null 2>&1
    mountpoint -q "$MNT" && umount "$MNT"
    dmsetup remove --noudevsync "$DM" 2>/dev/null
    losetup -j "$WORK/data.img" -O NAME -n | xargs -r losetup -d
    losetup -j "$WORK/log.img" -O NAME -n | xargs -r losetup -d
    continue
  }
  # Not through check(): its subshell would lose the totals.
  replay_and_check "$fs" >"$WORK/replay.out" 2>&1
  rc=$?
  check "$fs, --cache=$cache: every replayed state mounts, checks clean, keeps flushed writes" \
    bash -c "cat $WORK/replay.out; exit $rc"
done

echo "power-failure replay: states $total_states corruptions $total_corrupt lost-flushed-writes $total_lost"
check "at least $MIN_STATES states checked" test "$total_states" -ge "$MIN_STATES"
check "nothing left" no_leftovers
rm -rf "$REPLAY_DIR"
finish
