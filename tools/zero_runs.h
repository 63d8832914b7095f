// Finding the all-zero parts of a buffer, so copies can leave holes there.
#ifndef UBLK_QCOW2_TOOLS_ZERO_RUNS_H_
#define UBLK_QCOW2_TOOLS_ZERO_RUNS_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace uq::tools {

// True if every byte of `data` is zero (true for an empty span).
bool IsAllZero(std::span<const std::byte> data);

// A run of bytes inside a buffer, either all zero or not.
struct ZeroRun {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool zero = false;
  bool operator==(const ZeroRun&) const = default;
};

// Splits `data` into blocks of `block` bytes (the last one may be shorter),
// classifies each as all-zero or not, and merges neighbours of the same kind.
// The runs are in order, alternate between zero and non-zero, and together
// cover `data` exactly; an empty span gives no runs. REQUIRES: block > 0.
std::vector<ZeroRun> SplitZeroRuns(std::span<const std::byte> data, size_t block);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_ZERO_RUNS_H_
