// The LUKS1 key-slot machinery: PBKDF2, the anti-forensic merge and the
// master key digest, all on OpenSSL's libcrypto (PKCS5_PBKDF2_HMAC, EVP
// digests); nothing here is a hand-written primitive.
//
// A key slot holds the master key split into `stripes` pieces (AF split)
// and encrypted with a key derived from the passphrase (PBKDF2 with the
// slot's salt and iteration count). Opening a slot: derive the slot key,
// decrypt the material (sectors numbered from 0), merge the stripes, and
// compare PBKDF2(candidate, digest salt, digest iterations) with the
// header's 20-byte digest. Every intermediate is SecretBytes (wiped).
//
// Thread model: pure functions.
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_KEY_DERIVATION_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_KEY_DERIVATION_H_

#include <openssl/evp.h>

#include <cstdint>
#include <span>

#include "base/status.h"
#include "qcow2/crypto/algorithms.h"
#include "qcow2/crypto/luks_header.h"
#include "qcow2/crypto/secret.h"

namespace uq::qcow2::crypto {

// PBKDF2-HMAC with `hash`: `length` bytes. Errors: IoError from libcrypto.
Result<SecretBytes> Pbkdf2(std::span<const std::byte> password, std::span<const std::byte> salt,
                           uint32_t iterations, const EVP_MD* hash, size_t length);

// LUKS1's diffuse: each digest-sized block b_i of `data` becomes
// H(be32(i) || b_i), the last (short) block truncated.
Status Diffuse(const EVP_MD* hash, std::span<std::byte> data);

// Merges `stripes` stripes of `key_bytes` each from `material` (at least
// key_bytes * stripes bytes): d = 0; d = Diffuse(d ^ s_i) for every stripe
// but the last; key = d ^ s_last.
Result<SecretBytes> AfMerge(const EVP_MD* hash, std::span<const std::byte> material,
                            uint32_t key_bytes, uint32_t stripes);

// The inverse, for writing a key slot: `key` spread over `stripes` stripes,
// all but the last random.
Result<SecretBytes> AfSplit(const EVP_MD* hash, std::span<const std::byte> key, uint32_t stripes);

// Whether `candidate` is the master key the header's digest describes.
Result<bool> MatchesDigest(const LuksHeader& header, const Algorithms& algorithms,
                           std::span<const std::byte> candidate);

// Tries `passphrase` on slot `slot` whose encrypted key material is
// `material` (key_bytes * stripes bytes, read from the image): the master
// key, or an empty SecretBytes when the passphrase does not open it.
Result<SecretBytes> OpenKeySlot(const LuksHeader& header, const Algorithms& algorithms,
                                const LuksKeySlot& slot, std::span<const std::byte> material,
                                std::span<const std::byte> passphrase);

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_KEY_DERIVATION_H_
