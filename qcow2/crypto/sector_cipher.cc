#include "qcow2/crypto/sector_cipher.h"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>

#include "qcow2/crypto/luks_header.h"
#include "qcow2/crypto/nettle_sectors.h"

namespace uq::qcow2::crypto {
namespace {

struct CtxDeleter {
  void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CtxDeleter>;

constexpr size_t kMaxIv = 16;

Status CryptoError(const char* what) {
  return Status::IoError(fmt::format("libcrypto: {} failed", what));
}

// The sector number, little-endian, in the first 4 (plain) or 8 (plain64,
// essiv) bytes of an IV of `iv_len` bytes, zeros after.
void StoreSector(uint64_t sector, size_t width, std::span<unsigned char> iv) {
  std::fill(iv.begin(), iv.end(), 0);
  for (size_t i = 0; i < std::min(width, iv.size()); i++) iv[i] = (sector >> (8 * i)) & 0xff;
}

}  // namespace

Result<SectorCipher> SectorCipher::Create(const Algorithms& algorithms,
                                          std::span<const std::byte> key) {
  if (algorithms.cipher == nullptr && algorithms.nettle == nullptr) {
    return Status::NotSupported(fmt::format("cipher {} is not supported", algorithms.cipher_alg));
  }
  if (key.size() != algorithms.key_bytes) {
    return Status::InvalidArgument(fmt::format("a key of {} bytes for a cipher that takes {}",
                                               key.size(), algorithms.key_bytes));
  }
  SectorCipher c;
  c.algorithms_ = algorithms;
  c.key_ = SecretBytes(key);
  if (algorithms.ivgen == IvGen::kEssiv) {
    c.essiv_key_ = SecretBytes(static_cast<size_t>(EVP_MD_get_size(algorithms.ivgen_hash)));
    unsigned int n = 0;
    if (EVP_Digest(key.data(), key.size(), c.essiv_key_.uchar(), &n, algorithms.ivgen_hash,
                   nullptr) != 1) {
      return CryptoError("the essiv key digest");
    }
  }
  return c;
}

Status SectorCipher::Encrypt(uint64_t first_sector, std::span<std::byte> data) const {
  return Run(true, first_sector, data);
}

Status SectorCipher::Decrypt(uint64_t first_sector, std::span<std::byte> data) const {
  return Run(false, first_sector, data);
}

Status SectorCipher::Run(bool encrypt, uint64_t first_sector, std::span<std::byte> data) const {
  const Algorithms& a = algorithms_;
  if (a.nettle != nullptr) {
    return NettleSectors(a, key_.span(), essiv_key_.span(), encrypt, first_sector, data);
  }
  if ((a.mode == CipherMode::kCbc || a.mode == CipherMode::kEcb) && data.size() % 16 != 0) {
    return Status::InvalidArgument(
        fmt::format("{} bytes are not whole cipher blocks", data.size()));
  }
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  if (!ctx) return CryptoError("EVP_CIPHER_CTX_new");
  if (EVP_CipherInit_ex(ctx.get(), a.cipher, nullptr, key_.uchar(), nullptr, encrypt ? 1 : 0) !=
      1) {
    return CryptoError("the cipher's key setup");
  }
  EVP_CIPHER_CTX_set_padding(ctx.get(), 0);
  CipherCtx essiv;
  if (a.ivgen == IvGen::kEssiv) {
    essiv.reset(EVP_CIPHER_CTX_new());
    if (!essiv || EVP_EncryptInit_ex(essiv.get(), a.essiv_cipher, nullptr, essiv_key_.uchar(),
                                     nullptr) != 1) {
      return CryptoError("the essiv key setup");
    }
    EVP_CIPHER_CTX_set_padding(essiv.get(), 0);
  }
  const size_t iv_len = static_cast<size_t>(EVP_CIPHER_get_iv_length(a.cipher));
  std::array<unsigned char, kMaxIv> iv{};
  auto* p = reinterpret_cast<unsigned char*>(data.data());
  for (size_t done = 0; done < data.size(); done += kLuksSectorSize) {
    const uint64_t sector = first_sector + done / kLuksSectorSize;
    const int n = static_cast<int>(std::min<size_t>(kLuksSectorSize, data.size() - done));
    const unsigned char* iv_arg = nullptr;
    if (iv_len > 0 && iv_len <= kMaxIv) {
      std::span<unsigned char> ivs(iv.data(), iv_len);
      switch (a.ivgen) {
        case IvGen::kPlain:
          StoreSector(sector, 4, ivs);
          break;
        case IvGen::kNone:
        case IvGen::kPlain64:
          StoreSector(sector, 8, ivs);
          break;
        case IvGen::kEssiv: {
          StoreSector(sector, 8, ivs);
          int out = 0;
          if (EVP_EncryptUpdate(essiv.get(), iv.data(), &out, iv.data(),
                                static_cast<int>(iv_len)) != 1) {
            return CryptoError("the essiv IV");
          }
          break;
        }
      }
      iv_arg = iv.data();
    }
    int out = 0;
    if (EVP_CipherInit_ex(ctx.get(), nullptr, nullptr, nullptr, iv_arg, -1) != 1 ||
        EVP_CipherUpdate(ctx.get(), p + done, &out, p + done, n) != 1 || out != n) {
      return CryptoError(encrypt ? "encryption" : "decryption");
    }
  }
  OPENSSL_cleanse(iv.data(), iv.size());
  return Status::Ok();
}

}  // namespace uq::qcow2::crypto
