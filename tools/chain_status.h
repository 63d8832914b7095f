// ChainStatus: what QEMU's block layer says about a guest range of a whole
// backing chain (bdrv_block_status_above(top, NULL, ...), the question
// `qemu-img compare` asks), built from each layer's own BlockDevice::
// BlockStatus answer.
//
// The flags are QEMU's: data, zero, a host offset (offset_valid), allocated
// somewhere in the chain (or synthesized as zeros past the end of a short
// backing file), and eof when the answer runs to the end of the top image.
// `compare -s` compares these flags, eof included, so an answer's length
// matters too: each layer answers at most one L2 table (qcow2), one hole or
// data extent (raw), as QEMU's drivers do.
#ifndef UBLK_QCOW2_TOOLS_CHAIN_STATUS_H_
#define UBLK_QCOW2_TOOLS_CHAIN_STATUS_H_

#include <cstdint>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/block_device.h"

namespace uq::tools {

struct ChainStatus {
  bool data = false;
  bool zero = false;
  bool offset_valid = false;
  bool allocated = false;
  bool eof = false;
  // Bytes from the offset asked about that share these flags; > 0 inside
  // the image.
  uint64_t length = 0;

  // Same flags (the lengths may differ).
  bool SameFlags(const ChainStatus& other) const {
    return data == other.data && zero == other.zero && offset_valid == other.offset_valid &&
           allocated == other.allocated && eof == other.eof;
  }
};

// The status of the longest run from `offset` (at most `length` bytes) that
// `top`'s chain describes one way. REQUIRES: 0 < length and
// offset + length <= top.size(). Errors: those of BlockStatus.
Task<Result<ChainStatus>> ChainStatusAt(qcow2::BlockDevice& top, uint64_t offset, uint64_t length);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_CHAIN_STATUS_H_
