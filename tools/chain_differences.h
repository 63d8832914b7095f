// CopyChainDifferences: the data step of a safe `rebase`. Where the overlay
// leaves a range unallocated, it shows what its old backing chain reads
// there; after the rebase it will show what the new one reads. Copying the
// old chain's bytes into the overlay wherever the two differ keeps what the
// guest sees unchanged, whatever the new chain holds.
//
// Follows qemu-img 7.2's img_rebase step by step, so that the overlay ends up
// with the same clusters allocated as QEMU's:
//   - ranges the overlay allocates (data or zeros) are skipped;
//   - the rest is read from both chains in pieces of at most 2 MiB; a chain
//     that is absent, or shorter than the offset, reads as zeros;
//   - the pieces are compared 512-byte sector by sector, and each run of
//     differing sectors is written with the old chain's bytes — as a
//     write-zeroes request where the offset lies past the old chain's end
//     (zero clusters, where the image can hold them), as data otherwise.
// Writes of part of a cluster copy the rest of it from the old chain (the
// overlay's backing device at this point), which reads as before.
#ifndef UBLK_QCOW2_TOOLS_CHAIN_DIFFERENCES_H_
#define UBLK_QCOW2_TOOLS_CHAIN_DIFFERENCES_H_

#include <cstdint>
#include <functional>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/block_device.h"

namespace uq::tools {

// Copies into `overlay` (opened writable with its old backing chain, which is
// overlay.backing(), possibly null) what that chain reads wherever it differs
// from `new_backing` (null: no backing file, zeros) over the overlay's
// unallocated ranges. `on_progress(done, total)` is called after each piece
// (may be empty). Writes are not flushed: the caller flushes before it
// switches the header. Errors name the file.
Task<Status> CopyChainDifferences(qcow2::BlockDevice& overlay, qcow2::BlockDevice* new_backing,
                                  const std::function<void(uint64_t, uint64_t)>& on_progress);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_CHAIN_DIFFERENCES_H_
