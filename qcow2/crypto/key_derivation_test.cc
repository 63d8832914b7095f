#include "qcow2/crypto/key_derivation.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "qcow2/crypto/hex_for_test.h"

namespace uq::qcow2::crypto {
namespace {

std::span<const std::byte> Bytes(const std::string& s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

// RFC 6070, test 1 (PBKDF2-HMAC-SHA1).
TEST(Pbkdf2, Rfc6070Sha1) {
  auto key = Pbkdf2(Bytes("password"), Bytes("salt"), 1, EVP_sha1(), 20);
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(Hex(key->span()), "0c60c80f961f0e71f3a9b524af6012062fe037a6");
  auto key2 = Pbkdf2(Bytes("password"), Bytes("salt"), 2, EVP_sha1(), 20);
  ASSERT_TRUE(key2.ok());
  EXPECT_EQ(Hex(key2->span()), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
}

// RFC 7914, section 11 (PBKDF2-HMAC-SHA256).
TEST(Pbkdf2, Rfc7914Sha256) {
  auto key = Pbkdf2(Bytes("passwd"), Bytes("salt"), 1, EVP_sha256(), 64);
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(Hex(key->span()),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
            "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783");
}

TEST(Pbkdf2, RefusesZeroIterations) {
  EXPECT_FALSE(Pbkdf2(Bytes("p"), Bytes("s"), 0, EVP_sha256(), 32).ok());
}

// Diffuse: one SHA-256 block i=0 is H(00000000 || block).
TEST(Diffuse, HashesEachBlockWithItsIndex) {
  std::vector<std::byte> data(40, std::byte{0});
  ASSERT_TRUE(Diffuse(EVP_sha256(), data).ok());
  // SHA-256 of 36 zero bytes, then of be32(1) followed by 8 zero bytes (truncated).
  unsigned char expect0[32], expect1[32];
  unsigned char in0[36] = {}, in1[12] = {0, 0, 0, 1};
  EVP_Digest(in0, sizeof in0, expect0, nullptr, EVP_sha256(), nullptr);
  EVP_Digest(in1, sizeof in1, expect1, nullptr, EVP_sha256(), nullptr);
  EXPECT_EQ(0, std::memcmp(data.data(), expect0, 32));
  EXPECT_EQ(0, std::memcmp(data.data() + 32, expect1, 8));
}

TEST(AfSplit, MergeRestoresTheKey) {
  for (const EVP_MD* md : {EVP_sha1(), EVP_sha256(), EVP_sha512()}) {
    for (uint32_t kb : {16u, 32u, 64u}) {
      std::vector<std::byte> key(kb);
      for (uint32_t i = 0; i < kb; i++) key[i] = std::byte(i * 7 + 3);
      auto split = AfSplit(md, key, kLuksStripes);
      ASSERT_TRUE(split.ok());
      auto merged = AfMerge(md, split->span(), kb, kLuksStripes);
      ASSERT_TRUE(merged.ok());
      EXPECT_EQ(Hex(merged->span()), Hex(key));
      // Any stripe changed: another key.
      (*split).span()[kb * 17] ^= std::byte{1};
      auto broken = AfMerge(md, split->span(), kb, kLuksStripes);
      ASSERT_TRUE(broken.ok());
      EXPECT_NE(Hex(broken->span()), Hex(key));
    }
  }
}

TEST(AfMerge, RefusesShortMaterial) {
  std::vector<std::byte> m(100);
  EXPECT_FALSE(AfMerge(EVP_sha256(), m, 32, 4).ok());
}

}  // namespace
}  // namespace uq::qcow2::crypto
