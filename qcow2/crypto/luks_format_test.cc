#include "qcow2/crypto/luks_format.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "base/task.h"
#include "qcow2/crypto/luks_volume.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2::crypto {
namespace {

constexpr uint64_t kAreaOffset = 65536;  // where the area lies in the test file

std::span<const std::byte> Bytes(const char* s) { return std::as_bytes(std::span(s, strlen(s))); }

LuksFormatOptions Fast(LuksFormatOptions o = {}) {
  o.slot_iterations = 1000;
  o.digest_iterations = 1000;
  return o;
}

// The area at kAreaOffset of a file, as an image holds it.
struct AreaFile {
  testing::MemEnv env;
  std::unique_ptr<File> file;
  uint64_t length = 0;

  explicit AreaFile(const LuksArea& area) : length(area.bytes.size()) {
    std::vector<std::byte> contents(kAreaOffset + area.bytes.size());
    std::memcpy(contents.data() + kAreaOffset, area.bytes.data(), area.bytes.size());
    env.SetContents("img", contents);
    file = env.Open("img", OpenOptions{}).value();
  }
  Result<std::unique_ptr<LuksVolume>> Unlock(const char* pass) {
    return BlockOn(LuksVolume::Unlock(*file, kAreaOffset, length, Bytes(pass)));
  }
};

TEST(FormatLuks, QemuDefaultsLayOutAsQemu) {
  auto area = FormatLuks(Fast(), Bytes("secret"));
  ASSERT_TRUE(area.ok()) << area.status().ToString();
  const LuksHeader& h = area->header;
  EXPECT_EQ(h.cipher_name, "aes");
  EXPECT_EQ(h.cipher_mode, "xts-plain64");
  EXPECT_EQ(h.hash_spec, "sha256");
  EXPECT_EQ(h.key_bytes, 64u);
  // What qemu-img info shows for an image QEMU made with these defaults.
  EXPECT_EQ(uint64_t{h.payload_offset} * 512, 2068480u);
  EXPECT_EQ(area->bytes.size(), 2068480u);
  EXPECT_EQ(LuksAreaLength(64), 2068480u);
  const uint64_t expected_offsets[] = {4096,    262144,  520192,  778240,
                                       1036288, 1294336, 1552384, 1810432};
  for (size_t i = 0; i < kLuksSlots; i++) {
    EXPECT_EQ(uint64_t{h.slots[i].key_offset} * 512, expected_offsets[i]) << i;
    EXPECT_EQ(h.slots[i].stripes, kLuksStripes);
    EXPECT_EQ(h.slots[i].active, i == 0);
  }
  EXPECT_EQ(h.uuid.size(), 36u);
  EXPECT_EQ(h.uuid[14], '4');
  // The header parses back as written.
  auto parsed = ParseLuksHeader(area->bytes, area->bytes.size(), "img");
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->uuid, h.uuid);
  EXPECT_EQ(parsed->slots[0].iterations, 1000u);
  // Unused slots' places are zero.
  for (uint64_t b = expected_offsets[1]; b < area->bytes.size(); b++) {
    ASSERT_EQ(area->bytes[b], std::byte{0}) << b;
  }
}

// The reader opens what the writer made, with its passphrase only, and the
// payload cipher is the one the options name.
TEST(FormatLuks, OpensWithThePassphraseOnly) {
  struct Case {
    const char *alg, *mode, *ivgen, *ivhash, *hash;
    const char* header_mode;
    uint64_t area;
  };
  const Case cases[] = {
      {"aes-256", "xts", "plain64", "", "sha256", "xts-plain64", 2068480},
      {"aes-128", "xts", "plain", "", "sha1", "xts-plain", 1052672},
      {"aes-128", "cbc", "essiv", "", "sha256", "cbc-essiv:sha256", 528384},
      {"aes-256", "ctr", "plain64", "", "sha512", "ctr-plain64", 1052672},
      {"aes-256", "cbc", "essiv", "sha256", "sha1", "cbc-essiv:sha256", 1052672},
      // nettle's: AES-192 in XTS, Serpent, Twofish, CAST5.
      {"aes-192", "xts", "plain64", "", "sha256", "xts-plain64", 1544192},
      {"serpent-256", "xts", "plain64", "", "sha256", "xts-plain64", 2068480},
      {"twofish-128", "cbc", "essiv", "", "sha256", "cbc-essiv:sha256", 528384},
      {"cast5-128", "ctr", "plain64", "", "sha1", "ctr-plain64", 528384},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header_mode);
    LuksFormatOptions o;
    o.cipher_alg = c.alg;
    o.cipher_mode = c.mode;
    o.ivgen_alg = c.ivgen;
    o.ivgen_hash_alg = c.ivhash;
    o.hash_alg = c.hash;
    auto area = FormatLuks(Fast(o), Bytes("correct horse"));
    ASSERT_TRUE(area.ok()) << area.status().ToString();
    EXPECT_EQ(area->header.cipher_mode, c.header_mode);
    EXPECT_EQ(area->bytes.size(), c.area);
    AreaFile f(*area);
    auto volume = f.Unlock("correct horse");
    ASSERT_TRUE(volume.ok()) << volume.status().ToString();
    EXPECT_EQ((*volume)->description().algorithms.cipher_alg, c.alg);
    EXPECT_EQ((*volume)->description().algorithms.hash_alg, c.hash);
    auto wrong = f.Unlock("correct horsE");
    ASSERT_FALSE(wrong.ok());
    EXPECT_EQ(wrong.status().message(), "img: Invalid password, cannot unlock any keyslot");
  }
}

