// Refcounts' shadow commits (see refcounts.h): refcount changes written
// beside the blocks the on-disk table names, never over them, so that one
// header write makes them true together with the caller's other metadata.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <unordered_map>

#include "base/endian.h"
#include "qcow2/format.h"
#include "qcow2/refcounts.h"

namespace uq::qcow2 {

Task<Status> Refcounts::BeginShadow(uint64_t end, uint64_t reach) {
  if (shadow_ || blocks_dirty() || table_dirty() || has_deferred()) {
    co_return Status::InvalidArgument(fmt::format(
        "{}: refcount changes are pending; flush before a snapshot operation", file_->path()));
  }
  const uint64_t E = entries_per_block_;
  // At worst every allocation lands past everything in use, and each fresh
  // range spends a cluster on its block. The table cannot move during the
  // commit (moving it writes the header), so it is made large enough now, a
  // consistent change of its own (the old table's drop stays deferred).
  const uint64_t end_cluster = std::max(end, used_end_) / cluster_size_ + 1;
  const uint64_t last = end_cluster + 2 * reach + 2 * E;
  if (last / E >= table_.size()) CO_RETURN_IF_ERROR(co_await GrowTable(last / E));
  Shadow sh;
  sh.saved_free_hint = free_hint_;
  sh.lowest_freed = free_hint_;
  sh.base_table = table_;
  shadow_ = std::move(sh);
  co_return Status::Ok();
}

Task<Result<uint64_t>> Refcounts::WriteShadow() {
  Shadow& sh = *shadow_;
  const uint64_t cs = cluster_size_;
  // The blocks the disk's table names, by offset.
  std::unordered_map<uint64_t, uint64_t> on_disk;
  for (uint64_t bi = 0; bi < sh.base_table.size(); bi++) {
    const uint64_t block = sh.base_table[bi] & kRefcountTableOffsetMask;
    if (block != 0) on_disk.emplace(block, bi);
  }
  // The new table's clusters, counted in the blocks like everything else.
  CO_ASSIGN_OR_RETURN(const uint64_t table_offset,
                      co_await Allocate(header_->refcount_table_clusters));
  // A new cluster for each changed on-disk block; allocating one may change
  // another block, so until none is left.
  std::map<uint64_t, uint64_t> moved;  // block index -> new offset
  for (;;) {
    std::set<uint64_t> todo;
    for (uint64_t o : cache_.DirtyOffsets()) {
      auto it = on_disk.find(o - o % cs);
      if (it != on_disk.end() && moved.count(it->second) == 0) todo.insert(it->second);
    }
    if (todo.empty()) break;
    for (uint64_t bi : todo) {
      CO_ASSIGN_OR_RETURN(const uint64_t at, co_await Allocate(1));
      moved[bi] = at;
    }
  }
  // Whole copies of those blocks at their new places (clean slices come from
  // the old block, which the disk still has as it was).
  const uint64_t slice = cache_.slice_size();
  for (const auto& [bi, at] : moved) {
    const uint64_t old = sh.base_table[bi] & kRefcountTableOffsetMask;
    AlignedBuffer buf(cs);
    for (uint64_t s = 0; s < cs; s += slice) {
      CO_ASSIGN_OR_RETURN(MetadataCache::SliceRef ref, co_await cache_.Get(old + s));
      std::memcpy(buf.data() + s, ref.bytes().data(), slice);
    }
    CO_RETURN_IF_ERROR(co_await file_->Write(at, buf.span()));
  }
  // From here on the copies are the blocks: the old ones' slices are
  // forgotten (never written), and what else is dirty belongs to blocks made
  // during the commit in fresh ranges, written in place.
  DropShadowSlices();
  for (const auto& [bi, at] : moved) {
    table_[bi] = at;
    block_clusters_.insert(at / cs);
  }
  CO_RETURN_IF_ERROR(co_await cache_.WriteDirty());
  AlignedBuffer table_buf(uint64_t{header_->refcount_table_clusters} * cs);
  for (uint64_t i = 0; i < table_.size(); i++) StoreBE64(table_buf.span(), i * 8, table_[i]);
  CO_RETURN_IF_ERROR(co_await file_->Write(table_offset, table_buf.span()));
  co_return table_offset;
}

void Refcounts::DropShadowSlices() {
  const uint64_t cs = cluster_size_;
  std::set<uint64_t> on_disk;
  for (uint64_t entry : shadow_->base_table) {
    if ((entry & kRefcountTableOffsetMask) != 0) on_disk.insert(entry & kRefcountTableOffsetMask);
  }
  std::vector<MetadataCache::DirtySlice> dirty = cache_.TakeDirty();
  std::vector<MetadataCache::DirtySlice> fresh;
  for (MetadataCache::DirtySlice& d : dirty) {
    if (on_disk.count(d.ref.offset() - d.ref.offset() % cs) == 0) fresh.push_back(std::move(d));
  }
  dirty.clear();  // unpins them: Invalidate skips pinned slices' map entries
  cache_.Redirty(fresh);
  for (uint64_t block : on_disk) cache_.Invalidate(block, cs);
}

void Refcounts::AdoptShadow(uint64_t old_table_offset, uint32_t old_table_clusters) {
  Shadow& sh = *shadow_;
  // The blocks WriteShadow copied: the table names the copies now.
  for (uint64_t bi = 0; bi < sh.base_table.size(); bi++) {
    const uint64_t old = sh.base_table[bi] & kRefcountTableOffsetMask;
    if (old == 0 || old == (table_[bi] & kRefcountTableOffsetMask)) continue;
    block_clusters_.erase(old / cluster_size_);
    DeferDecrement(old / cluster_size_);
  }
  for (uint64_t i = 0; i < old_table_clusters; i++) {
    DeferDecrement(old_table_offset / cluster_size_ + i);
  }
  // The whole table was written in its new place.
  dirty_table_chunks_.clear();
  free_hint_ = sh.lowest_freed;
  shadow_.reset();
}

void Refcounts::AbandonShadow() {
  if (!shadow_) return;
  Shadow& sh = *shadow_;
  for (uint64_t bi = 0; bi < sh.base_table.size() && bi < table_.size(); bi++) {
    const uint64_t base = sh.base_table[bi] & kRefcountTableOffsetMask;
    const uint64_t now = table_[bi] & kRefcountTableOffsetMask;
    if (base == 0 || base == now) continue;
    // A copy WriteShadow made: the disk's table names the old block.
    block_clusters_.erase(now / cluster_size_);
    cache_.Invalidate(now, cluster_size_);
    table_[bi] = sh.base_table[bi];
  }
  // The old blocks are read again as the disk has them; blocks made in fresh
  // ranges keep what they counted (leaks) and stay in the table, to be
  // written at the next flush.
  DropShadowSlices();
  free_hint_ = sh.saved_free_hint;
  shadow_.reset();
}

}  // namespace uq::qcow2
