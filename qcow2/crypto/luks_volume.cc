#include "qcow2/crypto/luks_volume.h"

#include <fmt/format.h>

#include "base/aligned_buffer.h"
#include "qcow2/crypto/key_derivation.h"

namespace uq::qcow2::crypto {
namespace {

constexpr uint64_t kAlign = 4096;

// Reads [offset, offset + out_len) of the file through an aligned window
// (the file may be open with O_DIRECT); bytes past its end read as zeros.
Task<Result<SecretBytes>> ReadRange(File& file, uint64_t offset, uint64_t length) {
  const uint64_t start = offset & ~(kAlign - 1);
  const uint64_t end = (offset + length + kAlign - 1) & ~(kAlign - 1);
  AlignedBuffer buf(end - start);
  CO_RETURN_IF_ERROR(co_await file.ReadZeroPadded(start, buf.span()));
  co_return SecretBytes(buf.span().subspan(offset - start, length));
}

}  // namespace

Task<Result<LuksDescription>> ReadLuksArea(File& file, uint64_t area_offset, uint64_t area_length,
                                           bool names_only) {
  if (area_length < kLuksHeaderSize) {
    co_return Status::Corruption(
        fmt::format("{}: the encryption area ({} bytes) is too small for a LUKS header",
                    file.path(), area_length));
  }
  CO_ASSIGN_OR_RETURN(SecretBytes bytes, co_await ReadRange(file, area_offset, kLuksHeaderSize));
  LuksDescription d;
  CO_ASSIGN_OR_RETURN(d.header, ParseLuksHeader(bytes.span(), area_length, file.path()));
  CO_ASSIGN_OR_RETURN(d.algorithms, ResolveAlgorithms(d.header.cipher_name, d.header.cipher_mode,
                                                      d.header.hash_spec, d.header.key_bytes,
                                                      file.path(), names_only));
  co_return d;
}

Task<Result<std::unique_ptr<LuksVolume>>> LuksVolume::Unlock(
    File& file, uint64_t area_offset, uint64_t area_length, std::span<const std::byte> passphrase) {
  CO_ASSIGN_OR_RETURN(LuksDescription d, co_await ReadLuksArea(file, area_offset, area_length));
  for (const LuksKeySlot& slot : d.header.slots) {
    if (!slot.active) continue;
    CO_ASSIGN_OR_RETURN(
        SecretBytes material,
        co_await ReadRange(file, area_offset + uint64_t{slot.key_offset} * kLuksSectorSize,
                           d.header.split_key_bytes(slot)));
    Result<SecretBytes> key =
        OpenKeySlot(d.header, d.algorithms, slot, material.span(), passphrase);
    if (!key.ok()) co_return key.status().WithContext(file.path());
    if (key->empty()) continue;
    Result<SectorCipher> cipher = SectorCipher::Create(d.algorithms, key->span());
    if (!cipher.ok()) co_return cipher.status().WithContext(file.path());
    auto volume = std::make_unique<LuksVolume>(std::move(d), std::move(*key), std::move(*cipher));
    (void)volume->LockKey();  // best effort; the daemon warns (crypto::LockFailed)
    co_return volume;
  }
  co_return Status::InvalidArgument(
      fmt::format("{}: Invalid password, cannot unlock any keyslot", file.path()));
}

Status LuksVolume::Encrypt(uint64_t host_offset, std::span<std::byte> data) const {
  return cipher_.Encrypt(host_offset / kLuksSectorSize, data);
}

Status LuksVolume::Decrypt(uint64_t host_offset, std::span<std::byte> data) const {
  return cipher_.Decrypt(host_offset / kLuksSectorSize, data);
}

}  // namespace uq::qcow2::crypto
