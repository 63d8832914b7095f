#include "qcow2/crypto/sector_cipher.h"

#include <gtest/gtest.h>
#include <nettle/nettle-meta.h>

#include <cstring>
#include <string>
#include <vector>

#include "qcow2/crypto/hex_for_test.h"

namespace uq::qcow2::crypto {
namespace {

Algorithms Algs(const char* alg, const char* mode, const char* ivgen, const char* ivhash = "") {
  auto a = AlgorithmsFromOptions(alg, mode, ivgen, ivhash, "sha256");
  EXPECT_TRUE(a.ok()) << a.status().ToString();
  return *a;
}

// IEEE 1619-2007 XTS-AES-128 vector 2: keys 11.. and 22.., data unit
// (sector) 0x3333333333 as plain64 numbers it, 32 bytes of 0x44. (Vector 1's
// equal key halves are refused by OpenSSL 3, as they should be.)
TEST(SectorCipher, XtsIeee1619Vector2) {
  std::vector<std::byte> key(32, std::byte{0x11});
  std::fill(key.begin() + 16, key.end(), std::byte{0x22});
  auto c = SectorCipher::Create(Algs("aes-128", "xts", "plain64"), key);
  ASSERT_TRUE(c.ok());
  std::vector<std::byte> data(32, std::byte{0x44});
  ASSERT_TRUE(c->Encrypt(0x3333333333, data).ok());
  EXPECT_EQ(Hex(data), "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0");
  ASSERT_TRUE(c->Decrypt(0x3333333333, data).ok());
  EXPECT_EQ(Hex(data), std::string(64, '4'));
}

// Each 512-byte sector gets the IV of its own number: encrypting sectors 5..6
// in one call equals encrypting sector 5 and sector 6 alone.
TEST(SectorCipher, SectorsNumberedFromFirst) {
  for (const char* mode : {"xts", "cbc", "ctr"}) {
    for (const char* ivgen : {"plain", "plain64", "essiv"}) {
      const bool xts = std::string(mode) == "xts";
      std::vector<std::byte> key(xts ? 64 : 32);
      for (size_t i = 0; i < key.size(); i++) key[i] = std::byte(i);
      auto c = SectorCipher::Create(Algs("aes-256", mode, ivgen, "sha256"), key);
      ASSERT_TRUE(c.ok()) << mode << ivgen;
      std::vector<std::byte> both(1024), a(512), b(512);
      for (size_t i = 0; i < 1024; i++) both[i] = std::byte(i * 13);
      std::memcpy(a.data(), both.data(), 512);
      std::memcpy(b.data(), both.data() + 512, 512);
      ASSERT_TRUE(c->Encrypt(5, both).ok());
      ASSERT_TRUE(c->Encrypt(5, a).ok());
      ASSERT_TRUE(c->Encrypt(6, b).ok());
      EXPECT_EQ(0, std::memcmp(both.data(), a.data(), 512)) << mode << ivgen;
      EXPECT_EQ(0, std::memcmp(both.data() + 512, b.data(), 512)) << mode << ivgen;
      EXPECT_NE(0, std::memcmp(a.data(), b.data(), 512));
      ASSERT_TRUE(c->Decrypt(5, both).ok());
      for (size_t i = 0; i < 1024; i++) ASSERT_EQ(both[i], std::byte(i * 13));
    }
  }
}

// plain keeps the sector number's low 32 bits, plain64 all of it.
TEST(SectorCipher, PlainTruncatesTo32Bits) {
  std::vector<std::byte> key(32);
  for (size_t i = 0; i < key.size(); i++) key[i] = std::byte(i * 3);
  auto plain = SectorCipher::Create(Algs("aes-128", "xts", "plain"), key);
  auto plain64 = SectorCipher::Create(Algs("aes-128", "xts", "plain64"), key);
  ASSERT_TRUE(plain.ok() && plain64.ok());
  std::vector<std::byte> x(512), y(512), z(512);
  ASSERT_TRUE(plain->Encrypt((1ull << 32) + 3, x).ok());
  ASSERT_TRUE(plain64->Encrypt(3, y).ok());
  ASSERT_TRUE(plain64->Encrypt((1ull << 32) + 3, z).ok());
  EXPECT_EQ(Hex(x), Hex(y));
  EXPECT_NE(Hex(x), Hex(z));
}

// essiv: the IV is the plain64 IV encrypted with AES-ECB under SHA-256(key).
TEST(SectorCipher, EssivIvIsEncryptedSectorNumber) {
  std::vector<std::byte> key(16);
  for (size_t i = 0; i < key.size(); i++) key[i] = std::byte(0x40 + i);
  auto c = SectorCipher::Create(Algs("aes-128", "cbc", "essiv", "sha256"), key);
  ASSERT_TRUE(c.ok());
  std::vector<std::byte> data(512, std::byte{0x5a}), expect(512, std::byte{0x5a});
  ASSERT_TRUE(c->Encrypt(77, data).ok());

  unsigned char salt[32], iv[16] = {77};
  EVP_Digest(key.data(), key.size(), salt, nullptr, EVP_sha256(), nullptr);
  EVP_CIPHER_CTX* e = EVP_CIPHER_CTX_new();
  int n = 0;
  EVP_EncryptInit_ex(e, EVP_aes_256_ecb(), nullptr, salt, nullptr);
  EVP_CIPHER_CTX_set_padding(e, 0);
  EVP_EncryptUpdate(e, iv, &n, iv, 16);
  EVP_EncryptInit_ex(e, EVP_aes_128_cbc(), nullptr,
                     reinterpret_cast<const unsigned char*>(key.data()), iv);
  EVP_CIPHER_CTX_set_padding(e, 0);
  auto* p = reinterpret_cast<unsigned char*>(expect.data());
  EVP_EncryptUpdate(e, p, &n, p, 512);
  EVP_CIPHER_CTX_free(e);
  EXPECT_EQ(Hex(data), Hex(expect));
}

TEST(SectorCipher, RefusesWrongKeySizeAndPartialBlocks) {
  std::vector<std::byte> key(31);
  EXPECT_FALSE(SectorCipher::Create(Algs("aes-256", "cbc", "plain64"), key).ok());
  std::vector<std::byte> k32(32);
  auto c = SectorCipher::Create(Algs("aes-256", "cbc", "plain64"), k32);
  ASSERT_TRUE(c.ok());
  std::vector<std::byte> data(20);
  EXPECT_FALSE(c->Encrypt(0, data).ok());
}

// The nettle path (what libcrypto lacks) and the libcrypto path agree on
// AES, in every mode and with every IV generator: the same IVs, the same
// XTS key halves, the same CBC/CTR chaining per sector.
TEST(SectorCipher, NettleMatchesLibcryptoOnAes) {
  for (const char* mode : {"xts", "cbc", "ctr", "ecb"}) {
    for (const char* ivgen : {"plain", "plain64", "essiv"}) {
      SCOPED_TRACE(std::string(mode) + "-" + ivgen);
      const bool xts = std::string(mode) == "xts";
      Algorithms ossl = Algs("aes-256", mode, ivgen, "sha256");
      ASSERT_NE(ossl.cipher, nullptr);
      Algorithms nettle = ossl;
      nettle.cipher = nullptr;
      nettle.essiv_cipher = nullptr;
      nettle.nettle = &nettle_aes256;
      if (nettle.ivgen == IvGen::kEssiv) nettle.essiv_nettle = &nettle_aes256;
      std::vector<std::byte> key(xts ? 64 : 32);
      for (size_t i = 0; i < key.size(); i++) key[i] = std::byte(i * 7 + 1);
      auto a = SectorCipher::Create(ossl, key);
      auto b = SectorCipher::Create(nettle, key);
      ASSERT_TRUE(a.ok() && b.ok());
      std::vector<std::byte> x(2048), y(2048);
      for (size_t i = 0; i < x.size(); i++) x[i] = y[i] = std::byte(i * 31);
      ASSERT_TRUE(a->Encrypt(0x1234567890, x).ok());
      ASSERT_TRUE(b->Encrypt(0x1234567890, y).ok());
      EXPECT_EQ(x, y);
      ASSERT_TRUE(b->Decrypt(0x1234567890, x).ok());
      for (size_t i = 0; i < x.size(); i++) ASSERT_EQ(x[i], std::byte(i * 31));
    }
  }
}

// The ciphers only nettle has: every mode and IV generator round-trips, each
// sector depends on its number, and a partial key-material sector works.
TEST(SectorCipher, NettleCiphersRoundTrip) {
  for (const char* alg :
       {"aes-192", "serpent-128", "serpent-256", "twofish-192", "twofish-256", "cast5-128"}) {
    for (const char* mode : {"xts", "cbc", "ctr", "ecb"}) {
      const bool cast5 = std::string(alg) == "cast5-128";
      if (cast5 && std::string(mode) == "xts") continue;
      for (const char* ivgen : {"plain", "plain64", "essiv"}) {
        SCOPED_TRACE(std::string(alg) + " " + mode + "-" + ivgen);
        auto algs = AlgorithmsFromOptions(alg, mode, ivgen, cast5 ? "md5" : "sha256", "sha256");
        ASSERT_TRUE(algs.ok()) << algs.status().ToString();
        // AES-192 goes to nettle in XTS only (libcrypto has the rest).
        const bool aes = std::string(alg) == "aes-192";
        EXPECT_EQ(algs->nettle != nullptr, !aes || std::string(mode) == "xts");
        EXPECT_EQ(algs->cipher_alg, alg);
        std::vector<std::byte> key(algs->key_bytes);
        for (size_t i = 0; i < key.size(); i++) key[i] = std::byte(i * 3 + 5);
        auto c = SectorCipher::Create(*algs, key);
        ASSERT_TRUE(c.ok()) << c.status().ToString();
        std::vector<std::byte> data(1024 + 256);
        for (size_t i = 0; i < data.size(); i++) data[i] = std::byte(i);
        const std::vector<std::byte> plain = data;
        ASSERT_TRUE(c->Encrypt(9, data).ok());
        EXPECT_NE(data, plain);
        if (std::string(mode) != "ecb") {
          EXPECT_NE(0, std::memcmp(data.data(), data.data() + 512, 512));
        }
        ASSERT_TRUE(c->Decrypt(9, data).ok());
        EXPECT_EQ(data, plain);
      }
    }
  }
}

TEST(Algorithms, ResolvesHeaderNames) {
  auto a = ResolveAlgorithms("aes", "cbc-essiv:sha256", "sha1", 16, "x");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->cipher_alg, "aes-128");
  EXPECT_EQ(a->cipher_mode, "cbc");
  EXPECT_EQ(a->ivgen_alg, "essiv");
  EXPECT_EQ(a->ivgen_hash_alg, "sha256");
  EXPECT_EQ(a->hash_alg, "sha1");
  auto x = ResolveAlgorithms("aes", "xts-plain64", "sha256", 64, "x");
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(x->cipher_alg, "aes-256");
  EXPECT_TRUE(x->ivgen_hash_alg.empty());
  EXPECT_EQ(HeaderModeSpec(*x), "xts-plain64");
  auto serpent = ResolveAlgorithms("serpent", "xts-plain64", "sha256", 64, "x");
  ASSERT_TRUE(serpent.ok()) << serpent.status().ToString();
  EXPECT_EQ(serpent->cipher_alg, "serpent-256");
  EXPECT_NE(serpent->nettle, nullptr);
  auto aes192xts = ResolveAlgorithms("aes", "xts-plain64", "sha256", 48, "x");
  ASSERT_TRUE(aes192xts.ok()) << aes192xts.status().ToString();
  EXPECT_EQ(aes192xts->cipher_alg, "aes-192");
  EXPECT_NE(aes192xts->nettle, nullptr);
  // CAST5's 8-byte block has no XTS (QEMU: "Unsupported cipher mode xts").
  EXPECT_TRUE(
      ResolveAlgorithms("cast5", "xts-plain64", "sha256", 32, "x").status().IsNotSupported());
  EXPECT_TRUE(ResolveAlgorithms("cast5", "cbc-plain64", "sha256", 24, "x").status().IsCorruption());
  EXPECT_TRUE(ResolveAlgorithms("sm4", "xts-plain64", "sha256", 32, "x").status().IsNotSupported());
  // essiv for CAST5 needs a 16-byte hash (md5); Twofish takes SHA-256's 32.
  EXPECT_TRUE(
      ResolveAlgorithms("cast5", "cbc-essiv:sha256", "sha256", 16, "x").status().IsNotSupported());
  EXPECT_TRUE(ResolveAlgorithms("cast5", "cbc-essiv:md5", "sha256", 16, "x").ok());
  EXPECT_TRUE(ResolveAlgorithms("twofish", "cbc-essiv:sha256", "sha256", 16, "x").ok());
  EXPECT_TRUE(
      ResolveAlgorithms("aes", "xts-plain64", "whirlpool", 64, "x").status().IsNotSupported());
  EXPECT_FALSE(ResolveAlgorithms("aes", "xts", "sha256", 64, "x").ok());
  EXPECT_TRUE(ResolveAlgorithms("aes", "cbc-plain64", "sha256", 20, "x").status().IsCorruption());
  // essiv with SHA-1 needs a 20-byte AES key: QEMU refuses it too.
  EXPECT_TRUE(
      ResolveAlgorithms("aes", "cbc-essiv:sha1", "sha256", 32, "x").status().IsNotSupported());
}

}  // namespace
}  // namespace uq::qcow2::crypto
