#include "tools/chain_status.h"

#include <algorithm>
#include <optional>

namespace uq::tools {
namespace {

using qcow2::BlockDevice;
using qcow2::RangeStatus;

// One layer on its own (QEMU's bdrv_co_block_status for one node). At or
// past the layer's end: eof and length 0.
Task<Result<ChainStatus>> LayerStatus(BlockDevice& layer, uint64_t offset, uint64_t length) {
  ChainStatus c;
  if (offset >= layer.size()) {
    c.eof = true;
    co_return c;
  }
  length = std::min(length, layer.size() - offset);
  CO_ASSIGN_OR_RETURN(RangeStatus s, co_await layer.BlockStatus(offset, length));
  c.length = std::min(s.length, length);
  c.data = s.data();
  c.zero = s.zero();
  c.offset_valid = s.has_offset;
  c.allocated = c.data || c.zero;
  if (!c.allocated) {
    // A qcow2 layer holding nothing here reads as zeros if nothing lies
    // below; QEMU says so at this layer (not allocated, though).
    BlockDevice* below = layer.backing();
    if (below == nullptr || offset >= below->size()) c.zero = true;
  }
  c.eof = offset + c.length == layer.size();
  co_return c;
}

}  // namespace

Task<Result<ChainStatus>> ChainStatusAt(BlockDevice& top, uint64_t offset, uint64_t length) {
  CO_ASSIGN_OR_RETURN(ChainStatus c, co_await LayerStatus(top, offset, length));
  if (c.allocated) co_return c;
  // Unallocated at the top: dive while the layers below hold nothing either,
  // never answering for more than the layers above did.
  std::optional<uint64_t> top_eof;
  if (c.eof) top_eof = offset + c.length;
  length = c.length;
  for (BlockDevice* layer = top.backing(); layer != nullptr; layer = layer->backing()) {
    CO_ASSIGN_OR_RETURN(c, co_await LayerStatus(*layer, offset, length));
    if (c.length == 0) {
      // Past the end of a short backing file: zeros, allocated at this
      // layer as far as QEMU is concerned.
      c = ChainStatus{.zero = true, .allocated = true, .length = length};
      break;
    }
    if (c.allocated) {
      c.eof = false;  // the lower layer's end is not the top's
      break;
    }
    length = c.length;
  }
  if (top_eof && offset + c.length == *top_eof) c.eof = true;
  co_return c;
}

}  // namespace uq::tools
