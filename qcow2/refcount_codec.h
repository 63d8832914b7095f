// Reading and writing one entry of a refcount block, for every width the
// format allows (refcount_bits = 1 << refcount_order, 1 to 64 bits). Entries
// narrower than a byte are packed from the least significant bit; wider ones
// are big-endian.
#ifndef UBLK_QCOW2_QCOW2_REFCOUNT_CODEC_H_
#define UBLK_QCOW2_QCOW2_REFCOUNT_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "base/endian.h"

namespace uq::qcow2 {

inline uint64_t MaxRefcount(uint32_t refcount_order) {
  return refcount_order >= 6 ? ~uint64_t{0} : (uint64_t{1} << (1u << refcount_order)) - 1;
}

inline uint64_t RefcountEntriesPerBlock(uint32_t cluster_bits, uint32_t refcount_order) {
  return uint64_t{1} << (cluster_bits + 3 - refcount_order);
}

// REQUIRES: index < entries in `block`.
inline uint64_t GetRefcount(std::span<const std::byte> block, uint64_t index, uint32_t refcount_order) {
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const uint32_t bits = 1u << refcount_order;
      const uint64_t bit = index * bits;
      uint8_t byte = static_cast<uint8_t>(block[bit / 8]);
      return (byte >> (bit % 8)) & ((1u << bits) - 1);
    }
    case 3:
      return static_cast<uint8_t>(block[index]);
    case 4:
      return LoadBE16(block, index * 2);
    case 5:
      return LoadBE32(block, index * 4);
    default:
      return LoadBE64(block, index * 8);
  }
}

// REQUIRES: value <= MaxRefcount(refcount_order).
inline void SetRefcount(std::span<std::byte> block, uint64_t index, uint32_t refcount_order, uint64_t value) {
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const uint32_t bits = 1u << refcount_order;
      const uint64_t bit = index * bits;
      const uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << (bit % 8));
      uint8_t byte = static_cast<uint8_t>(block[bit / 8]);
      byte = static_cast<uint8_t>((byte & ~mask) | ((value << (bit % 8)) & mask));
      block[bit / 8] = std::byte{byte};
      return;
    }
    case 3:
      block[index] = std::byte(static_cast<uint8_t>(value));
      return;
    case 4:
      StoreBE16(block, index * 2, static_cast<uint16_t>(value));
      return;
    case 5:
      StoreBE32(block, index * 4, static_cast<uint32_t>(value));
      return;
    default:
      StoreBE64(block, index * 8, value);
      return;
  }
}

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_REFCOUNT_CODEC_H_
