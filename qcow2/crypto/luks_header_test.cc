#include "qcow2/crypto/luks_header.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>

#include "qcow2/crypto/algorithms.h"
#include "qcow2/crypto/key_derivation.h"
#include "qcow2/crypto/sector_cipher.h"

namespace uq::qcow2::crypto {
namespace {

constexpr uint64_t kArea = 2068480;  // what QEMU gives 8 slots of a 64-byte key

// A header as QEMU lays it out for aes-256-xts-plain64/sha256.
LuksHeader QemuLike() {
  LuksHeader h;
  h.cipher_name = "aes";
  h.cipher_mode = "xts-plain64";
  h.hash_spec = "sha256";
  h.payload_offset = kArea / 512;
  h.key_bytes = 64;
  h.mk_digest_iterations = 1000;
  h.uuid = "426ee66c-6b40-4231-98de-ff229298108f";
  for (size_t i = 0; i < kLuksSlots; i++) {
    h.slots[i].key_offset = static_cast<uint32_t>((4096 + i * 258048) / 512);
    h.slots[i].stripes = kLuksStripes;
  }
  h.slots[0].active = true;
  h.slots[0].iterations = 1000;
  return h;
}

Result<LuksHeader> Reparse(const LuksHeader& h, uint64_t area = kArea) {
  return ParseLuksHeader(SerializeLuksHeader(h), area, "img");
}

TEST(LuksHeader, RoundTrips) {
  auto h = Reparse(QemuLike());
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->cipher_mode, "xts-plain64");
  EXPECT_EQ(h->uuid, "426ee66c-6b40-4231-98de-ff229298108f");
  EXPECT_TRUE(h->slots[0].active);
  EXPECT_FALSE(h->slots[1].active);
  EXPECT_EQ(h->slots[7].key_offset, (4096 + 7 * 258048) / 512);
}

// Every field that sizes or loops something is bounded.
TEST(LuksHeader, RefusesOutOfBoundsFields) {
  struct Case {
    const char* what;
    std::function<void(LuksHeader&)> damage;
    const char* words;
  };
  const Case cases[] = {
      {"key size 0", [](LuksHeader& h) { h.key_bytes = 0; }, "master key size"},
      {"key size 65", [](LuksHeader& h) { h.key_bytes = 65; }, "master key size"},
      {"digest iterations 0", [](LuksHeader& h) { h.mk_digest_iterations = 0; }, "iterations"},
      {"digest iterations huge", [](LuksHeader& h) { h.mk_digest_iterations = 0xffffffff; },
       "iterations"},
      {"slot iterations huge", [](LuksHeader& h) { h.slots[0].iterations = kMaxIterations + 1; },
       "iterations"},
      {"slot iterations 0", [](LuksHeader& h) { h.slots[0].iterations = 0; }, "iterations"},
      {"stripes", [](LuksHeader& h) { h.slots[3].stripes = 0xffffffff; }, "stripes"},
      {"slot past area", [](LuksHeader& h) { h.slots[7].key_offset = 0xfffffff0; }, "outside"},
      {"slot on header", [](LuksHeader& h) { h.slots[2].key_offset = 1; }, "overlaps the header"},
      {"slots overlap", [](LuksHeader& h) { h.slots[2].key_offset = h.slots[1].key_offset + 8; },
       "overlap"},
      {"payload", [](LuksHeader& h) { h.payload_offset = 100; }, "payload"},
  };
  for (const Case& c : cases) {
    LuksHeader h = QemuLike();
    c.damage(h);
    auto r = Reparse(h);
    ASSERT_FALSE(r.ok()) << c.what;
    EXPECT_TRUE(r.status().IsCorruption()) << c.what;
    EXPECT_NE(r.status().message().find(c.words), std::string::npos)
        << c.what << ": " << r.status().ToString();
    EXPECT_EQ(r.status().message().rfind("img: LUKS header: ", 0), 0u) << c.what;
  }
}

TEST(LuksHeader, RefusesBadMagicVersionAndNames) {
  auto bytes = SerializeLuksHeader(QemuLike());
  auto bad = bytes;
  bad[0] = std::byte{'X'};
  EXPECT_TRUE(ParseLuksHeader(bad, kArea, "img").status().IsCorruption());
  bad = bytes;
  bad[7] = std::byte{2};
  EXPECT_TRUE(ParseLuksHeader(bad, kArea, "img").status().IsNotSupported());
  bad = bytes;
  for (size_t i = 8; i < 40; i++) bad[i] = std::byte{'a'};
  EXPECT_TRUE(ParseLuksHeader(bad, kArea, "img").status().IsCorruption());
  bad = bytes;
  bad[208 + 3] = std::byte{0x12};  // slot 0 state
  EXPECT_TRUE(ParseLuksHeader(bad, kArea, "img").status().IsCorruption());
  EXPECT_FALSE(ParseLuksHeader(bytes, 500, "img").ok());  // area too small
  EXPECT_FALSE(ParseLuksHeader(std::span(bytes).first(100), kArea, "img").ok());
}

// A key slot written with AfSplit + the slot key opens with the passphrase and
// only with it.
TEST(KeySlot, OpensWithThePassphraseOnly) {
  LuksHeader h = QemuLike();
  h.key_bytes = 32;
  h.cipher_mode = "cbc-essiv:sha256";
  auto algs = ResolveAlgorithms(h.cipher_name, h.cipher_mode, h.hash_spec, h.key_bytes, "img");
  ASSERT_TRUE(algs.ok());
  SecretBytes master(32);
  for (size_t i = 0; i < 32; i++) master.span()[i] = std::byte(i + 1);
  auto digest = Pbkdf2(master.span(), h.mk_digest_salt, h.mk_digest_iterations, algs->hash, 20);
  ASSERT_TRUE(digest.ok());
  std::memcpy(h.mk_digest.data(), digest->data(), 20);
  const auto pass = std::as_bytes(std::span("secret", 6));
  auto slot_key = Pbkdf2(pass, h.slots[0].salt, h.slots[0].iterations, algs->hash, 32);
  auto split = AfSplit(algs->hash, master.span(), kLuksStripes);
  ASSERT_TRUE(slot_key.ok() && split.ok());
  auto cipher = SectorCipher::Create(*algs, slot_key->span());
  ASSERT_TRUE(cipher.ok());
  ASSERT_TRUE(cipher->Encrypt(0, split->span()).ok());

  auto opened = OpenKeySlot(h, *algs, h.slots[0], split->span(), pass);
  ASSERT_TRUE(opened.ok());
  ASSERT_EQ(opened->size(), 32u);
  EXPECT_EQ(0, std::memcmp(opened->data(), master.data(), 32));
  auto wrong = OpenKeySlot(h, *algs, h.slots[0], split->span(), std::as_bytes(std::span("x", 1)));
  ASSERT_TRUE(wrong.ok());
  EXPECT_TRUE(wrong->empty());
}

}  // namespace
}  // namespace uq::qcow2::crypto
