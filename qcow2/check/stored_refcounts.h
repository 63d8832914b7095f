// StoredRefcounts: the refcounts stored in the image, as the check reads and
// repairs them: the refcount table in memory and a bounded cache of refcount
// blocks, written back whole.
//
// The cache holds up to 32 MiB of refcount blocks (at least 4, at most 256
// blocks) and evicts the least recently used one, writing it back first if
// it is dirty. Nothing is written except by Flush and eviction.
//
// Thread model: not thread-safe; awaits `file`, which must outlive it.
#ifndef UBLK_QCOW2_QCOW2_CHECK_STORED_REFCOUNTS_H_
#define UBLK_QCOW2_QCOW2_CHECK_STORED_REFCOUNTS_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"

namespace uq::qcow2::check_internal {

class StoredRefcounts {
 public:
  // `order`: the header's refcount_order. The table starts empty (SetTable).
  StoredRefcounts(File& file, uint32_t cluster_bits, uint32_t order)
      : file_(file),
        cluster_bits_(cluster_bits),
        order_(order),
        block_bits_(cluster_bits + 3 - order),
        capacity_(std::clamp<uint64_t>((uint64_t{32} << 20) >> cluster_bits, 4, 256)) {}

  // The refcount table's entries, as stored (flags included).
  const std::vector<uint64_t>& table() const { return table_; }
  // Replaces the table. REQUIRES: no dirty blocks (Flush first).
  void SetTable(std::vector<uint64_t> table) {
    table_ = std::move(table);
    cache_.clear();
  }

  // The refcount block holding `cluster`'s entry, or nullptr if there is
  // none (the refcount is 0). IoError for an unaligned block offset (what
  // QEMU's qcow2_get_refcount returns: -EIO) or a failed read. The pointer
  // is good until the next call that may load a block (eviction).
  Task<Result<std::byte*>> BlockFor(uint64_t cluster);

  // Fast path: the refcount if it is known without I/O.
  std::optional<uint64_t> TryGet(uint64_t cluster);

  // `cluster`'s stored refcount; errors as BlockFor.
  Task<Result<uint64_t>> Get(uint64_t cluster);

  // Sets `cluster`'s stored refcount (written back by Flush or eviction).
  // REQUIRES: a refcount block exists for it (else Corruption).
  Task<Status> Set(uint64_t cluster, uint64_t value);

  // Marks the cached block at `block` (from BlockFor) as modified.
  void MarkDirty(const std::byte* block);

  // Writes every dirty block back, whole.
  Task<Status> Flush();

  // `cluster`'s entry index inside its refcount block.
  uint64_t IndexInBlock(uint64_t cluster) const {
    return cluster & ((uint64_t{1} << block_bits_) - 1);
  }
  // The cluster-sized block at `block` (from BlockFor).
  std::span<const std::byte> BlockSpan(const std::byte* block) const {
    return {block, uint64_t{1} << cluster_bits_};
  }

 private:
  struct Entry {
    uint64_t offset = 0;
    AlignedBuffer data;
    bool dirty = false;
    uint64_t stamp = 0;
  };

  // The offset of `cluster`'s refcount block (0: none) and, if cached, its
  // data (refreshing its stamp). IoError for an unaligned block offset.
  Status Lookup(uint64_t cluster, uint64_t* offset, std::byte** cached);
  // Reads the block at `offset` into the cache, evicting if full.
  Task<Result<std::byte*>> Load(uint64_t offset);

  File& file_;
  const uint32_t cluster_bits_;
  const uint32_t order_;
  const uint32_t block_bits_;  // log2(entries per refcount block)
  const uint64_t capacity_;
  std::vector<uint64_t> table_;
  std::unordered_map<uint64_t, std::unique_ptr<Entry>> cache_;  // by block offset
  uint64_t clock_ = 0;
};

}  // namespace uq::qcow2::check_internal

#endif  // UBLK_QCOW2_QCOW2_CHECK_STORED_REFCOUNTS_H_
