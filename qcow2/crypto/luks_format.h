// Formatting a new LUKS1 area, as `qemu-img create -o encrypt.format=luks`
// lays it out inside a qcow2 image (QEMU's crypto/block-luks.c, facts only):
//
//   byte 0        the 592-byte header (luks_header.h)
//   byte 4096     key slot 0's material, then slots 1..7's places: each slot
//                 is key_bytes * 4000 bytes (the anti-forensic stripes),
//                 rounded up to 4 KiB, so slot i starts at sector
//                 8 + i * round_up(ceil(key_bytes * 4000 / 512), 8)
//   payload       right after slot 7's place: the area's length (2068480
//                 bytes for aes-256-xts's 64-byte key)
//
// Only slot 0 is active; the other slots are marked inactive (0xDEAD) with
// their offsets and 4000 stripes, their places zero. The master key, the
// salts and the UUID come from RAND_bytes; the master key digest is
// PBKDF2(master key, digest salt, digest iterations) truncated to 20 bytes;
// slot 0 holds AfSplit(master key) encrypted, sectors numbered from 0, with
// the payload's cipher keyed by PBKDF2(passphrase, slot salt, slot
// iterations).
//
// Iterations follow QEMU's rule: PBKDF2 is timed on this thread's CPU clock,
// the slot gets iter_time of it (at least 1000 iterations), the digest an
// eighth of that (at least 1000), so QEMU's default of 2000 ms spends about
// 2 s opening the slot. Counts are capped at kMaxIterations (what our
// reader accepts): we never write an image we cannot open.
//
// Key material (passphrase, master key, slot key, split key) lives only in
// SecretBytes and never enters a message.
//
// Thread model: pure functions (the timing runs on the calling thread).
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_LUKS_FORMAT_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_LUKS_FORMAT_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "qcow2/crypto/algorithms.h"
#include "qcow2/crypto/luks_header.h"

namespace uq::qcow2::crypto {

// QEMU's option names and defaults (aes-256-xts-plain64, sha256, 2000 ms).
struct LuksFormatOptions {
  std::string cipher_alg = "aes-256";
  std::string cipher_mode = "xts";
  std::string ivgen_alg = "plain64";
  // The essiv hash; empty: sha256, as QEMU defaults it. Ignored by plain and
  // plain64.
  std::string ivgen_hash_alg;
  std::string hash_alg = "sha256";
  // Milliseconds of PBKDF2 to spend opening key slot 0.
  uint64_t iter_time_ms = 2000;
  // Tests: fixed iteration counts instead of timing PBKDF2 (0: time it).
  uint32_t slot_iterations = 0;
  uint32_t digest_iterations = 0;
};

// QEMU's floor for both iteration counts.
inline constexpr uint32_t kLuksMinIterations = 1000;

struct LuksArea {
  LuksHeader header;
  Algorithms algorithms;
  // The whole area (header.payload_offset sectors): header, slot 0's
  // encrypted key material, zeros. Nothing in it is plaintext key material.
  std::vector<std::byte> bytes;
};

// The area's length for `key_bytes` (payload_offset in bytes), without
// building it: what create lays its clusters out for.
uint64_t LuksAreaLength(uint32_t key_bytes);

// Resolves and checks the options (cipher, mode, ivgen, hashes) alone.
// Errors: NotSupported naming what we or QEMU lack (e.g. "cipher 'sm4' is
// not supported", cast5-128 in xts mode, and a 192-bit cipher outside xts,
// whose key QEMU 7.2 aborts on).
Result<Algorithms> LuksAlgorithms(const LuksFormatOptions& options);

// Builds a new area whose slot 0 opens with `passphrase`. Errors: those of
// LuksAlgorithms; IoError when libcrypto (RAND_bytes, PBKDF2) fails. An
// iter_time asking for more than kMaxIterations gets kMaxIterations.
Result<LuksArea> FormatLuks(const LuksFormatOptions& options,
                            std::span<const std::byte> passphrase);

// PBKDF2 iterations per second with `hash` for one output block, timed on
// this thread's CPU clock for at least `min_cpu_ms`. Errors: IoError.
Result<uint64_t> Pbkdf2IterationsPerSecond(const EVP_MD* hash, uint64_t min_cpu_ms = 50);

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_LUKS_FORMAT_H_
