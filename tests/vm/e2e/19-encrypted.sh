#!/bin/bash
# Encrypted (LUKS) qcow2 images on the device (`add --key-file`):
#  1. qemu-img creates a LUKS image; the device serves it: mkfs.ext4, a tree of files and
#     a file of a known marker string, umount, device sha256, del; QEMU decrypts the image
#     (`qemu-img convert --object secret --image-opts ... -O raw`) to the same bytes, the
#     files verify on a loop mount of that copy, qemu-img check is clean, and the image
#     file holds no plaintext of the marker (the decrypted copy does: the oracle works);
#     while served: the passphrase is in no `list` output, record or log, nor anywhere in
#     the daemon's memory (wiped once the image is open), and the daemon has locked
#     memory (the master key, mlock);
#  2. a wrong passphrase, and none: exit 1, one line, no device, no record;
#  3. recovery: the daemon of an encrypted device SIGKILLed; `recover` without --key-file
#     is one line naming the device, with a wrong one fails and the device still waits;
#     with the key the device comes back and every byte written before verifies;
#  4. qemu-img's spelling of the key, `add --object secret,id=ID,file=FILE`, on an image
#     QEMU created with Serpent-256 in XTS (nettle's, which libcrypto lacks) and wrote
#     with qemu-io: the device reads what QEMU decrypts; then it writes, del, and QEMU
#     reads those bytes back and check is clean;
#  5. a legacy AES image (qemu-img -o encrypt.format=aes) served --read-only reads what QEMU
#     decrypts; without --read-only: one line, exit 1, no device.
source "$(dirname "$0")/lib.bash"

M=$((1024 * 1024))
key=$WORK/key
printf 'correct horse battery staple 19' >"$key"
printf 'not the passphrase' >"$WORK/bad-key"
img=$WORK/enc.qcow2
marker=UBLK-QCOW2-PLAINTEXT-MARKER-7f3a9c

# luks_create IMAGE SIZE [OPTIONS]: QEMU's PBKDF2 CPU-time probe fails now and then under TCG
# ("Unable to get accurate CPU usage"): retry that, nothing else.
luks_create() {
  local i err
  for ((i = 0; i < 20; i++)); do
    err=$(qemu-img create -q -f qcow2 --object "secret,id=s,file=$key" \
      -o "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10${3:+,$3}" "$1" "$2" 2>&1) &&
      return 0
    grep -q 'Unable to get accurate CPU usage' <<<"$err" || break
  done
  echo "$err"
  return 1
}

# QEMU's view of the image, decrypted with the key.
image_opts() { echo "driver=qcow2,file.filename=$1,encrypt.key-secret=s"; }
qemu_decrypt() {  # qemu_decrypt IMAGE RAW
  qemu-img convert --object "secret,id=s,file=$key" --image-opts "$(image_opts "$1")" -O raw "$2"
}
qemu_check_encrypted() {  # qemu_check_encrypted IMAGE [leaks allowed]
  local out rc=0
  out=$(qemu-img check --object "secret,id=s,file=$key" --image-opts "$(image_opts "$1")" 2>&1) || rc=$?
  echo "$out"
  if [[ ${2:-} == leaks ]]; then ((rc == 0 || rc == 3)); else ((rc == 0)) && grep -q 'No errors were found' <<<"$out"; fi
}

# The number of times FILE's bytes occur in PID's readable memory.
memory_hits() {
  python3 - "$1" "$2" <<'PY'
import sys
pid, needle = sys.argv[1], open(sys.argv[2], "rb").read()
hits = 0
with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
    for line in maps:
        parts = line.split()
        if "r" not in parts[1] or (len(parts) > 5 and parts[5] in ("[vvar]", "[vsyscall]")):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        try:
            mem.seek(lo)
            hits += mem.read(hi - lo).count(needle)
        except (OSError, ValueError):
            pass
print(hits)
PY
}

