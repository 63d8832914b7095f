// Small helpers shared by the pieces of the check (check.cc and the files
// its CheckPass is split into): QEMU's limits and the way it words errors.
// Internal to qcow2/check.
#ifndef UBLK_QCOW2_QCOW2_CHECK_CHECK_UTIL_H_
#define UBLK_QCOW2_QCOW2_CHECK_CHECK_UTIL_H_

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "base/status.h"

namespace uq::qcow2::check_internal {

// QEMU refuses to check files of more than INT_MAX clusters.
inline constexpr uint64_t kMaxCheckClusters = INT_MAX;

// What QEMU prints for a failed operation: strerror of its errno.
inline std::string ErrorText(const Status& s) {
  return s.error_number() != 0 ? std::strerror(s.error_number()) : s.message();
}

// A failure that qemu-img reports as "Check failed: <strerror>".
inline Status Errno(int err) { return Status::IoError(std::strerror(err), err); }

// Whether every byte of `bytes` is zero. One memcmp of the span against
// itself shifted by a byte (uninstrumented libc speed): the walks use it to
// pass over an all-zero table (unallocated entries only, such as a table
// that lies past the end of the file) without visiting its entries one by
// one.
inline bool AllZero(std::span<const std::byte> bytes) {
  return bytes.empty() || (bytes[0] == std::byte{0} &&
                           std::memcmp(bytes.data(), bytes.data() + 1, bytes.size() - 1) == 0);
}

inline uint64_t DivRoundUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }
inline uint64_t RoundUp(uint64_t a, uint64_t b) { return DivRoundUp(a, b) * b; }

}  // namespace uq::qcow2::check_internal

#endif  // UBLK_QCOW2_QCOW2_CHECK_CHECK_UTIL_H_
