// CopyToQcow2: the copy loop of `convert -O qcow2`. Reads a source device in
// cluster-aligned chunks with many chunks in flight, skips what reads as
// zeros (holes the source knows about, and all-zero clusters: a new image
// reads zeros already), and writes the rest through the destination's write
// path — compressed cluster by cluster with `compress`, else in runs of
// contiguous non-zero clusters.
#ifndef UBLK_QCOW2_TOOLS_QCOW2_COPY_H_
#define UBLK_QCOW2_TOOLS_QCOW2_COPY_H_

#include <cstdint>
#include <functional>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/block_device.h"
#include "qcow2/qcow2_image.h"

namespace uq::tools {

struct Qcow2CopyOptions {
  bool compress = false;
  int parallel = 16;
  std::function<void(uint64_t done, uint64_t total)> on_progress;
};

// REQUIRES: target.size() >= source.size(); target freshly created (reads zeros).
Task<Status> CopyToQcow2(qcow2::BlockDevice& source, qcow2::Qcow2Image& target,
                         Qcow2CopyOptions options);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_QCOW2_COPY_H_
