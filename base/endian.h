// Big-endian loads and stores on byte spans: qcow2 stores every number
// big-endian. Callers check bounds; these assert them in debug builds.
#ifndef UBLK_QCOW2_BASE_ENDIAN_H_
#define UBLK_QCOW2_BASE_ENDIAN_H_

#include <bit>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace uq {

// std::byteswap is C++23; g++ 12 in C++20 mode lacks it.
template <class T>
constexpr T ByteSwap(T v) {
  if constexpr (sizeof(T) == 8) return __builtin_bswap64(v);
  if constexpr (sizeof(T) == 4) return __builtin_bswap32(v);
  if constexpr (sizeof(T) == 2) return __builtin_bswap16(v);
  return v;
}

template <class T>
inline T LoadBE(std::span<const std::byte> bytes, size_t offset) {
  assert(offset + sizeof(T) <= bytes.size());
  T v;
  std::memcpy(&v, bytes.data() + offset, sizeof(T));
  if constexpr (std::endian::native == std::endian::little && sizeof(T) > 1) v = ByteSwap(v);
  return v;
}
inline uint64_t LoadBE64(std::span<const std::byte> b, size_t off) {
  return LoadBE<uint64_t>(b, off);
}
inline uint32_t LoadBE32(std::span<const std::byte> b, size_t off) {
  return LoadBE<uint32_t>(b, off);
}
inline uint16_t LoadBE16(std::span<const std::byte> b, size_t off) {
  return LoadBE<uint16_t>(b, off);
}
inline uint8_t Load8(std::span<const std::byte> b, size_t off) { return LoadBE<uint8_t>(b, off); }

template <class T>
inline void StoreBE(std::span<std::byte> bytes, size_t offset, T v) {
  assert(offset + sizeof(T) <= bytes.size());
  if constexpr (std::endian::native == std::endian::little && sizeof(T) > 1) v = ByteSwap(v);
  std::memcpy(bytes.data() + offset, &v, sizeof(T));
}
inline void StoreBE64(std::span<std::byte> b, size_t off, uint64_t v) {
  StoreBE<uint64_t>(b, off, v);
}
inline void StoreBE32(std::span<std::byte> b, size_t off, uint32_t v) {
  StoreBE<uint32_t>(b, off, v);
}
inline void StoreBE16(std::span<std::byte> b, size_t off, uint16_t v) {
  StoreBE<uint16_t>(b, off, v);
}
inline void Store8(std::span<std::byte> b, size_t off, uint8_t v) { StoreBE<uint8_t>(b, off, v); }

}  // namespace uq

#endif  // UBLK_QCOW2_BASE_ENDIAN_H_
