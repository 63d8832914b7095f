// NettleSectors: the sector cipher's path for what OpenSSL's libcrypto lacks
// (AES-192 in XTS, Serpent, Twofish, CAST5), on nettle's block ciphers and
// its generic modes: xts_encrypt_message/xts_decrypt_message (IEEE P1619 over
// any 16-byte block cipher), cbc_encrypt/cbc_decrypt, ctr_crypt, and the
// cipher itself for ECB. Nothing of a mode is written here; this file only
// keys the contexts and feeds nettle one 512-byte sector at a time with the
// IV its number gives (plain, plain64, essiv), as SectorCipher does for
// libcrypto.
//
// Thread model: a function; its contexts live for the call and are wiped
// when it returns, so any number of threads may call it at once.
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_NETTLE_SECTORS_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_NETTLE_SECTORS_H_

#include <cstdint>
#include <span>

#include "base/status.h"
#include "qcow2/crypto/algorithms.h"

namespace uq::qcow2::crypto {

// Encrypts (or decrypts) `data` in place, sector `first_sector` first.
// REQUIRES: a.nettle set (and a.essiv_nettle for essiv); key.size() ==
// a.key_bytes; essiv_key the hash of the key (essiv only, else empty).
// Errors: InvalidArgument for a length the mode cannot take (CBC and ECB:
// not whole blocks; XTS: a sector under 16 bytes).
Status NettleSectors(const Algorithms& a, std::span<const std::byte> key,
                     std::span<const std::byte> essiv_key, bool encrypt, uint64_t first_sector,
                     std::span<std::byte> data);

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_NETTLE_SECTORS_H_
