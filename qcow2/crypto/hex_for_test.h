// Lower-case hex of a byte span, for comparing crypto output with published
// test vectors. Tests only.
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_HEX_FOR_TEST_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_HEX_FOR_TEST_H_

#include <cstddef>
#include <span>
#include <string>

namespace uq::qcow2::crypto {

inline std::string Hex(std::span<const std::byte> b) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(b.size() * 2);
  for (std::byte x : b) {
    out += kDigits[static_cast<unsigned>(x) >> 4];
    out += kDigits[static_cast<unsigned>(x) & 15];
  }
  return out;
}

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_HEX_FOR_TEST_H_
