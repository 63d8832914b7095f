// The algorithms a LUKS header names, resolved to a library's implementations.
//
// A header names a cipher ("aes", "serpent", "twofish", "cast5") whose
// strength follows from its key size, a mode with an IV generator
// ("xts-plain64", "cbc-essiv:sha256", "ecb") and a hash for PBKDF2 and the
// anti-forensic splitter ("sha256"). QEMU (Debian 12's, on nettle) offers
// AES, Serpent and Twofish with 128/192/256-bit keys and CAST5 with 128, in
// XTS (not CAST5: its block is 8 bytes), CBC, CTR and ECB; IV generators
// plain (the sector number's low 32 bits), plain64 (all 64) and essiv (the
// sector number encrypted in ECB under the hash of the master key, by the
// same cipher family with a key of the hash's size); and the hashes md5,
// sha1, sha224, sha256, sha384, sha512 and ripemd160. All of these are
// accepted; anything else is NotSupported, naming it.
//
// Two libraries: OpenSSL's libcrypto for AES where it has the mode (hardware
// AES, the common case, `cipher` set), nettle for the rest (`nettle` set):
// AES-192 in XTS (libcrypto has no AES-192-XTS), Serpent, Twofish and CAST5,
// with nettle's generic XTS, CBC and CTR over the block cipher.
//
// Thread model: a plain value; the EVP and nettle handles are static objects.
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_ALGORITHMS_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_ALGORITHMS_H_

#include <openssl/evp.h>

#include <cstdint>
#include <string>

#include "base/status.h"
#include "qcow2/crypto/luks_header.h"

struct nettle_cipher;  // <nettle/nettle-meta.h>

namespace uq::qcow2::crypto {

enum class CipherMode { kXts, kCbc, kCtr, kEcb };
enum class IvGen { kNone, kPlain, kPlain64, kEssiv };

struct Algorithms {
  // Names as qemu-img info shows them.
  std::string cipher_name;     // the header's: "aes", "serpent", "twofish", "cast5"
  std::string cipher_alg;      // "aes-256"
  std::string cipher_mode;     // "xts"
  std::string ivgen_alg;       // "plain64" ("" for ecb)
  std::string ivgen_hash_alg;  // "sha256" (essiv only, else "")
  std::string hash_alg;        // "sha256"
  CipherMode mode = CipherMode::kXts;
  IvGen ivgen = IvGen::kPlain64;
  uint32_t key_bytes = 0;     // master key size (twice the cipher's key for XTS)
  uint32_t block_bytes = 16;  // the cipher's block (8 for CAST5); the IV's size but in ECB
  // Exactly one of `cipher` (libcrypto) and `nettle` is set once resolved.
  const EVP_CIPHER* cipher = nullptr;
  const nettle_cipher* nettle = nullptr;
  const EVP_MD* hash = nullptr;
  const EVP_MD* ivgen_hash = nullptr;  // essiv only
  // essiv only: the family's cipher keyed by the hash's size, in ECB; on the
  // library of the data cipher.
  const EVP_CIPHER* essiv_cipher = nullptr;
  const nettle_cipher* essiv_nettle = nullptr;
};

// Resolves the names in a header (`key_bytes` is the header's master key
// size). Errors: NotSupported naming the cipher, mode, ivgen or hash;
// Corruption for a key size the cipher cannot have. With `names_only` (info,
// which shows a header it cannot decrypt, as qemu-img info does) a cipher
// libcrypto lacks is no error: the names are filled, `cipher` stays null.
Result<Algorithms> ResolveAlgorithms(const std::string& cipher_name, const std::string& cipher_mode,
                                     const std::string& hash_spec, uint32_t key_bytes,
                                     const std::string& path, bool names_only = false);

// The same from create's option names (cipher_alg "aes-256", "serpent-128",
// "cast5-128", mode "xts",
// ivgen "plain64", ivgen hash "sha256" or "", hash "sha256"); fills in the key
// size. Used by create to fill a header.
Result<Algorithms> AlgorithmsFromOptions(const std::string& cipher_alg,
                                         const std::string& cipher_mode,
                                         const std::string& ivgen_alg,
                                         const std::string& ivgen_hash_alg,
                                         const std::string& hash_alg);

// The header's mode field for `a`: "xts-plain64", "cbc-essiv:sha256", "ecb".
std::string HeaderModeSpec(const Algorithms& a);

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_ALGORITHMS_H_
