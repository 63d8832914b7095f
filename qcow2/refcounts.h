// Refcounts: the image's reference counts — the refcount table, its blocks
// (cached in slices), cluster allocation, and the rules that keep them
// crash-safe.
//
// Crash-safety contract (the image's Flush drives it in this order):
//   1. WriteBlocks()   dirty refcount block slices (increments, new blocks)
//   2. sync
//   3. WriteTable()    refcount table entries naming new blocks
//   ... the image syncs, then writes L2 tables and the L1 table ...
//   4. ApplyDeferredDecrements() once the L2 entries that dropped those
//      references are on disk, then WriteBlocks() again.
// So a refcount never drops before the entry that used it is gone from disk,
// and a new cluster is counted on disk before any entry pointing at it. A
// crash in between leaks clusters at worst, as QEMU's design allows.
// Clusters whose decrement is deferred are not reused before it is applied.
//
// New refcount blocks describe themselves: a block for range i (clusters
// [i*E, (i+1)*E)) is placed at the first cluster of that range, which is free
// because a range without a block has only zero refcounts. When the table is
// full it is moved to a fresh range, with the blocks describing it, and the
// header switched to it after both are on disk (QEMU's 8 MiB limit holds).
// A run of E clusters or more cannot fit beside a self-describing block, so
// it is taken from free space in ranges that have blocks, or else from fresh
// ranges past everything in use: their blocks first (written and synced
// before the table names them), then the run.
//
// Shadow commits (snapshot create and delete): refcount changes that must
// become true together with other metadata, in one header write. Between
// BeginShadow and AdoptShadow nothing the on-disk table names is written:
// WriteShadow copies every changed block to a new cluster and writes a new
// table naming the copies (blocks made meanwhile, in ranges the old table
// has no block for, are written in place: nothing on disk names them). The
// caller's header write switches to the new table; a crash before it leaves
// the old refcounts as they were (the new clusters are unreferenced). Clusters
// the commit frees are not handed out before AdoptShadow: until the switch
// the old state still uses them.
//
// Thread model: one event loop; callers serialise mutations (the image's
// metadata mutex).
#ifndef UBLK_QCOW2_QCOW2_REFCOUNTS_H_
#define UBLK_QCOW2_QCOW2_REFCOUNTS_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <unordered_set>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "qcow2/header.h"
#include "qcow2/metadata_cache.h"

namespace uq::qcow2 {

class Refcounts {
 public:
  // `header` is the image's live header (updated when the table moves).
  Refcounts(File* file, Header* header, uint64_t cache_bytes);

  // Reads the refcount table.
  Task<Status> Load();

  Task<Result<uint64_t>> Get(uint64_t cluster);

  // The end (bytes) of the highest cluster this object has put to use since
  // Load(): allocations, refcount blocks, moved tables. With the file size
  // at open, an upper bound of everything the image references, so the file
  // may be cut back to it (past it lies only space grown ahead of need).
  uint64_t used_end() const { return used_end_; }
  // Allocates `count` contiguous free clusters with refcount 1 each and
  // returns the byte offset of the first. The clusters' contents are garbage.
  // A cluster that looks free but holds metadata (see set_in_use) is
  // Corruption: the refcounts under-count it, and handing it out would
  // overwrite it.
  Task<Result<uint64_t>> Allocate(uint64_t count);
  // Clusters the image knows to hold its metadata (header, L1 and L2 tables,
  // snapshot tables), besides the refcount structures this class knows
  // itself. A damaged image can give any of them refcount 0; this is what
  // keeps Allocate and new refcount blocks off them.
  void set_in_use(std::function<bool(uint64_t cluster)> in_use) { in_use_ = std::move(in_use); }
  // Adds one reference to a cluster in use. NoSpace on overflow.
  Task<Status> Increment(uint64_t cluster);
  // Drops one reference at ApplyDeferredDecrements().
  void DeferDecrement(uint64_t cluster) { deferred_.push_back(cluster); }

  Task<Status> WriteBlocks() { return cache_.WriteDirty(); }
  Task<Status> WriteTable();
  // Applies the deferred decrements in memory; returns the clusters that
  // became free (the caller may punch them out of the file).
  Task<Result<std::vector<uint64_t>>> ApplyDeferredDecrements();

