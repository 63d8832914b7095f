// Device parameters: what the block layer is told about a served image
// (UBLK_CMD_SET_PARAMS), computed from the image's size and cluster size.
//
//   logical block   512 bytes (any guest I/O the image can serve)
//   physical block  min(cluster size, 4096): writes smaller than that may
//                   cost a read-modify-write of a cluster on first touch
//   io_min          512 bytes
//   io_opt          the cluster size, at most one request (max_io_buf_bytes)
//   max request     max_io_buf_bytes (each tag's buffer)
//   cache           volatile write cache with FUA: the kernel sends FLUSH
//                   and FUA writes, which the engine makes durable
//   discard         granularity = cluster size, one segment per request;
//                   write-zeroes with the same limit. Not for read-only.
//
// Thread model: pure functions.
#ifndef UBLK_QCOW2_DRIVER_PARAMS_H_
#define UBLK_QCOW2_DRIVER_PARAMS_H_

#include <linux/ublk_cmd.h>

#include <cstdint>

#include "base/status.h"

namespace uq::driver {

// What SET_PARAMS needs to know about the image being served.
struct ImageFacts {
  uint64_t size = 0;             // bytes; a multiple of 512
  uint64_t cluster_size = 4096;  // qcow2 cluster size (raw images: 4096)
  bool read_only = false;
};

// Largest discard or write-zeroes request, in bytes: 1 GiB, a multiple of
// every qcow2 cluster size (512 B .. 2 MiB).
inline constexpr uint64_t kMaxDiscardBytes = uint64_t{1} << 30;

// The parameters for `facts` with `max_io_buf_bytes` per request.
// Fails with InvalidArgument if the image size is not a whole number of
// 512-byte sectors or is zero, the cluster size is not a power of two in
// [512, 2 MiB], or max_io_buf_bytes is not a multiple of 4096 (>= 4096).
Result<ublk_params> ComputeParams(const ImageFacts& facts, uint32_t max_io_buf_bytes);

// log2(x) for a power of two; otherwise floor(log2(x)). REQUIRES: x > 0.
int Log2(uint64_t x);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_PARAMS_H_
