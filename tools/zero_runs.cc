#include "tools/zero_runs.h"

#include <algorithm>
#include <cstring>

namespace uq::tools {

bool IsAllZero(std::span<const std::byte> data) {
  static constexpr std::byte kZeros[4096] = {};
  while (!data.empty()) {
    size_t n = std::min(data.size(), sizeof(kZeros));
    if (std::memcmp(data.data(), kZeros, n) != 0) return false;
    data = data.subspan(n);
  }
  return true;
}

std::vector<ZeroRun> SplitZeroRuns(std::span<const std::byte> data, size_t block) {
  std::vector<ZeroRun> runs;
  for (uint64_t offset = 0; offset < data.size(); offset += block) {
    uint64_t length = std::min<uint64_t>(block, data.size() - offset);
    bool zero = IsAllZero(data.subspan(offset, length));
    if (!runs.empty() && runs.back().zero == zero) {
      runs.back().length += length;
    } else {
      runs.push_back(ZeroRun{offset, length, zero});
    }
  }
  return runs;
}

}  // namespace uq::tools
