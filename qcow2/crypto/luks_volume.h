// The LUKS area of an encrypted qcow2 image: its description (for info, no
// key needed) and, unlocked with a passphrase, the payload cipher.
//
// QEMU's qcow2 encrypts each 512-byte sector of guest data with the IV of its
// *host* sector number (the offset in the image file / 512; QEMU's
// crypt_physical_offset, true for LUKS), so the same guest data encrypts
// differently wherever it is allocated; compressed clusters are not
// encrypted (QEMU reads and writes them plain).
//
// Thread model: Unlock/ReadLuksArea on the image's thread; Encrypt/Decrypt
// are const and may run on any thread at once (SectorCipher).
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_LUKS_VOLUME_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_LUKS_VOLUME_H_

#include <cstdint>
#include <memory>
#include <span>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/crypto/algorithms.h"
#include "qcow2/crypto/luks_header.h"
#include "qcow2/crypto/secret.h"
#include "qcow2/crypto/sector_cipher.h"
#include "qcow2/file.h"

namespace uq::qcow2::crypto {

struct LuksDescription {
  LuksHeader header;
  Algorithms algorithms;
};

// Reads and checks the LUKS header at [area_offset, area_offset + area_length)
// of `file`, and resolves its algorithms (`names_only`: see ResolveAlgorithms).
// Errors: Corruption/NotSupported naming the file and the field; I/O errors.
Task<Result<LuksDescription>> ReadLuksArea(File& file, uint64_t area_offset, uint64_t area_length,
                                           bool names_only = false);

class LuksVolume {
 public:
  // Tries `passphrase` on every active key slot in turn. Errors (one line,
  // naming the file, never the passphrase): InvalidArgument "Invalid
  // password, cannot unlock any keyslot" (QEMU's words), those of
  // ReadLuksArea, I/O errors reading key material. The volume's keys are
  // locked in memory (LockKey; a refusal shows in crypto::LockFailed()).
  static Task<Result<std::unique_ptr<LuksVolume>>> Unlock(File& file, uint64_t area_offset,
                                                          uint64_t area_length,
                                                          std::span<const std::byte> passphrase);

  const LuksDescription& description() const { return description_; }

  // In place, whole sectors: `data` lies at host byte `host_offset` of the
  // image file. REQUIRES: host_offset % 512 == 0, data.size() % 512 == 0.
  Status Encrypt(uint64_t host_offset, std::span<std::byte> data) const;
  Status Decrypt(uint64_t host_offset, std::span<std::byte> data) const;

  // Keeps the master key and the cipher's copies of it out of swap and core
  // dumps (SecretBytes::Lock); best effort. Unlock() has done it.
  bool LockKey() {
    const bool master = master_key_.Lock();
    return cipher_.LockKeys() && master;
  }

  LuksVolume(LuksDescription description, SecretBytes master_key, SectorCipher cipher)
      : description_(std::move(description)),
        master_key_(std::move(master_key)),
        cipher_(std::move(cipher)) {}

 private:
  LuksDescription description_;
  SecretBytes master_key_;
  SectorCipher cipher_;
};

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_LUKS_VOLUME_H_
