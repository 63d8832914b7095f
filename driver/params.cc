#include "driver/params.h"

#include <fmt/format.h>

#include <algorithm>

namespace uq::driver {

int Log2(uint64_t x) { return 63 - __builtin_clzll(x); }

Result<ublk_params> ComputeParams(const ImageFacts& facts, uint32_t max_io_buf_bytes) {
  if (facts.size == 0 || facts.size % 512 != 0) {
    return Status::InvalidArgument(
        fmt::format("image size {} is not a positive multiple of 512 bytes", facts.size));
  }
  const uint64_t cs = facts.cluster_size;
  if (cs < 512 || cs > (uint64_t{2} << 20) || (cs & (cs - 1)) != 0) {
    return Status::InvalidArgument(
        fmt::format("cluster size {} is not a power of two in [512, 2 MiB]", cs));
  }
  if (max_io_buf_bytes < 4096 || max_io_buf_bytes % 4096 != 0) {
    return Status::InvalidArgument(
        fmt::format("request buffer of {} bytes is not a multiple of 4096", max_io_buf_bytes));
  }

  ublk_params p{};
  p.len = sizeof(p);
  p.types = UBLK_PARAM_TYPE_BASIC;

  ublk_param_basic& b = p.basic;
  b.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
  if (facts.read_only) b.attrs |= UBLK_ATTR_READ_ONLY;
  b.logical_bs_shift = 9;
  b.physical_bs_shift = static_cast<uint8_t>(Log2(std::min<uint64_t>(cs, 4096)));
  b.io_min_shift = 9;
  b.io_opt_shift = static_cast<uint8_t>(std::min(Log2(cs), Log2(max_io_buf_bytes)));
  b.max_sectors = max_io_buf_bytes >> 9;
  b.dev_sectors = facts.size >> 9;

  if (!facts.read_only) {
    p.types |= UBLK_PARAM_TYPE_DISCARD;
    ublk_param_discard& d = p.discard;
    d.discard_alignment = 0;
    d.discard_granularity = static_cast<uint32_t>(cs);
    d.max_discard_sectors = static_cast<uint32_t>(kMaxDiscardBytes >> 9);
    d.max_write_zeroes_sectors = static_cast<uint32_t>(kMaxDiscardBytes >> 9);
    d.max_discard_segments = 1;
  }
  return p;
}

}  // namespace uq::driver
