#include "qcow2/crypto/legacy_aes.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qcow2/crypto/hex_for_test.h"

namespace uq::qcow2::crypto {
namespace {

std::span<const std::byte> Bytes(const std::string& s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

TEST(LegacyAesTest, KeyIsThePassphraseZeroPaddedOrTruncatedTo16BytesUpToANul) {
  EXPECT_EQ(Hex(LegacyAesKey(Bytes("secret")).span()), "73656372657400000000000000000000");
  EXPECT_EQ(Hex(LegacyAesKey(Bytes("0123456789abcdefXYZ")).span()),
            "30313233343536373839616263646566");
  EXPECT_EQ(Hex(LegacyAesKey(Bytes(std::string("ab\0cd", 5))).span()),
            "61620000000000000000000000000000");
}

// The vector comes from an image qemu-img 7.2 made (`create -o encrypt.format=aes` with the
// passphrase "secret", `qemu-io -c 'write -P 0x5a 0 64k'`): guest sector 3, stored at host
// offset 0x50600, begins with these bytes. The IV is the *guest* sector number: the host
// sector (0x283) would give others.
TEST(LegacyAesTest, DecryptsWhatQemuWroteWithTheGuestSectorAsIv) {
  Result<SectorCipher> cipher = LegacyAesCipher(Bytes("secret"));
  ASSERT_TRUE(cipher.ok()) << cipher.status().ToString();
  std::vector<std::byte> sector(512, std::byte{0x5a});
  ASSERT_TRUE(cipher->Encrypt(3, sector).ok());
  EXPECT_EQ(Hex(std::span(sector).first(32)),
            "70d0968caeadd804bbe8953d25474a738cca6b06f0ce3643f0ad72545bcae083");
  ASSERT_TRUE(cipher->Decrypt(3, sector).ok());
  EXPECT_EQ(sector, std::vector<std::byte>(512, std::byte{0x5a}));
}

}  // namespace
}  // namespace uq::qcow2::crypto
