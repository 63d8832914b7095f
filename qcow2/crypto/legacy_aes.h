// The legacy qcow2 encryption (header crypt_method 1, `encrypt.format=aes`):
// the cipher it implies, from the passphrase alone.
//
// QEMU's crypto/block-qcow.c, read for the facts: AES-128 in CBC mode over
// 512-byte sectors, the IV of each sector its number in plain64 form (64
// bits little-endian, zero-padded to 16 bytes), the key the passphrase's
// bytes up to its first NUL (QEMU takes it as a C string), truncated or
// zero-padded to 16 bytes. There is no header, no salt and no check: a wrong
// passphrase decrypts to garbage, as with QEMU. block/qcow2.c numbers the
// sectors by their *guest* offset for this method (crypt_physical_offset is
// false), so the same data encrypts the same wherever it is allocated; QEMU's
// system emulators refuse such images ("Use of AES-CBC encrypted qcow2 images
// is no longer supported in system emulators") and only qemu-img still
// handles them, to get the data out. We read them and refuse to write them.
//
// Thread model: the SectorCipher returned is const-safe (sector_cipher.h).
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_LEGACY_AES_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_LEGACY_AES_H_

#include <cstddef>
#include <span>

#include "base/status.h"
#include "qcow2/crypto/sector_cipher.h"

namespace uq::qcow2::crypto {

// QEMU's key for `passphrase` (see the file comment).
SecretBytes LegacyAesKey(std::span<const std::byte> passphrase);

// The sector cipher of a legacy AES image; its keys locked in memory (best
// effort, LockFailed()). Sector numbers are guest offsets / 512. Errors:
// NotSupported when libcrypto lacks AES-128-CBC.
Result<SectorCipher> LegacyAesCipher(std::span<const std::byte> passphrase);

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_LEGACY_AES_H_
