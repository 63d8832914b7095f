#!/bin/bash
# systemd-analyze verify of ublk-qcow2@.service, with the files it names present: the
# unit is copied with its /usr/local/lib/ublk-qcow2/ paths pointed at a staging
# directory holding unit-start and unit-stop. Any warning fails the test (verify exits 0
# on unknown keys and bad values; it only prints them). Then the unit's key settings,
# which the design depends on (systemd/README.md), are checked by name.
#
# Usage: unit_verify_test.sh UNIT UNIT_START UNIT_STOP
set -u
unit=$(realpath "$1")
start=$(realpath "$2")
stop=$(realpath "$3")
work=$(mktemp -d "${TEST_TMPDIR:-/tmp}/unit_verify.XXXXXX")
trap 'rm -rf "$work"' EXIT
command -v systemd-analyze >/dev/null || { echo "FAIL: systemd-analyze not found (Debian: systemd)"; exit 1; }

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

mkdir -p "$work/lib"
cp "$start" "$stop" "$work/lib/"
chmod +x "$work/lib/unit-start" "$work/lib/unit-stop"
sed "s#/usr/local/lib/ublk-qcow2/#$work/lib/#g" "$unit" >"$work/ublk-qcow2@.service"
grep -q "$work/lib/unit-start %i" "$work/ublk-qcow2@.service" || fail "ExecStart does not name unit-start"

# The template, and an instance of it.
cp "$work/ublk-qcow2@.service" "$work/ublk-qcow2@0.service"
for u in "ublk-qcow2@.service" "ublk-qcow2@0.service"; do
  out=$(cd "$work" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "./$u" 2>&1)
  rc=$?
  if ((rc != 0)) || [[ -n $out ]]; then
    fail "systemd-analyze verify $u: status $rc"
    printf '%s\n' "$out" | sed 's/^/    /'
  else
    echo "ok: systemd-analyze verify $u"
  fi
done

# A unit that names a missing program must fail here: the check has teeth.
sed "s#$work/lib/unit-stop#$work/lib/missing#" "$work/ublk-qcow2@.service" >"$work/bad@.service"
if (cd "$work" && systemd-analyze verify ./bad@.service >/dev/null 2>&1); then
  fail "verify accepted a unit whose ExecStop does not exist"
fi

# The settings the design rests on.
want() {
  grep -qx "$1" "$unit" || fail "the unit lacks '$1'"
}
want "Type=notify"
want "NotifyAccess=main"
want "EnvironmentFile=/etc/ublk-qcow2/%i.conf"
want "ExecStart=/usr/local/lib/ublk-qcow2/unit-start %i"
want "ExecStop=/usr/local/lib/ublk-qcow2/unit-stop %i"
want "Restart=on-failure"

((failures == 0)) && echo "PASS" || echo "$failures failure(s)"
((failures == 0))
