#include "qcow2/crypto/algorithms.h"

#include <fmt/format.h>
#include <nettle/nettle-meta.h>

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

// nettle's block cipher of `family` with a key of `bytes`, or null.
const nettle_cipher* NettleCipher(std::string_view family, uint32_t bytes) {
  if (family == "aes") {
    return bytes == 16   ? &nettle_aes128
           : bytes == 24 ? &nettle_aes192
           : bytes == 32 ? &nettle_aes256
                         : nullptr;
  }
  if (family == "serpent") {
    return bytes == 16   ? &nettle_serpent128
           : bytes == 24 ? &nettle_serpent192
           : bytes == 32 ? &nettle_serpent256
                         : nullptr;
  }
  if (family == "twofish") {
    return bytes == 16   ? &nettle_twofish128
           : bytes == 24 ? &nettle_twofish192
           : bytes == 32 ? &nettle_twofish256
                         : nullptr;
  }
  if (family == "cast5") return bytes == 16 ? &nettle_cast128 : nullptr;
  return nullptr;
}

// Fills the cipher handles of `a` from its names and key size.
Status Complete(Algorithms& a, std::string_view cipher_name) {
  if (cipher_name != "aes" && cipher_name != "serpent" && cipher_name != "twofish" &&
      cipher_name != "cast5") {
    return Status::NotSupported(fmt::format("cipher '{}' is not supported", cipher_name));
  }
  a.cipher_name = std::string(cipher_name);
  // XTS takes two keys of the cipher's size (an odd size fits neither).
  const bool xts = a.mode == CipherMode::kXts;
  const uint32_t bytes = !xts ? a.key_bytes : a.key_bytes % 2 == 0 ? a.key_bytes / 2 : 0;
  const nettle_cipher* nettle = NettleCipher(cipher_name, bytes);
  if (nettle == nullptr) {
    return Status::Corruption(fmt::format("a {}-byte key does not fit cipher {} in {} mode",
                                          a.key_bytes, cipher_name, a.cipher_mode));
  }
  a.cipher_alg = fmt::format("{}-{}", cipher_name, bytes * 8);
  a.block_bytes = nettle->block_size;
  if (xts && a.block_bytes != 16) {
    // XTS is defined on 16-byte blocks; QEMU refuses CAST5 in XTS too.
    return Status::NotSupported(
        fmt::format("cipher {} in xts mode is not supported", a.cipher_alg));
  }
  // libcrypto where it has it (hardware AES), nettle for the rest.
  a.cipher = cipher_name == "aes" ? AesCipher(a.mode, bytes) : nullptr;
  if (a.cipher == nullptr) a.nettle = nettle;
  if (a.ivgen == IvGen::kEssiv) {
    // The IV cipher is the family's cipher keyed by the hash of the master
    // key: the hash's size picks the variant, as QEMU (and dm-crypt) pick it.
    const uint32_t size = static_cast<uint32_t>(EVP_MD_get_size(a.ivgen_hash));
    if (a.cipher != nullptr) {
      a.essiv_cipher = AesCipher(CipherMode::kEcb, size);
    } else {
      a.essiv_nettle = NettleCipher(cipher_name, size);
    }
    if (a.essiv_cipher == nullptr && a.essiv_nettle == nullptr) {
      return Status::NotSupported(
          fmt::format("essiv with hash '{}' needs a {}-bit {} key, which does not exist",
                      a.ivgen_hash_alg, size * 8, cipher_name));
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
  // "family-bits", as QEMU names them (QCryptoCipherAlgorithm).
  const size_t dash = cipher_alg.rfind('-');
  const std::string family = dash == std::string::npos ? "" : cipher_alg.substr(0, dash);
  const std::string bits_text = dash == std::string::npos ? "" : cipher_alg.substr(dash + 1);
  const uint32_t bits = bits_text == "128"   ? 128
                        : bits_text == "192" ? 192
                        : bits_text == "256" ? 256
                                             : 0;
  if (bits == 0 || NettleCipher(family, bits / 8) == nullptr) {
    return Status::NotSupported(fmt::format("cipher '{}' is not supported", cipher_alg));
  }
  ASSIGN_OR_RETURN(CipherMode mode, LookupMode(cipher_mode));
  const uint32_t key_bytes = bits / 8 * (mode == CipherMode::kXts ? 2 : 1);
  std::string spec = cipher_mode + "-" + ivgen_alg;
  if (ivgen_alg == "essiv") spec += ":" + ivgen_hash_alg;
  return ResolveAlgorithms(family, spec, hash_alg, key_bytes, "create");
}

std::string HeaderModeSpec(const Algorithms& a) {
  std::string spec = a.cipher_mode + "-" + a.ivgen_alg;
  if (a.ivgen == IvGen::kEssiv) spec += ":" + a.ivgen_hash_alg;
  return spec;
}

}  // namespace uq::qcow2::crypto
