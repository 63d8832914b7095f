// Sector scans for `compare`: where two buffers first differ, or where one
// first holds a byte that is not zero, as the offset of the 512-byte sector
// (counted from the start of the buffer) that holds it. qemu-img compare
// reports differences at that granularity.
#ifndef UBLK_QCOW2_TOOLS_SECTOR_SCAN_H_
#define UBLK_QCOW2_TOOLS_SECTOR_SCAN_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

namespace uq::tools {

inline constexpr uint64_t kSectorSize = 512;

// The offset of the first sector where `a` and `b` differ; nullopt if equal.
// REQUIRES: a.size() == b.size().
std::optional<uint64_t> FirstDifferentSector(std::span<const std::byte> a,
                                             std::span<const std::byte> b);

// The offset of the first sector holding a nonzero byte; nullopt if all zero.
std::optional<uint64_t> FirstNonzeroSector(std::span<const std::byte> data);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_SECTOR_SCAN_H_
