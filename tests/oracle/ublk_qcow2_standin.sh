#!/bin/bash
# Stand-in for `ublk-qcow2` built on qemu-img, so the oracle harness can be
# checked against QEMU itself (every read_matrix case must pass against it).
# Implements only what the oracle tests call:
#   ublk_qcow2_standin.sh convert -O raw IMAGE OUT
#   ublk_qcow2_standin.sh info --output=json [--backing-chain] IMAGE
# Errors: one line `ublk-qcow2: <qemu-img's message>` on stderr, exit 1.
# The top image is always opened as qcow2 (-f qcow2), like the real tool.
set -u
fail() { echo "ublk-qcow2: $*" >&2; exit 1; }
oneline() { sed -e 's/^qemu-img: //' "$1" | tr '\n' ' ' | sed -e 's/ *$//'; }
err=$(mktemp) || exit 1
trap 'rm -f "$err"' EXIT
cmd=${1:-}; shift || true
case "$cmd" in
  convert)
    [ "$#" -eq 4 ] && [ "$1" = -O ] && [ "$2" = raw ] || fail "usage: convert -O raw IMAGE OUT"
    qemu-img convert -f qcow2 -O raw "$3" "$4" 2>"$err" || fail "$3: $(oneline "$err")"
    ;;
  info)
    args=()
    for a in "$@"; do
      case "$a" in
        --output=json|--backing-chain) args+=("$a") ;;
        -*) fail "unknown option $a" ;;
        *) image=$a ;;
      esac
    done
    [ -n "${image:-}" ] || fail "usage: info --output=json [--backing-chain] IMAGE"
    qemu-img info -f qcow2 "${args[@]}" "$image" 2>"$err" || fail "$image: $(oneline "$err")"
    ;;
  *) fail "unknown command '$cmd'" ;;
esac
exit 0
