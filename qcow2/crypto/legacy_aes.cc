#include "qcow2/crypto/legacy_aes.h"

#include <algorithm>
#include <cstring>

#include "qcow2/crypto/algorithms.h"

namespace uq::qcow2::crypto {

inline constexpr size_t kLegacyAesKeyBytes = 16;

SecretBytes LegacyAesKey(std::span<const std::byte> passphrase) {
  SecretBytes key(kLegacyAesKeyBytes);  // zeros
  size_t n = 0;
  while (n < passphrase.size() && n < kLegacyAesKeyBytes && passphrase[n] != std::byte{0}) ++n;
  if (n > 0) std::memcpy(key.data(), passphrase.data(), n);
  return key;
}

Result<SectorCipher> LegacyAesCipher(std::span<const std::byte> passphrase) {
  ASSIGN_OR_RETURN(Algorithms algorithms,
                   AlgorithmsFromOptions("aes-128", "cbc", "plain64", "", "sha256"));
  SecretBytes key = LegacyAesKey(passphrase);
  ASSIGN_OR_RETURN(SectorCipher cipher, SectorCipher::Create(algorithms, key.span()));
  (void)cipher.LockKeys();  // best effort; the daemon warns (LockFailed)
  return cipher;
}

}  // namespace uq::qcow2::crypto
