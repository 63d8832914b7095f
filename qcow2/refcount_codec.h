// Refcount entries inside a refcount block: reading and writing one entry of
// any width qcow2 allows (refcount_order 0..6, i.e. 1, 2, 4, 8, 16, 32 or 64
// bits per entry).
//
// Layout (docs/interop/qcow2.rst, "Host cluster management", and QEMU's
// get_refcount_ro0..ro6): a refcount block is an array of refcount_bits-wide
// entries. Entries of 8 bits and more are big-endian integers, entry i at
// byte i * refcount_bits / 8. Narrower entries are packed into bytes starting
// at the least significant bit: entry i lives in byte i * refcount_bits / 8,
// at bit offset (i * refcount_bits) % 8 counted from bit 0, the byte's least
// significant bit. So with 1-bit refcounts, entry 0 is bit 0 (mask 0x01) of
// byte 0 and entry 7 is bit 7 (mask 0x80); with 4-bit refcounts, entry 0 is
// the low nibble of byte 0 and entry 1 the high nibble.
//
// The same layout serves the in-memory refcount array that `check` builds:
// a concatenation of refcount blocks, so a cluster-sized slice of it can be
// written to disk as a refcount block unchanged.
//
// Pure functions on spans; no allocation, no I/O. Bounds are the caller's
// contract and are asserted in debug builds.
#ifndef UBLK_QCOW2_QCOW2_REFCOUNT_CODEC_H_
#define UBLK_QCOW2_QCOW2_REFCOUNT_CODEC_H_

#include <cassert>
#include <cstddef>
#include <cstdint>
#include <span>

#include "base/endian.h"

namespace uq::qcow2 {

// The largest refcount an entry of 2^refcount_order bits can hold.
// REQUIRES: refcount_order <= 6.
constexpr uint64_t MaxRefcount(uint32_t refcount_order) {
  assert(refcount_order <= 6);
  const uint32_t bits = 1u << refcount_order;
  return bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
}

// Entries in one refcount block: cluster_size * 8 / refcount_bits.
// REQUIRES: refcount_order <= 6, cluster_bits <= 60.
constexpr uint64_t RefcountEntriesPerBlock(uint32_t cluster_bits, uint32_t refcount_order) {
  assert(refcount_order <= 6);
  return (uint64_t{1} << (cluster_bits + 3)) >> refcount_order;
}

// Bytes needed to hold `entries` refcounts of 2^refcount_order bits (rounded up
// to whole bytes). REQUIRES: refcount_order <= 6, entries < 2^57.
constexpr uint64_t RefcountBytesFor(uint64_t entries, uint32_t refcount_order) {
  return ((entries << refcount_order) + 7) / 8;
}

// Entry `index` of `block`. REQUIRES: refcount_order <= 6 and the entry lies
// inside the span (RefcountBytesFor(index + 1, refcount_order) <= size).
inline uint64_t GetRefcount(std::span<const std::byte> block, uint64_t index,
                            uint32_t refcount_order) {
  assert(refcount_order <= 6);
  assert(RefcountBytesFor(index + 1, refcount_order) <= block.size());
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const uint32_t bits = 1u << refcount_order;
      const uint64_t bit = index << refcount_order;  // absolute bit position
      const uint8_t byte = static_cast<uint8_t>(block[bit / 8]);
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

// Sets entry `index` of `block` to `value`, leaving every other entry alone.
// REQUIRES: as GetRefcount, and value <= MaxRefcount(refcount_order).
inline void SetRefcount(std::span<std::byte> block, uint64_t index, uint32_t refcount_order,
                        uint64_t value) {
  assert(refcount_order <= 6);
  assert(RefcountBytesFor(index + 1, refcount_order) <= block.size());
  assert(value <= MaxRefcount(refcount_order));
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const uint32_t bits = 1u << refcount_order;
      const uint64_t bit = index << refcount_order;
      const uint32_t shift = bit % 8;
      const uint32_t mask = ((1u << bits) - 1) << shift;
      uint8_t byte = static_cast<uint8_t>(block[bit / 8]);
      byte =
          static_cast<uint8_t>((byte & ~mask) | ((static_cast<uint32_t>(value) << shift) & mask));
      block[bit / 8] = static_cast<std::byte>(byte);
      return;
    }
    case 3:
      block[index] = static_cast<std::byte>(value);
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
