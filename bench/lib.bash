# bench/lib.bash: what the benchmark scripts share, on the host and in the VM.
# Source it after defining ROOT (the repository) and log() (one progress line
# on stderr).

# bench_install CMD:PACKAGE...: installs (apt-get) the packages whose command
# is missing. CMD may be an absolute path (/usr/bin/time:time).
bench_install() {
  local spec need=()
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null || need+=("${spec#*:}")
  done
  ((${#need[@]})) || return 0
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

# bench_daemon_pid BIN /dev/ublkbN: the pid of the ublk-qcow2 daemon serving
# the device, from `BIN list --output=json` (needs jq; the guest scripts use it).
bench_daemon_pid() {
  "$1" list --output=json | jq -r --arg d "$2" '.[] | select(.device == $d) | .pid'
}

# bench_binary: prints the ublk-qcow2 to measure: $BENCH_BIN, or a -c opt build
# (--symlink_prefix=/ leaves the shared bazel-bin link alone). Fails if there is none.
bench_binary() {
  local bin
  if [[ -n ${BENCH_BIN:-} ]]; then
    bin=$BENCH_BIN
  else
    log "building ublk-qcow2 (-c opt)"
    (cd "$ROOT" && bazel build -c opt --symlink_prefix=/ //tools:ublk-qcow2 >&2)
    bin=$(cd "$ROOT" && bazel info -c opt bazel-bin 2>/dev/null)/tools/ublk-qcow2
  fi
  [[ -x $bin ]] || { echo "no binary at $bin" >&2; return 1; }
  echo "$bin"
}
