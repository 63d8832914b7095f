#include "qcow2/crypto/key_derivation.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>

#include "qcow2/crypto/sector_cipher.h"

namespace uq::qcow2::crypto {
namespace {

Status CryptoError(const char* what) {
  return Status::IoError(std::string("libcrypto: ") + what + " failed");
}

void XorInto(std::span<std::byte> d, std::span<const std::byte> s) {
  for (size_t i = 0; i < d.size(); i++) d[i] ^= s[i];
}

}  // namespace

Result<SecretBytes> Pbkdf2(std::span<const std::byte> password, std::span<const std::byte> salt,
                           uint32_t iterations, const EVP_MD* hash, size_t length) {
  if (iterations == 0 || iterations > INT_MAX || password.size() > INT_MAX) {
    return Status::InvalidArgument("PBKDF2 parameters out of range");
  }
  SecretBytes out(length);
  if (PKCS5_PBKDF2_HMAC(
          reinterpret_cast<const char*>(password.data()), static_cast<int>(password.size()),
          reinterpret_cast<const unsigned char*>(salt.data()), static_cast<int>(salt.size()),
          static_cast<int>(iterations), hash, static_cast<int>(length), out.uchar()) != 1) {
    return CryptoError("PBKDF2");
  }
  return out;
}

Status Diffuse(const EVP_MD* hash, std::span<std::byte> data) {
  const size_t ds = static_cast<size_t>(EVP_MD_get_size(hash));
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  for (size_t i = 0, off = 0; off < data.size(); i++, off += ds) {
    const size_t n = std::min(ds, data.size() - off);
    const std::array<unsigned char, 4> be = {
        static_cast<unsigned char>(i >> 24), static_cast<unsigned char>(i >> 16),
        static_cast<unsigned char>(i >> 8), static_cast<unsigned char>(i)};
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    unsigned int len = 0;
    const bool ok = ctx != nullptr && EVP_DigestInit_ex(ctx, hash, nullptr) == 1 &&
                    EVP_DigestUpdate(ctx, be.data(), be.size()) == 1 &&
                    EVP_DigestUpdate(ctx, data.data() + off, n) == 1 &&
                    EVP_DigestFinal_ex(ctx, digest.data(), &len) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) return CryptoError("the AF diffuse digest");
    std::memcpy(data.data() + off, digest.data(), n);
  }
  OPENSSL_cleanse(digest.data(), digest.size());
  return Status::Ok();
}

Result<SecretBytes> AfMerge(const EVP_MD* hash, std::span<const std::byte> material,
                            uint32_t key_bytes, uint32_t stripes) {
  if (stripes == 0 || material.size() < uint64_t{key_bytes} * stripes) {
    return Status::InvalidArgument("AF merge: short key material");
  }
  SecretBytes d(key_bytes);
  for (uint32_t i = 0; i + 1 < stripes; i++) {
    XorInto(d.span(), material.subspan(uint64_t{i} * key_bytes, key_bytes));
    RETURN_IF_ERROR(Diffuse(hash, d.span()));
  }
  XorInto(d.span(), material.subspan(uint64_t{stripes - 1} * key_bytes, key_bytes));
  return d;
}

Result<SecretBytes> AfSplit(const EVP_MD* hash, std::span<const std::byte> key, uint32_t stripes) {
  const size_t kb = key.size();
  SecretBytes out(kb * stripes);
  if (stripes > 1 && RAND_bytes(out.uchar(), static_cast<int>(kb * (stripes - 1))) != 1) {
    return CryptoError("RAND_bytes");
  }
  SecretBytes d(kb);
  for (uint32_t i = 0; i + 1 < stripes; i++) {
    XorInto(d.span(), out.span().subspan(uint64_t{i} * kb, kb));
    RETURN_IF_ERROR(Diffuse(hash, d.span()));
  }
  std::span<std::byte> last = out.span().subspan(uint64_t{stripes - 1} * kb, kb);
  std::memcpy(last.data(), d.data(), kb);
  XorInto(last, key);
  return out;
}

Result<bool> MatchesDigest(const LuksHeader& header, const Algorithms& algorithms,
                           std::span<const std::byte> candidate) {
  ASSIGN_OR_RETURN(SecretBytes digest,
                   Pbkdf2(candidate, header.mk_digest_salt, header.mk_digest_iterations,
                          algorithms.hash, kLuksDigestSize));
  return CRYPTO_memcmp(digest.data(), header.mk_digest.data(), kLuksDigestSize) == 0;
}

Result<SecretBytes> OpenKeySlot(const LuksHeader& header, const Algorithms& algorithms,
                                const LuksKeySlot& slot, std::span<const std::byte> material,
                                std::span<const std::byte> passphrase) {
  ASSIGN_OR_RETURN(SecretBytes slot_key, Pbkdf2(passphrase, slot.salt, slot.iterations,
                                                algorithms.hash, header.key_bytes));
  ASSIGN_OR_RETURN(SectorCipher cipher, SectorCipher::Create(algorithms, slot_key.span()));
  SecretBytes split(material.first(header.split_key_bytes(slot)));
  RETURN_IF_ERROR(cipher.Decrypt(0, split.span()));
  ASSIGN_OR_RETURN(SecretBytes candidate,
                   AfMerge(algorithms.hash, split.span(), header.key_bytes, slot.stripes));
  ASSIGN_OR_RETURN(bool match, MatchesDigest(header, algorithms, candidate.span()));
  if (!match) return SecretBytes();
  return candidate;
}

}  // namespace uq::qcow2::crypto
