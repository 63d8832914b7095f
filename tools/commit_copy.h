// CommitAbove: the data step of `commit`. Writes into `base` everything the
// layers above it (the overlay, then the images between it and `base`) decide
// for the guest, so that `base` afterwards reads what the overlay read.
//
// For each range, the layers are asked from the top down (BlockStatus, each
// layer alone): the first that allocates it decides — its bytes are copied
// (read from that layer), or its zeros written as zeros (zero clusters where
// `base` can hold them). A layer shorter than the offset reads as zeros there,
// which QEMU's block layer counts as allocated in that layer: zeros are
// written too. Ranges no layer above `base` decides already read from `base`
// (or below it) and are left alone. QEMU's commit job (mirror) copies whole
// dirty granules instead of exact ranges; what the guest sees is the same.
#ifndef UBLK_QCOW2_TOOLS_COMMIT_COPY_H_
#define UBLK_QCOW2_TOOLS_COMMIT_COPY_H_

#include <cstdint>
#include <functional>
#include <span>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/block_device.h"

namespace uq::tools {

// `above`: the overlay first, then each image down to the one whose backing
// file is `base`; each opened without its backing chain (reads of what it
// allocates need none). `base`: opened writable (with its own chain), at
// least as large as above[0]. Copies [0, above[0]->size()); does not flush.
// `on_progress(done, total)` after each piece (may be empty). Errors name the
// file.
Task<Status> CommitAbove(std::span<qcow2::BlockDevice* const> above, qcow2::BlockDevice& base,
                         const std::function<void(uint64_t, uint64_t)>& on_progress);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_COMMIT_COPY_H_