filesystem_round_trip() {
  local dev id pid hits dev_sum raw_sum
  luks_create "$img" 128M || return 1
  qemu-img info "$img" | grep -E 'encrypted|format: luks'
  dev=$(add_device --key-file "$key" -f "$img") || return 1
  id=$(dev_id "$dev")
  pid=$(daemon_pid "$id")
  grep -q '"encrypted":true' "/run/ublk-qcow2/$id.json" || { echo "record: $(cat "/run/ublk-qcow2/$id.json")"; return 1; }
  # The passphrase goes nowhere: list, record, log, the daemon's memory.
  if "$UQ" list | grep -qF "$(cat "$key")" || "$UQ" list --output=json | grep -qF "$(cat "$key")" ||
    grep -rqF "$(cat "$key")" /run/ublk-qcow2/; then
    echo "the passphrase leaked into list or /run/ublk-qcow2"
    return 1
  fi
  hits=$(memory_hits "$pid" "$key")
  echo "passphrase copies in the daemon's memory: $hits; $(grep VmLck "/proc/$pid/status")"
  [[ $hits == 0 ]] || return 1
  (($(awk '/VmLck/ {print $2}' "/proc/$pid/status") > 0)) || { echo "nothing locked"; return 1; }
  grep -q 'could not be locked' "/run/ublk-qcow2/$id.log" && { echo "the daemon could not mlock"; return 1; }

  mkfs.ext4 -q -F "$dev" || return 1
  mount "$dev" "$MNT" || return 1
  make_tree "$MNT/tree"
  for ((i = 0; i < 4000; i++)); do echo "$marker $i"; done >"$MNT/marker.txt"
  sums_of "$MNT" >"$WORK/sums"
  umount "$MNT" || return 1
  dev_sum=$(sha256sum <"$dev" | cut -d' ' -f1)
  "$UQ" del -n "$id" || return 1

  qemu_check_encrypted "$img" || return 1
  qemu_decrypt "$img" "$WORK/plain.raw" || return 1
  raw_sum=$(sha256sum <"$WORK/plain.raw" | cut -d' ' -f1)
  echo "device $dev_sum, QEMU's decryption $raw_sum"
  [[ $dev_sum == "$raw_sum" ]] || return 1
  mount -o ro,loop "$WORK/plain.raw" "$MNT" || return 1
  sums_of "$MNT" | diff "$WORK/sums" - || { umount "$MNT"; return 1; }
  umount "$MNT"
  echo "marker lines: decrypted copy $(grep -ac "$marker" "$WORK/plain.raw"), image file $(grep -ac "$marker" "$img")"
  (($(grep -ac "$marker" "$WORK/plain.raw") >= 4000)) || return 1
  ! grep -aq "$marker" "$img"
}
check "LUKS image: ext4 through the device, QEMU decrypts the same bytes, no plaintext in the file" filesystem_round_trip

no_device() {
  [[ $(count_block_devices) == 0 ]] || { echo "devices: $(echo /dev/ublkb*)"; return 1; }
  ! compgen -G '/sys/block/ublkb*' >/dev/null || { echo "sysfs: $(echo /sys/block/ublkb*)"; return 1; }
  [[ -z $("$UQ" list | tail -n +2) ]] || { "$UQ" list; return 1; }
  ! compgen -G '/run/ublk-qcow2/*.json' >/dev/null
}
expect_error "add with a wrong passphrase" 1 "$UQ" add --key-file "$WORK/bad-key" -f "$img"
check "nothing left by the wrong passphrase" no_device
expect_error "add of an encrypted image without --key-file" 1 "$UQ" add -f "$img"
check "nothing left by the missing passphrase" no_device

