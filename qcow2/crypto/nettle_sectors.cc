#include "qcow2/crypto/nettle_sectors.h"

#include <fmt/format.h>
#include <nettle/cbc.h>
#include <nettle/ctr.h>
#include <nettle/nettle-meta.h>
#include <nettle/xts.h>
#include <openssl/crypto.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <memory>

#include "qcow2/crypto/luks_header.h"

namespace uq::qcow2::crypto {
namespace {

// One keyed nettle context (its size is the cipher's), wiped when freed.
class Keyed {
 public:
  Keyed(const nettle_cipher* c, bool encrypt, const std::byte* key)
      : words_((c->context_size + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t)),
        ctx_(std::make_unique<std::max_align_t[]>(words_)) {
    (encrypt ? c->set_encrypt_key : c->set_decrypt_key)(ctx_.get(),
                                                        reinterpret_cast<const uint8_t*>(key));
  }
  ~Keyed() { OPENSSL_cleanse(ctx_.get(), words_ * sizeof(std::max_align_t)); }
  Keyed(const Keyed&) = delete;
  Keyed& operator=(const Keyed&) = delete;
  const void* get() const { return ctx_.get(); }

 private:
  size_t words_;
  std::unique_ptr<std::max_align_t[]> ctx_;
};

constexpr size_t kMaxBlock = 16;

}  // namespace

Status NettleSectors(const Algorithms& a, std::span<const std::byte> key,
                     std::span<const std::byte> essiv_key, bool encrypt, uint64_t first_sector,
                     std::span<std::byte> data) {
  const nettle_cipher* c = a.nettle;
  const size_t block = c->block_size;
  const bool xts = a.mode == CipherMode::kXts;
  if ((a.mode == CipherMode::kCbc || a.mode == CipherMode::kEcb) && data.size() % block != 0) {
    return Status::InvalidArgument(
        fmt::format("{} bytes are not whole cipher blocks", data.size()));
  }
  // XTS: the first half keys the data, the second the tweak (encrypted
  // always). CTR encrypts its counter both ways. CBC and ECB decrypt with
  // the decryption schedule.
  const bool data_enc = encrypt || a.mode == CipherMode::kCtr;
  Keyed cipher(c, data_enc, key.data());
  std::unique_ptr<Keyed> tweak;
  if (xts) tweak = std::make_unique<Keyed>(c, true, key.data() + key.size() / 2);
  std::unique_ptr<Keyed> essiv;
  if (a.ivgen == IvGen::kEssiv)
    essiv = std::make_unique<Keyed>(a.essiv_nettle, true, essiv_key.data());
  std::array<uint8_t, kMaxBlock> iv{};
  auto* p = reinterpret_cast<uint8_t*>(data.data());
  for (size_t done = 0; done < data.size(); done += kLuksSectorSize) {
    const uint64_t sector = first_sector + done / kLuksSectorSize;
    const size_t n = std::min<size_t>(kLuksSectorSize, data.size() - done);
    // The IV: the sector number little-endian in 4 (plain) or 8 bytes,
    // zeros after; essiv encrypts that block with the essiv cipher.
    std::fill(iv.begin(), iv.end(), 0);
    const size_t width = a.ivgen == IvGen::kPlain ? 4 : 8;
    for (size_t i = 0; i < std::min(width, block); i++) iv[i] = (sector >> (8 * i)) & 0xff;
    if (essiv) {
      a.essiv_nettle->encrypt(essiv->get(), a.essiv_nettle->block_size, iv.data(), iv.data());
    }
    uint8_t* s = p + done;
    switch (a.mode) {
      case CipherMode::kXts:
        if (n < 16) return Status::InvalidArgument(fmt::format("an XTS sector of {} bytes", n));
        if (encrypt) {
          xts_encrypt_message(cipher.get(), tweak->get(), c->encrypt, iv.data(), n, s, s);
        } else {
          xts_decrypt_message(cipher.get(), tweak->get(), c->decrypt, c->encrypt, iv.data(), n, s,
                              s);
        }
        break;
      case CipherMode::kCbc:
        if (encrypt) {
          cbc_encrypt(cipher.get(), c->encrypt, block, iv.data(), n, s, s);
        } else {
          cbc_decrypt(cipher.get(), c->decrypt, block, iv.data(), n, s, s);
        }
        break;
      case CipherMode::kCtr:
        ctr_crypt(cipher.get(), c->encrypt, block, iv.data(), n, s, s);
        break;
      case CipherMode::kEcb:
        (encrypt ? c->encrypt : c->decrypt)(cipher.get(), n, s, s);
        break;
    }
  }
  OPENSSL_cleanse(iv.data(), iv.size());
  return Status::Ok();
}

}  // namespace uq::qcow2::crypto