  bool blocks_dirty() const { return cache_.dirty_slices() > 0; }
  bool blocks_mostly_dirty() const { return cache_.mostly_dirty(); }
  bool table_dirty() const { return !dirty_table_chunks_.empty(); }
  bool has_deferred() const { return !deferred_.empty(); }
  size_t deferred_count() const { return deferred_.size(); }

  // Starts a shadow commit. `end` (bytes): the end of everything the image
  // uses; `reach`: how many clusters the caller and WriteShadow may allocate
  // meanwhile. The table is grown first if it could not describe them past
  // `end` (it cannot move during the commit). REQUIRES: nothing dirty, no
  // deferred decrement (a flush just done).
  Task<Status> BeginShadow(uint64_t end, uint64_t reach);
  // Writes the changes made since BeginShadow as described above (the caller
  // syncs). Returns the new table's offset; it has refcount_table_clusters
  // clusters. Reads from then on see the new blocks.
  Task<Result<uint64_t>> WriteShadow();
  // After the header names the new table (`*header` already updated): the
  // old table and the blocks that were copied are dropped (deferred
  // decrements, applied at the next flush).
  void AdoptShadow(uint64_t old_table_offset, uint32_t old_table_clusters);
  // On failure before the header write: the changes of the commit are
  // forgotten (the blocks on disk are read again); clusters made for it in
  // fresh ranges stay counted, as leaks.
  void AbandonShadow();
  bool in_shadow() const { return shadow_.has_value(); }

  // Whether `cluster` holds the refcount table or a refcount block.
  bool IsRefcountMetadata(uint64_t cluster) const;
  uint64_t entries_per_block() const { return entries_per_block_; }
  const std::vector<uint64_t>& table() const { return table_; }

 private:
  struct Location {
    MetadataCache::SliceRef slice;
    uint64_t index;  // entry index within the slice
  };
  // Corruption if `cluster`, about to be put to a new use, holds metadata.
  Status CheckFree(uint64_t cluster) const;
  // The slice holding `cluster`'s entry; REQUIRES its block exists.
  Task<Result<Location>> Locate(uint64_t cluster);
  Task<Status> EnsureBlock(uint64_t block_index);
  // Allocate for runs of at least entries_per_block_ clusters: a free run in
  // the ranges that have blocks, else fresh ranges past everything in use,
  // their blocks first and the run right after them.
  Task<Result<uint64_t>> AllocateLongRun(uint64_t count);
  // Raises the refcounts of clusters [start, start + count), all free and
  // with blocks, to 1 (in the cache, dirty).
  Task<Status> MarkAllocated(uint64_t start, uint64_t count);
  // The `blocks` refcount blocks of a fresh layout from cluster `start` (a
  // multiple of entries_per_block_): blocks first, then what they describe,
  // `total` clusters in all (the blocks included), each with refcount 1.
  AlignedBuffer SelfCountingBlocks(uint64_t start, uint64_t blocks, uint64_t total) const;
  Task<Status> GrowTable(uint64_t block_index);
  Status Corrupt(std::string what) const;
  // Forgets the cached slices of the shadow's on-disk blocks (dirty or not).
  void DropShadowSlices();

  // Whether a free-looking cluster may not be handed out: the commit freed
  // it, and the disk's state still uses it.
  bool Fenced(uint64_t cluster) const { return shadow_ && shadow_->freed.count(cluster) != 0; }

  struct Shadow {
    uint64_t saved_free_hint;
    // free_hint_ after the commit: the saved hint, lowered by what it freed.
    uint64_t lowest_freed;
    std::unordered_set<uint64_t> freed;
    // The table as the disk has it; where table_ differs, WriteShadow
    // copied the block.
    std::vector<uint64_t> base_table;
  };
  std::optional<Shadow> shadow_;

  File* file_;
  Header* header_;
  uint64_t cluster_size_;
  uint32_t order_;
  uint64_t entries_per_block_;
  uint64_t entries_per_slice_;
  MetadataCache cache_;
  std::vector<uint64_t> table_;
  // Clusters holding refcount blocks (what table_ names), for O(1) overlap
  // checks on the data path.
  std::unordered_set<uint64_t> block_clusters_;
  std::set<uint64_t> dirty_table_chunks_;  // 4 KiB chunks of the table
  std::vector<uint64_t> deferred_;
  uint64_t free_hint_ = 0;  // no free cluster below this one
  uint64_t used_end_ = 0;
  std::function<bool(uint64_t)> in_use_;  // see set_in_use
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_REFCOUNTS_H_