recovery() {
  local dev id pid rc err sum
  dev=$(add_device --key-file "$key" -f "$img") || return 1
  id=$(dev_id "$dev")
  head -c $((8 * M)) /dev/urandom >"$WORK/data"
  dd if="$WORK/data" of="$dev" bs=1M seek=16 oflag=direct conv=fsync status=none || return 1
  pid=$(daemon_pid "$id")
  kill -KILL "$pid"
  wait_gone "/proc/$pid" 10 || return 1
  for ((i = 0; i < 100; i++)); do
    "$UQ" list | grep -qE "^$id +$dev +awaiting-recovery " && break
    sleep 0.1
  done
  "$UQ" list | grep -E "^$id +$dev +awaiting-recovery " || { "$UQ" list; return 1; }
  rc=0
  err=$("$UQ" recover -n "$id" 2>&1) || rc=$?
  echo "recover without --key-file: status $rc: $err"
  [[ $rc == 1 && $(grep -c '' <<<"$err") == 1 && $err == "ublk-qcow2: ublk device $id: "*"--key-file"* ]] || return 1
  rc=0
  err=$("$UQ" recover -n "$id" --key-file "$WORK/bad-key" 2>&1) || rc=$?
  echo "recover with a wrong key: status $rc: $err"
  [[ $rc == 1 && $(grep -c '' <<<"$err") == 1 && $err == *"Invalid password"* ]] || return 1
  grep -qF "$(cat "$WORK/bad-key")" <<<"$err" && return 1
  "$UQ" list | grep -E "^$id +$dev +awaiting-recovery " || { "$UQ" list; return 1; }
  [[ $("$UQ" recover -n "$id" --key-file "$key") == "$dev" ]] || return 1
  "$UQ" list | grep -E "^$id +$dev +live "
  pid=$(daemon_pid "$id")
  echo "passphrase copies in the new daemon's memory: $(memory_hits "$pid" "$key")"
  [[ $(memory_hits "$pid" "$key") == 0 ]] || return 1
  sum=$(dd if="$dev" bs=1M skip=16 count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)
  [[ $sum == $(sha256sum <"$WORK/data" | cut -d' ' -f1) ]] || { echo "data differs after recover"; return 1; }
  "$UQ" del -n "$id" || return 1
  qemu_check_encrypted "$img" leaks || return 1
  qemu_decrypt "$img" "$WORK/plain2.raw" || return 1
  dd if="$WORK/plain2.raw" of="$WORK/part" bs=1M skip=16 count=8 status=none
  cmp "$WORK/data" "$WORK/part"
}
check "SIGKILL + recover --key-file: the device comes back with its data" recovery
# qemu-img's --object spelling of the key, on a cipher only nettle has.
object_secret() {
  local dev id s_img=$WORK/serpent.qcow2 dev_sum raw_sum
  luks_create "$s_img" 64M encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=xts || return 1
  qemu-img info "$s_img" | grep -E 'cipher alg|cipher mode'
  qemu-io --object "secret,id=s,file=$key" --image-opts "$(image_opts "$s_img")" \
    -c "write -P 0x5a 0 1M" -c "write -P 0x33 5M 300k" -c "write -P 0x77 40M 4k" >/dev/null || return 1
  qemu_decrypt "$s_img" "$WORK/serpent.raw" || return 1  # before add: the daemon locks the image
  raw_sum=$(sha256sum <"$WORK/serpent.raw" | cut -d' ' -f1)
  dev=$(add_device --object "secret,id=s,file=$key" -f "$s_img") || return 1
  id=$(dev_id "$dev")
  local ok=1
  "$UQ" list | grep -qF "$(cat "$key")" && { echo "the passphrase is in list"; ok=0; }
  dev_sum=$(sha256sum <"$dev" | cut -d' ' -f1)
  echo "device $dev_sum, QEMU's decryption $raw_sum"
  [[ $dev_sum == "$raw_sum" ]] || ok=0
  head -c $((3 * M + 4096)) /dev/urandom >"$WORK/sdata"
  dd if="$WORK/sdata" of="$dev" bs=4096 seek=1000 oflag=direct conv=fsync status=none || ok=0
  "$UQ" del -n "$id" || return 1
  ((ok)) || return 1
  qemu_check_encrypted "$s_img" || return 1
  qemu_decrypt "$s_img" "$WORK/serpent2.raw" || return 1
  dd if="$WORK/serpent2.raw" of="$WORK/spart" bs=4096 skip=1000 count=$(((3 * M + 4096) / 4096)) status=none
  cmp "$WORK/sdata" "$WORK/spart" || return 1
  # Everything else as QEMU wrote it.
  dd if="$WORK/serpent.raw" of="$WORK/serpent-head" bs=4096 count=1000 status=none
  cmp -n $((1000 * 4096)) "$WORK/serpent-head" "$WORK/serpent2.raw"
}
check "add --object secret,id=ID,file=FILE on a Serpent-XTS image: QEMU's bytes, writes QEMU reads" object_secret
# Legacy AES (crypt_method 1): QEMU's system emulators refuse it; we serve it read-only.
legacy_aes() {
  local dev aes=$WORK/aes.qcow2 dev_sum raw_sum
  qemu-img create -q -f qcow2 --object "secret,id=s,file=$key" \
    -o encrypt.format=aes,encrypt.key-secret=s "$aes" 32M || return 1
  qemu-io --object "secret,id=s,file=$key" --image-opts "$(image_opts "$aes")" \
    -c "write -P 0x5a 0 1M" -c "write -P 0x33 5M 300k" >/dev/null || return 1
  dev=$(add_device --read-only --key-file "$key" -f "$aes") || return 1
  dev_sum=$(sha256sum <"$dev" | cut -d' ' -f1)
  "$UQ" del -n "$(dev_id "$dev")" || return 1
  qemu_decrypt "$aes" "$WORK/aes.raw" || return 1
  raw_sum=$(sha256sum <"$WORK/aes.raw" | cut -d' ' -f1)
  echo "read-only device $dev_sum, QEMU's decryption $raw_sum"
  [[ $dev_sum == "$raw_sum" ]]
}
check "legacy AES image served --read-only: the bytes QEMU decrypts" legacy_aes
expect_error "legacy AES image without --read-only" 1 "$UQ" add --key-file "$key" -f "$WORK/aes.qcow2"
check "nothing left by the refused AES add" no_device
check "no device, daemon or record left" no_leftovers
finish
