# tests/power/replay-check.bash: checks the crash states of one recorded dm-log-writes log,
# sourced by tests/vm/e2e/23-power-failure.sh (in the VM) and tests/power/soak (on the
# host, where process starts cost milliseconds instead of TCG's tenths of a second).
#
#   replay_states FS LOG JOURNAL PLAN DIR
#
# replays LOG (of a data device holding file system FS, ext4 or xfs) onto DIR/state.img,
# incrementally, to each entry of PLAN (lines "ENTRY MARK WHY", from `plr-replay plan`), and
# checks a copy of every such state (DIR/copy.img):
#   - it mounts (the file system replays its journal),
#   - `qemu-img check` of img.qcow2 on it reports no corruption (leaks allowed: exit 0 or 3),
#   - read through the image (`qemu-img convert -O raw`), it holds every block JOURNAL says
#     was acknowledged before the last flush that completed before that point, with its
#     content, and nothing torn or misplaced (`plr-writer verify`); or, with
#     PLR_WORKLOAD=files, the ext4 the device held mounts and its files are as the marks
#     allow (`plr-writer verify-files`; a lost file counts as a lost flushed write).
# Prints the first three failures of each kind, the seconds spent per step, and last
#   states N corruptions C lost-flushed-writes L (S s)
# Returns 0 if N > 0 and C = L = 0. Needs PLR_WRITER and PLR_REPLAY (the tools' paths) and
# DATA_SIZE (the data device's size, truncate(1) syntax); uses DIR/mnt as the mount point.

# Seconds spent per step (process starts count), printed per call.
declare -A plr_spent
plr_timed() {  # plr_timed STEP CMD...: runs CMD, adds its wall time (microseconds)
  local step=$1 t0=${EPOCHREALTIME/./} rc
  shift
  "$@"
  rc=$?
  plr_spent[$step]=$((${plr_spent[$step]:-0} + ${EPOCHREALTIME/./} - t0))
  return $rc
}

# plr_mount FS OPTIONS IMAGE DIR: mounts IMAGE through a loop device of its own. Not
# `mount -o loop`: that reuses a loop device still attached to the same file (the one the
# previous state's umount is detaching, asynchronously), whose page cache holds the
# previous state's blocks, and the file system then reads those (seen on the host: files
# showing generations long replaced). A new device, detached synchronously, never does.
plr_mount() {
  local fs=$1 opts=$2 image=$3 dir=$4 dev
  dev=$(losetup -f --show "$image") || return 1
  if ! mount -t "$fs" ${opts:+-o "$opts"} "$dev" "$dir"; then
    losetup -d "$dev"
    return 1
  fi
}
plr_umount() {  # plr_umount DIR
  local dev
  dev=$(findmnt -n -o SOURCE --target "$1") || return 1
  umount "$1" && losetup -d "$dev"
}

# plr_verdict STATUS UNIT REPORT: plr-writer verify's (or verify-files') exit STATUS and its
# REPORT ("UNIT N lost L corrupt C") as plr_check_state's result; sets plr_lost_blocks.
plr_verdict() {
  local status=$1 unit=$2 report=$3
  plr_lost_blocks=$(sed -n "s/^$unit [0-9]* lost \([0-9]*\) .*/\1/p" "$report")
  ((status == 0)) && return 0
  cat "$report"
  ((status == 1)) && grep -q "^$unit .* corrupt 0\$" "$report" && return 2
  return 1
}

# plr_check_state FS JOURNAL MARK DIR: the replayed state on DIR/copy.img. Prints what is
# wrong; returns 0 if nothing, 1 on corruption, 2 on lost flushed writes only (their block
# count in plr_lost_blocks).
plr_check_state() {
  local fs=$1 journal=$2 mark=$3 dir=$4 rc=0
  local mnt=$dir/mnt
  plr_lost_blocks=0
  # nouuid: parallel checkers mount copies of one XFS at once.
  local opts=
  [[ $fs == xfs ]] && opts=nouuid
  if ! plr_timed mount plr_mount "$fs" "$opts" "$dir/copy.img" "$mnt" 2>"$dir/err"; then
    echo "mount failed: $(cat "$dir/err")"
    return 1
  fi
  plr_timed check qemu-img check "$mnt/img.qcow2" >"$dir/err" 2>&1
  rc=$?
  if ((rc != 0 && rc != 3)); then
    echo "qemu-img check exit $rc:"
    head -n 20 "$dir/err"
    rc=1
  elif ! plr_timed convert qemu-img convert -O raw "$mnt/img.qcow2" "$dir/raw" 2>"$dir/err"; then
    echo "qemu-img convert failed: $(cat "$dir/err")"
    rc=1
  elif [[ ${PLR_WORKLOAD:-blocks} == files ]]; then
    # The device held ext4: it must mount (replaying its own journal), and its files be as
    # the marks allow.
    rc=0
    if ! plr_timed mount plr_mount ext4 "" "$dir/raw" "$dir/inner" 2>"$dir/err"; then
      # Before the writer's first mark even mkfs may not be durable yet.
      if ((mark >= 0)); then
        echo "the device's ext4 does not mount: $(cat "$dir/err")"
        rc=1
      fi
    else
      plr_timed verify "$PLR_WRITER" verify-files --journal "$journal" --dir "$dir/inner" \
        --mark "$mark" >"$dir/verify"
      plr_verdict $? files "$dir/verify"
      rc=$?
      plr_timed umount plr_umount "$dir/inner"
    fi
  else
    plr_timed verify "$PLR_WRITER" verify --journal "$journal" --raw "$dir/raw" --mark "$mark" \
      >"$dir/verify"
    plr_verdict $? blocks "$dir/verify"
    rc=$?
  fi
  plr_timed umount plr_umount "$mnt"
  return $rc
}

replay_states() {
  local fs=$1 log=$2 journal=$3 plan=$4 dir=$5
  local entry mark why rc states=0 corrupt=0 lost=0 start=$SECONDS shown_kind=(0 0 0) step times=
  mkdir -p "$dir/mnt" "$dir/inner"
  rm -f "$dir/state.img" "$dir/position" "$dir/copy.img"
  truncate -s "$DATA_SIZE" "$dir/state.img"
  plr_spent=()
  while read -r -u 9 entry mark why; do
    plr_timed apply "$PLR_REPLAY" apply --log "$log" --target "$dir/state.img" \
      --state "$dir/position" --upto "$entry" --copy-to "$dir/copy.img" || return 1
    plr_check_state "$fs" "$journal" "$mark" "$dir" >"$dir/state.out"
    rc=$?
    states=$((states + 1))
    if ((rc == 1)); then corrupt=$((corrupt + 1)); fi
    lost=$((lost + ${plr_lost_blocks:-0}))
    # The first three of each kind of failure.
    if ((rc != 0 && shown_kind[rc]++ < 3)); then
      echo "state at entry $entry ($why, last mark m$mark):"
      sed 's/^/  /' "$dir/state.out"
    fi
  done 9<"$plan"
  for step in apply mount check convert verify umount; do
    times+=" $step $((${plr_spent[$step]:-0} / 1000000))"
  done
  echo "seconds per step:$times"
  echo "states $states corruptions $corrupt lost-flushed-writes $lost ($((SECONDS - start)) s)"
  rm -f "$dir/state.img" "$dir/copy.img" "$dir/raw"
  ((states > 0 && corrupt == 0 && lost == 0))
}

# plr_data_size FS: the data device's size (mkfs.xfs wants more than 300 MB).
plr_data_size() {
  if [[ $1 == xfs ]]; then echo 320M; else echo 256M; fi
}
