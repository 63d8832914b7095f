// SectorCipher: encrypts and decrypts data in 512-byte sectors, each with the
// IV its sector number gives (the LUKS ivgen), under one key.
//
// Used for the payload (the master key; qcow2 numbers sectors by their host
// offset in the image file, QEMU's crypt_physical_offset for LUKS) and for a
// key slot's key material (the slot key; sectors numbered from 0 at the
// start of the material). A range's last sector may be short (key material
// is key_bytes * 4000 bytes); CBC and ECB need it to be a multiple of 16.
//
// Thread model: const methods build their own cipher contexts per call, so
// one SectorCipher serves several threads at once (requests decrypted off the
// queue thread, Env::RunOffThread).
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_SECTOR_CIPHER_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_SECTOR_CIPHER_H_

#include <cstdint>
#include <span>

#include "base/status.h"
#include "qcow2/crypto/algorithms.h"
#include "qcow2/crypto/secret.h"

namespace uq::qcow2::crypto {

class SectorCipher {
 public:
  // REQUIRES: key.size() == algorithms.key_bytes. Errors: InvalidArgument
  // for a key of another size.
  static Result<SectorCipher> Create(const Algorithms& algorithms, std::span<const std::byte> key);

  // In place; `first_sector` numbers data[0..512). Errors: InvalidArgument
  // (a length the mode cannot take), IoError when libcrypto fails.
  Status Encrypt(uint64_t first_sector, std::span<std::byte> data) const;
  Status Decrypt(uint64_t first_sector, std::span<std::byte> data) const;

  // Moves its key copies into locked memory (SecretBytes::Lock); best
  // effort, false if any stayed unlocked. The per-call OpenSSL contexts hold
  // their key schedules only for the call and OpenSSL wipes them when freed.
  bool LockKeys() {
    const bool key = key_.Lock();
    return essiv_key_.Lock() && key;
  }

 private:
  SectorCipher() = default;
  Status Run(bool encrypt, uint64_t first_sector, std::span<std::byte> data) const;

  Algorithms algorithms_;
  SecretBytes key_;
  SecretBytes essiv_key_;  // the hash of the key (essiv only)
};

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_SECTOR_CIPHER_H_
