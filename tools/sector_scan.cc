#include "tools/sector_scan.h"

#include <algorithm>
#include <array>
#include <cstring>

namespace uq::tools {
namespace {

// memcmp over blocks first (fast), then byte by byte inside the block that
// differs.
constexpr size_t kBlock = 4096;

uint64_t SectorOf(size_t byte) { return byte / kSectorSize * kSectorSize; }

}  // namespace

std::optional<uint64_t> FirstDifferentSector(std::span<const std::byte> a,
                                             std::span<const std::byte> b) {
  const size_t n = std::min(a.size(), b.size());
  for (size_t pos = 0; pos < n; pos += kBlock) {
    const size_t len = std::min(kBlock, n - pos);
    if (std::memcmp(a.data() + pos, b.data() + pos, len) == 0) continue;
    const auto [it, unused] =
        std::mismatch(a.begin() + pos, a.begin() + pos + len, b.begin() + pos);
    return SectorOf(static_cast<size_t>(it - a.begin()));
  }
  return std::nullopt;
}

std::optional<uint64_t> FirstNonzeroSector(std::span<const std::byte> data) {
  static const std::array<std::byte, kBlock> kZeros{};
  for (size_t pos = 0; pos < data.size(); pos += kBlock) {
    const size_t len = std::min(kBlock, data.size() - pos);
    if (std::memcmp(data.data() + pos, kZeros.data(), len) == 0) continue;
    const auto it = std::find_if(data.begin() + pos, data.begin() + pos + len,
                                 [](std::byte b) { return b != std::byte{0}; });
    return SectorOf(static_cast<size_t>(it - data.begin()));
  }
  return std::nullopt;
}

}  // namespace uq::tools
