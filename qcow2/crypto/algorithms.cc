#include "qcow2/crypto/algorithms.h"

#include <fmt/format.h>

#include <array>
#include <string_view>

namespace uq::qcow2::crypto {
namespace {

// QEMU's hash names (QCryptoHashAlgorithm), which are also OpenSSL's.
constexpr std::array<std::string_view, 7> kHashes = {"md5",    "sha1",   "sha224",   "sha256",
                                                     "sha384", "sha512", "ripemd160"};

Result<const EVP_MD*> LookupHash(const std::string& name, const char* what) {
  for (std::string_view h : kHashes) {
    if (name != h) continue;
    const EVP_MD* md = EVP_get_digestbyname(name.c_str());
    if (md == nullptr) break;
    return md;
  }
  return Status::NotSupported(fmt::format("{} '{}' is not supported", what, name));
}

Result<CipherMode> LookupMode(std::string_view name) {
  if (name == "xts") return CipherMode::kXts;
  if (name == "cbc") return CipherMode::kCbc;
  if (name == "ctr") return CipherMode::kCtr;
  if (name == "ecb") return CipherMode::kEcb;
  return Status::NotSupported(fmt::format("cipher mode '{}' is not supported", name));
}

Result<IvGen> LookupIvGen(std::string_view name) {
  if (name == "plain") return IvGen::kPlain;
  if (name == "plain64") return IvGen::kPlain64;
  if (name == "essiv") return IvGen::kEssiv;
  return Status::NotSupported(fmt::format("IV generator '{}' is not supported", name));
}

const EVP_CIPHER* AesCipher(CipherMode mode, uint32_t aes_bytes) {
  switch (mode) {
    case CipherMode::kXts:
      return aes_bytes == 16 ? EVP_aes_128_xts() : aes_bytes == 32 ? EVP_aes_256_xts() : nullptr;
    case CipherMode::kCbc:
      return aes_bytes == 16   ? EVP_aes_128_cbc()
             : aes_bytes == 24 ? EVP_aes_192_cbc()
             : aes_bytes == 32 ? EVP_aes_256_cbc()
                               : nullptr;
    case CipherMode::kCtr:
      return aes_bytes == 16   ? EVP_aes_128_ctr()
             : aes_bytes == 24 ? EVP_aes_192_ctr()
             : aes_bytes == 32 ? EVP_aes_256_ctr()
                               : nullptr;
    case CipherMode::kEcb:
      return aes_bytes == 16   ? EVP_aes_128_ecb()
             : aes_bytes == 24 ? EVP_aes_192_ecb()
             : aes_bytes == 32 ? EVP_aes_256_ecb()
                               : nullptr;
  }
  return nullptr;
}

// Fills the EVP handles of `a` from its names and key size.
Status Complete(Algorithms& a, std::string_view cipher_name) {
  if (cipher_name != "aes") {
    return Status::NotSupported(fmt::format("cipher '{}' is not supported", cipher_name));
  }
  // XTS takes two keys of the cipher's size (an odd size fits neither).
  const bool xts = a.mode == CipherMode::kXts;
  const uint32_t aes_bytes = !xts ? a.key_bytes : a.key_bytes % 2 == 0 ? a.key_bytes / 2 : 0;
  a.cipher = AesCipher(a.mode, aes_bytes);
  if (aes_bytes == 16 || aes_bytes == 24 || aes_bytes == 32) {
    a.cipher_alg = fmt::format("aes-{}", aes_bytes * 8);
  }
  if (a.cipher == nullptr) {
    // AES-192 in XTS: QEMU has it, this libcrypto does not.
    if (a.mode == CipherMode::kXts && a.key_bytes == 48) {
      return Status::NotSupported("cipher aes-192 in xts mode is not supported");
    }
    return Status::Corruption(fmt::format("a {}-byte key does not fit cipher aes in {} mode",
                                          a.key_bytes, a.cipher_mode));
  }
  if (a.ivgen == IvGen::kEssiv) {
    // The IV cipher is AES keyed by the hash of the master key: its size
    // picks the AES variant, as QEMU picks it.
    const int size = EVP_MD_get_size(a.ivgen_hash);
    a.essiv_cipher = AesCipher(CipherMode::kEcb, static_cast<uint32_t>(size));
    if (a.essiv_cipher == nullptr) {
      return Status::NotSupported(
          fmt::format("essiv with hash '{}' needs an AES key of {} bytes, which does not exist",
                      a.ivgen_hash_alg, size));
    }
  }
  return Status::Ok();
}

}  // namespace

Result<Algorithms> ResolveAlgorithms(const std::string& cipher_name, const std::string& cipher_mode,
                                     const std::string& hash_spec, uint32_t key_bytes,
                                     const std::string& path, bool names_only) {
  auto fail = [&](const Status& s) { return s.WithContext(path + ": LUKS header"); };
  Algorithms a;
  a.key_bytes = key_bytes;
  // "mode-ivgen[:hash]", as QEMU writes and requires it.
  const size_t dash = cipher_mode.find('-');
  if (dash == std::string::npos) {
    return fail(
        Status::NotSupported(fmt::format("cipher mode '{}' names no IV generator", cipher_mode)));
  }
  a.cipher_mode = cipher_mode.substr(0, dash);
  std::string ivgen = cipher_mode.substr(dash + 1);
  if (const size_t colon = ivgen.find(':'); colon != std::string::npos) {
    a.ivgen_hash_alg = ivgen.substr(colon + 1);
    ivgen.resize(colon);
  }
  a.ivgen_alg = ivgen;
  Result<CipherMode> mode = LookupMode(a.cipher_mode);
  if (!mode.ok()) return fail(mode.status());
  a.mode = *mode;
  Result<IvGen> gen = LookupIvGen(ivgen);
  if (!gen.ok()) return fail(gen.status());
  a.ivgen = *gen;
  if (a.ivgen == IvGen::kEssiv) {
    if (a.ivgen_hash_alg.empty()) {
      return fail(Status::Corruption("essiv IV generator without a hash"));
    }
    Result<const EVP_MD*> md = LookupHash(a.ivgen_hash_alg, "IV generator hash");
    if (!md.ok()) return fail(md.status());
    a.ivgen_hash = *md;
  } else {
    // QEMU (and dm-crypt) ignore a hash given to plain or plain64.
    a.ivgen_hash_alg.clear();
  }
  a.hash_alg = hash_spec;
  Result<const EVP_MD*> md = LookupHash(hash_spec, "hash");
  if (!md.ok()) return fail(md.status());
  a.hash = *md;
  Status st = Complete(a, cipher_name);
  if (!st.ok() && !(names_only && st.IsNotSupported() && !a.cipher_alg.empty())) return fail(st);
  return a;
}

Result<Algorithms> AlgorithmsFromOptions(const std::string& cipher_alg,
                                         const std::string& cipher_mode,
                                         const std::string& ivgen_alg,
                                         const std::string& ivgen_hash_alg,
                                         const std::string& hash_alg) {
  uint32_t bits = 0;
  if (cipher_alg == "aes-128") bits = 128;
  if (cipher_alg == "aes-192") bits = 192;
  if (cipher_alg == "aes-256") bits = 256;
  if (bits == 0) {
    return Status::NotSupported(fmt::format("cipher '{}' is not supported", cipher_alg));
  }
  ASSIGN_OR_RETURN(CipherMode mode, LookupMode(cipher_mode));
  const uint32_t key_bytes = bits / 8 * (mode == CipherMode::kXts ? 2 : 1);
  std::string spec = cipher_mode + "-" + ivgen_alg;
  if (ivgen_alg == "essiv") spec += ":" + ivgen_hash_alg;
  return ResolveAlgorithms("aes", spec, hash_alg, key_bytes, "create");
}

std::string HeaderModeSpec(const Algorithms& a) {
  std::string spec = a.cipher_mode + "-" + a.ivgen_alg;
  if (a.ivgen == IvGen::kEssiv) spec += ":" + a.ivgen_hash_alg;
  return spec;
}

}  // namespace uq::qcow2::crypto