// Two areas made from the same passphrase share nothing random.
TEST(FormatLuks, FreshRandomness) {
  auto a = FormatLuks(Fast(), Bytes("p"));
  auto b = FormatLuks(Fast(), Bytes("p"));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->header.uuid, b->header.uuid);
  EXPECT_NE(a->header.mk_digest, b->header.mk_digest);
  EXPECT_NE(a->header.slots[0].salt, b->header.slots[0].salt);
  EXPECT_NE(a->header.mk_digest_salt, b->header.mk_digest_salt);
}

TEST(FormatLuks, RefusesWhatItCannotMake) {
  LuksFormatOptions o = Fast();
  o.cipher_alg = "sm4";  // QEMU 7.2 has no SM4 either
  EXPECT_TRUE(FormatLuks(o, Bytes("p")).status().IsNotSupported());
  o = Fast();
  o.cipher_alg = "cast5-128";  // an 8-byte block: no XTS
  EXPECT_TRUE(FormatLuks(o, Bytes("p")).status().IsNotSupported());
  o = Fast();
  o.hash_alg = "whirlpool";
  EXPECT_TRUE(FormatLuks(o, Bytes("p")).status().IsNotSupported());
}

// A 192-bit cipher outside XTS has a 24-byte key whose split key is not
// whole sectors: QEMU 7.2 aborts creating or opening it, so we refuse it.
// In XTS (two 24-byte keys) it is whole and QEMU reads it.
TEST(FormatLuks, Refuses192BitKeysOutsideXts) {
  for (const char* alg : {"aes-192", "serpent-192", "twofish-192"}) {
    for (const char* mode : {"cbc", "ctr", "ecb", "xts"}) {
      SCOPED_TRACE(std::string(alg) + " " + mode);
      LuksFormatOptions o = Fast();
      o.cipher_alg = alg;
      o.cipher_mode = mode;
      const Status st = LuksAlgorithms(o).status();
      if (std::string(mode) == "xts") {
        EXPECT_TRUE(st.ok()) << st.ToString();
        continue;
      }
      EXPECT_TRUE(st.IsNotSupported()) << st.ToString();
      EXPECT_EQ(st.message(), fmt::format("cipher {} in {} mode is not supported: QEMU aborts on "
                                          "its 24-byte LUKS key (4000 stripes are not whole "
                                          "512-byte sectors); use xts or a 128- or 256-bit key",
                                          alg, mode));
      EXPECT_TRUE(FormatLuks(o, Bytes("p")).status().IsNotSupported());
    }
  }
}

// Timed iterations: a short iter_time gives counts near the floor, and the
// slot gets about eight times the digest's count per output block.
TEST(FormatLuks, TimesIterations) {
  LuksFormatOptions o;
  o.iter_time_ms = 50;
  auto area = FormatLuks(o, Bytes("p"));
  ASSERT_TRUE(area.ok()) << area.status().ToString();
  const uint32_t slot = area->header.slots[0].iterations;
  const uint32_t digest = area->header.mk_digest_iterations;
  EXPECT_GE(slot, kLuksMinIterations);
  EXPECT_GE(digest, kLuksMinIterations);
  EXPECT_LE(slot, kMaxIterations);
  if (digest > kLuksMinIterations) {
    // 64-byte slot key = 2 SHA-256 blocks: slot ~ 8 / 2 = 4 times the digest.
    EXPECT_NEAR(double(slot) / digest, 4.0, 0.5);
  }
  AreaFile f(*area);
  EXPECT_TRUE(f.Unlock("p").ok());
}

}  // namespace
}  // namespace uq::qcow2::crypto
