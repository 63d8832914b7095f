// The LUKS version 1 header as QEMU writes it at the start of a qcow2 image's
// encryption area (the full disk encryption header extension points at it):
// 592 bytes, big-endian, then 8 key slots' anti-forensic key material.
//
//   0  magic "LUKS\xba\xbe"      40  cipher_mode[32] ("xts-plain64")
//   6  version (1)               72  hash_spec[32] ("sha256")
//   8  cipher_name[32] ("aes")  104  payload_offset (sectors)
//  108 key_bytes                112  mk_digest[20]
//  132 mk_digest_salt[32]       164  mk_digest_iter
//  168 uuid[40]                 208  8 key slots of 48 bytes:
//      active (0x00AC71F3 / 0x0000DEAD), iterations, salt[32],
//      key_material_offset (sectors), stripes
//
// ParseLuksHeader() checks every field before anything is sized or looped
// from it: the version, NUL-terminated names, a key size a cipher can have,
// iteration counts between 1 and kMaxIterations (so a hostile image cannot
// make PBKDF2 run for hours), QEMU's stripe count, and key material that lies
// inside the area, after the header and without overlapping another slot's.
// Errors are Corruption (NotSupported for an unknown version) naming `path`
// and the field; nothing here is secret.
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_LUKS_HEADER_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_LUKS_HEADER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace uq::qcow2::crypto {

inline constexpr size_t kLuksHeaderSize = 592;
inline constexpr size_t kLuksSlots = 8;
inline constexpr uint64_t kLuksSectorSize = 512;
inline constexpr size_t kLuksDigestSize = 20;
inline constexpr size_t kLuksSaltSize = 32;
inline constexpr size_t kLuksNameSize = 32;
inline constexpr size_t kLuksUuidSize = 40;
inline constexpr uint32_t kLuksSlotActive = 0x00AC71F3;
inline constexpr uint32_t kLuksSlotInactive = 0x0000DEAD;
// LUKS1's anti-forensic stripe count; QEMU refuses any other.
inline constexpr uint32_t kLuksStripes = 4000;
// The largest master key (two AES-256 keys for XTS).
inline constexpr uint32_t kLuksMaxKeyBytes = 64;
// PBKDF2 iterations accepted per slot and for the digest. QEMU's 2 s default
// is timed with its own (faster) PBKDF2 for the slot key's length: on this
// class of machine aes-128-cbc with sha1 (one 20-byte block per 16-byte key)
// gets about 20 million, which 2^24 refused. 2^26 leaves room for a machine
// three times faster and is still about 15 s of SHA-256 per slot here with
// libcrypto: a hostile image cannot make us spin for hours.
inline constexpr uint32_t kMaxIterations = 1u << 26;
// Key material starts after the header, at 4 KiB (QEMU and cryptsetup align
// every slot to it).
inline constexpr uint64_t kLuksKeySlotAlign = 4096;

struct LuksKeySlot {
  bool active = false;
  uint32_t iterations = 0;
  std::array<std::byte, kLuksSaltSize> salt{};
  uint32_t key_offset = 0;  // sectors from the start of the area
  uint32_t stripes = kLuksStripes;
};

struct LuksHeader {
  uint16_t version = 1;
  std::string cipher_name;      // "aes"
  std::string cipher_mode;      // "xts-plain64", "cbc-essiv:sha256"
  std::string hash_spec;        // "sha256"
  uint32_t payload_offset = 0;  // sectors
  uint32_t key_bytes = 0;
  std::array<std::byte, kLuksDigestSize> mk_digest{};
  std::array<std::byte, kLuksSaltSize> mk_digest_salt{};
  uint32_t mk_digest_iterations = 0;
  std::string uuid;
  std::array<LuksKeySlot, kLuksSlots> slots{};

  // Bytes of one slot's key material (key_bytes * stripes).
  uint64_t split_key_bytes(const LuksKeySlot& slot) const {
    return uint64_t{key_bytes} * slot.stripes;
  }
};

// Parses and checks the header at the start of `area` (the area's first
// kLuksHeaderSize bytes at least); `area_length` bounds every key slot.
Result<LuksHeader> ParseLuksHeader(std::span<const std::byte> bytes, uint64_t area_length,
                                   const std::string& path);

// The header's 592 bytes (names must fit their fields with a NUL).
std::vector<std::byte> SerializeLuksHeader(const LuksHeader& header);

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_LUKS_HEADER_H_
