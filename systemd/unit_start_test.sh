#!/bin/bash
# unit-start's choice between add, recover and refusing, and unit-stop's between del and
# leaving the device for the restart, with a fake ublk-qcow2 (UBLK_QCOW2) that prints a
# given `list --output=json` (in the layout of tools/list_command.cc) and records the
# command it was run with.
#
# Usage: unit_start_test.sh UNIT_START UNIT_STOP
set -u
start=$(realpath "$1")
stop=$(realpath "$2")
work=$(mktemp -d "${TEST_TMPDIR:-/tmp}/unit_start.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# The fake binary: `list` prints $work/list.json (or fails with list.fail present); any
# other command is appended to $work/calls, one line each.
cat >fake-ublk-qcow2 <<FAKE
#!/bin/bash
if [[ \$1 == list ]]; then
  [[ -e $work/list.fail ]] && { echo "ublk-qcow2: /dev/ublk-control: No such file or directory" >&2; exit 1; }
  cat $work/list.json
  exit 0
fi
echo "\$*" >>$work/calls
exit 0
FAKE
chmod +x fake-ublk-qcow2
export UBLK_QCOW2=$work/fake-ublk-qcow2

# device ID STATE DAEMON_RUNNING RECOVERY: one entry of `list --output=json`.
device() {
  cat <<JSON
    {
        "id": $1,
        "device": "/dev/ublkb$1",
        "state": "$2",
        "queues": 1,
        "depth": 128,
        "pid": 4242,
        "daemon_running": $3,
        "size": 67108864,
        "read_only": false,
        "image": "/images/state \"live\" $1.qcow2",
        "flags": [
            "USER_RECOVERY",
            "CMD_IOCTL_ENCODE"
        ],
        "recovery": $4
    }
JSON
}
# listing ENTRY...: the whole JSON array.
listing() {
  local first=1 e
  echo "["
  for e in "$@"; do
    ((first)) || echo ","
    first=0
    printf '%s' "$e"
  done
  echo
  echo "]"
}

# case NAME WANT_STATUS WANT_CALLS...: runs unit-start 3 with IMAGE/OPTIONS set; the
# fake must have been called with exactly WANT_CALLS, in order.
run_case() {
  local name=$1 want_status=$2
  shift 2
  rm -f calls
  local err rc
  err=$(IMAGE=${IMAGE-/images/a b.qcow2} OPTIONS=${OPTIONS---recovery=reissue -q 2 --cache=writeback} \
    "$start" "${INSTANCE-3}" 2>&1 >/dev/null)
  rc=$?
  local got=""
  [[ -e calls ]] && got=$(cat calls)
  local want=""
  (($#)) && want=$(printf '%s\n' "$@")
  if [[ $rc != "$want_status" ]]; then
    fail "$name: status $rc, want $want_status (stderr: $err)"
  elif [[ $got != "$want" ]]; then
    fail "$name: ran '$got', want '$want'"
  elif ((rc != 0)) && [[ $(printf '%s\n' "$err" | grep -c '') != 1 || $err != ublk-qcow2@* ]]; then
    fail "$name: want one error line 'ublk-qcow2@...', got: $err"
  else
    echo "ok: $name"
  fi
  [[ -n $err ]] && printf '%s\n' "$err" | sed 's/^/    | /'
}

ADD="add --foreground -n 3 -f /images/a b.qcow2 --recovery=reissue -q 2 --cache=writeback"
RECOVER="recover --foreground -n 3"

listing >list.json
run_case "no device at all: add, OPTIONS split into words" 0 "$ADD"

listing "$(device 3 awaiting-recovery false '"reissue"')" >list.json
run_case "device awaiting recovery: recover" 0 "$RECOVER"

listing "$(device 3 live false '"reissue"')" >list.json
run_case "daemon just died, kernel not yet quiesced, recovery on: recover (it waits)" 0 "$RECOVER"

listing "$(device 3 fail-io false '"fail-io"')" >list.json
run_case "fail-io device without a daemon: recover" 0 "$RECOVER"

listing "$(device 3 live true '"reissue"')" >list.json
run_case "device served by a running daemon: refused" 1

listing "$(device 3 dead false '"reissue"')" >list.json
run_case "dead device (never started): del --force, then add" 0 "del --force -n 3" "$ADD"

listing "$(device 3 live false '"off"')" >list.json
run_case "device without recovery whose daemon died: del --force, then add" 0 "del --force -n 3" "$ADD"

listing "$(device 3 gone false null)" >list.json
run_case "stale record only: add" 0 "$ADD"

listing "$(device 30 awaiting-recovery false '"reissue"')" "$(device 13 live true '"reissue"')" >list.json
run_case "other devices (30, 13) do not count for 3: add" 0 "$ADD"

listing "$(device 1 live true '"reissue"')" "$(device 3 awaiting-recovery false '"reissue"')" >list.json
run_case "device 3 after another in the list: recover" 0 "$RECOVER"

listing >list.json
IMAGE="" run_case "no IMAGE in the conf file: refused" 1
OPTIONS="" run_case "no OPTIONS: plain add" 0 "add --foreground -n 3 -f /images/a b.qcow2"
OPTIONS="--preallocate=*" run_case "OPTIONS are not globbed" 0 \
  "add --foreground -n 3 -f /images/a b.qcow2 --preallocate=*"
INSTANCE=abc run_case "instance that is not a number: refused" 1
INSTANCE="" run_case "no instance: refused" 1
touch list.fail
run_case "list fails (no ublk): refused, saying why in one line" 1
rm -f list.fail

# unit-stop: del while the daemon runs, nothing once it has ended.
stop_case() {
  local name=$1 mainpid=$2 want=$3
  rm -f calls
  local rc got=""
  if [[ $mainpid == unset ]]; then
    env -u MAINPID "$stop" 3 2>/dev/null
  else
    MAINPID=$mainpid "$stop" 3 2>/dev/null
  fi
  rc=$?
  [[ -e calls ]] && got=$(cat calls)
  if ((rc != 0)) || [[ $got != "$want" ]]; then
    fail "$name: status $rc, ran '$got', want '$want'"
  else
    echo "ok: $name"
  fi
}
stop_case "systemctl stop while the daemon runs: del -n 3" 1234 "del -n 3"
stop_case "the daemon died (MAINPID unset): the device is left for the restart" unset ""
stop_case "MAINPID empty: the same" "" ""

((failures == 0)) && echo "PASS" || echo "$failures failure(s)"
((failures == 0))
