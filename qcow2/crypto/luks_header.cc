#include "qcow2/crypto/luks_header.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "base/endian.h"

namespace uq::qcow2::crypto {
namespace {

constexpr std::array<unsigned char, 6> kMagic = {'L', 'U', 'K', 'S', 0xba, 0xbe};
constexpr size_t kOffVersion = 6;
constexpr size_t kOffCipherName = 8;
constexpr size_t kOffCipherMode = 40;
constexpr size_t kOffHashSpec = 72;
constexpr size_t kOffPayloadOffset = 104;
constexpr size_t kOffKeyBytes = 108;
constexpr size_t kOffMkDigest = 112;
constexpr size_t kOffMkDigestSalt = 132;
constexpr size_t kOffMkDigestIter = 164;
constexpr size_t kOffUuid = 168;
constexpr size_t kOffSlots = 208;
constexpr size_t kSlotSize = 48;

template <typename... Args>
Status Corrupt(const std::string& path, fmt::format_string<Args...> f, Args&&... args) {
  return Status::Corruption(
      fmt::format("{}: LUKS header: {}", path, fmt::format(f, std::forward<Args>(args)...)));
}

// A NUL-terminated name in a fixed field; nullopt-like "" plus ok=false when
// it fills the field without a NUL.
bool ReadName(std::span<const std::byte> field, std::string* out) {
  const auto* p = reinterpret_cast<const char*>(field.data());
  const size_t len = strnlen(p, field.size());
  if (len == field.size()) return false;
  out->assign(p, len);
  return true;
}

void WriteName(std::span<std::byte> field, const std::string& name) {
  std::memset(field.data(), 0, field.size());
  std::memcpy(field.data(), name.data(), std::min(name.size(), field.size() - 1));
}

}  // namespace

Result<LuksHeader> ParseLuksHeader(std::span<const std::byte> b, uint64_t area_length,
                                   const std::string& path) {
  if (b.size() < kLuksHeaderSize || area_length < kLuksHeaderSize) {
    return Corrupt(path, "the encryption area ({} bytes) is too small for a LUKS header",
                   area_length);
  }
  if (std::memcmp(b.data(), kMagic.data(), kMagic.size()) != 0) {
    return Corrupt(path, "bad magic (not a LUKS header)");
  }
  LuksHeader h;
  h.version = LoadBE16(b, kOffVersion);
  if (h.version != 1) {
    return Status::NotSupported(
        fmt::format("{}: LUKS header: version {} is not supported (only LUKS1)", path, h.version));
  }
  if (!ReadName(b.subspan(kOffCipherName, kLuksNameSize), &h.cipher_name) ||
      !ReadName(b.subspan(kOffCipherMode, kLuksNameSize), &h.cipher_mode) ||
      !ReadName(b.subspan(kOffHashSpec, kLuksNameSize), &h.hash_spec) ||
      !ReadName(b.subspan(kOffUuid, kLuksUuidSize), &h.uuid)) {
    return Corrupt(path, "a cipher, mode, hash or uuid field is not NUL-terminated");
  }
  h.payload_offset = LoadBE32(b, kOffPayloadOffset);
  h.key_bytes = LoadBE32(b, kOffKeyBytes);
  std::memcpy(h.mk_digest.data(), b.data() + kOffMkDigest, kLuksDigestSize);
  std::memcpy(h.mk_digest_salt.data(), b.data() + kOffMkDigestSalt, kLuksSaltSize);
  h.mk_digest_iterations = LoadBE32(b, kOffMkDigestIter);
  if (h.key_bytes == 0 || h.key_bytes > kLuksMaxKeyBytes) {
    return Corrupt(path, "master key size {} bytes (1 to {})", h.key_bytes, kLuksMaxKeyBytes);
  }
  if (h.mk_digest_iterations == 0 || h.mk_digest_iterations > kMaxIterations) {
    return Corrupt(path, "master key digest iterations {} (1 to {})", h.mk_digest_iterations,
                   kMaxIterations);
  }
  for (size_t i = 0; i < kLuksSlots; i++) {
    const size_t off = kOffSlots + i * kSlotSize;
    LuksKeySlot& s = h.slots[i];
    const uint32_t active = LoadBE32(b, off);
    if (active != kLuksSlotActive && active != kLuksSlotInactive) {
      return Corrupt(path, "key slot {} has state 0x{:08x} (neither active nor inactive)", i,
                     active);
    }
    s.active = active == kLuksSlotActive;
    s.iterations = LoadBE32(b, off + 4);
    std::memcpy(s.salt.data(), b.data() + off + 8, kLuksSaltSize);
    s.key_offset = LoadBE32(b, off + 40);
    s.stripes = LoadBE32(b, off + 44);
    if (s.stripes != kLuksStripes) {
      return Corrupt(path, "key slot {} has {} stripes (LUKS1 uses {})", i, s.stripes,
                     kLuksStripes);
    }
    if (s.active && (s.iterations == 0 || s.iterations > kMaxIterations)) {
      return Corrupt(path, "key slot {} has {} iterations (1 to {})", i, s.iterations,
                     kMaxIterations);
    }
    const uint64_t start = uint64_t{s.key_offset} * kLuksSectorSize;
    const uint64_t length = h.split_key_bytes(s);
    if (start < kLuksKeySlotAlign) {
      return Corrupt(path, "key slot {} key material at byte {} overlaps the header", i, start);
    }
    if (start > area_length || length > area_length - start) {
      return Corrupt(path,
                     "key slot {} key material (byte {}, {} bytes) lies outside the encryption "
                     "area ({} bytes)",
                     i, start, length, area_length);
    }
    if (start + length > uint64_t{h.payload_offset} * kLuksSectorSize) {
      return Corrupt(path,
                     "key slot {} key material (byte {}, {} bytes) overlaps the payload at "
                     "sector {}",
                     i, start, length, h.payload_offset);
    }
  }
  for (size_t i = 0; i < kLuksSlots; i++) {
    for (size_t j = i + 1; j < kLuksSlots; j++) {
      const uint64_t a = uint64_t{h.slots[i].key_offset} * kLuksSectorSize;
      const uint64_t c = uint64_t{h.slots[j].key_offset} * kLuksSectorSize;
      if (a < c + h.split_key_bytes(h.slots[j]) && c < a + h.split_key_bytes(h.slots[i])) {
        return Corrupt(path, "key slots {} and {} overlap", i, j);
      }
    }
  }
  return h;
}

std::vector<std::byte> SerializeLuksHeader(const LuksHeader& h) {
  std::vector<std::byte> out(kLuksHeaderSize);
  std::span<std::byte> b(out);
  std::memcpy(b.data(), kMagic.data(), kMagic.size());
  StoreBE16(b, kOffVersion, h.version);
  WriteName(b.subspan(kOffCipherName, kLuksNameSize), h.cipher_name);
  WriteName(b.subspan(kOffCipherMode, kLuksNameSize), h.cipher_mode);
  WriteName(b.subspan(kOffHashSpec, kLuksNameSize), h.hash_spec);
  StoreBE32(b, kOffPayloadOffset, h.payload_offset);
  StoreBE32(b, kOffKeyBytes, h.key_bytes);
  std::memcpy(b.data() + kOffMkDigest, h.mk_digest.data(), kLuksDigestSize);
  std::memcpy(b.data() + kOffMkDigestSalt, h.mk_digest_salt.data(), kLuksSaltSize);
  StoreBE32(b, kOffMkDigestIter, h.mk_digest_iterations);
  WriteName(b.subspan(kOffUuid, kLuksUuidSize), h.uuid);
  for (size_t i = 0; i < kLuksSlots; i++) {
    const size_t off = kOffSlots + i * kSlotSize;
    const LuksKeySlot& s = h.slots[i];
    StoreBE32(b, off, s.active ? kLuksSlotActive : kLuksSlotInactive);
    StoreBE32(b, off + 4, s.iterations);
    std::memcpy(b.data() + off + 8, s.salt.data(), kLuksSaltSize);
    StoreBE32(b, off + 40, s.key_offset);
    StoreBE32(b, off + 44, s.stripes);
  }
  return out;
}

}  // namespace uq::qcow2::crypto
