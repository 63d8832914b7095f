#include "qcow2/refcounts.h"

#include <fmt/format.h>

#include <algorithm>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/format.h"
#include "qcow2/refcount_codec.h"

namespace uq::qcow2 {
namespace {
constexpr uint64_t kSliceBytes = 4096;
constexpr uint64_t kTableChunkBytes = 4096;
}  // namespace

Refcounts::Refcounts(File* file, Header* header, uint64_t cache_bytes)
    : file_(file),
      header_(header),
      cluster_size_(header->cluster_size()),
      order_(header->refcount_order),
      entries_per_block_(RefcountEntriesPerBlock(header->cluster_bits, header->refcount_order)),
      entries_per_slice_(std::min(kSliceBytes, cluster_size_) * 8 >> header->refcount_order),
      cache_(file, std::min(kSliceBytes, cluster_size_), cache_bytes, cluster_size_) {}

Status Refcounts::Corrupt(std::string what) const {
  return Status::Corruption(fmt::format("{}: {}", file_->path(), what));
}

Task<Status> Refcounts::Load() {
  const uint64_t bytes = uint64_t{header_->refcount_table_clusters} * cluster_size_;
  AlignedBuffer raw(bytes);
  CO_RETURN_IF_ERROR(co_await file_->ReadExact(header_->refcount_table_offset, raw.span()));
  table_.resize(bytes / 8);
  for (uint64_t i = 0; i < table_.size(); i++) {
    table_[i] = LoadBE64(raw.span(), i * 8);
    if (table_[i] & kRefcountTableOffsetMask)
      block_clusters_.insert((table_[i] & kRefcountTableOffsetMask) / cluster_size_);
  }
  co_return Status::Ok();
}

Status Refcounts::CheckFree(uint64_t cluster) const {
  if (IsRefcountMetadata(cluster) || (in_use_ && in_use_(cluster))) {
    return Corrupt(fmt::format("cluster {} holds metadata but its refcount is 0", cluster));
  }
  return Status::Ok();
}

bool Refcounts::IsRefcountMetadata(uint64_t cluster) const {
  const uint64_t offset = cluster * cluster_size_;
  const uint64_t table_bytes = uint64_t{header_->refcount_table_clusters} * cluster_size_;
  if (offset >= header_->refcount_table_offset &&
      offset < header_->refcount_table_offset + table_bytes) {
    return true;
  }
  return block_clusters_.count(cluster) != 0;
}

Task<Result<Refcounts::Location>> Refcounts::Locate(uint64_t cluster) {
  const uint64_t bi = cluster / entries_per_block_;
  const uint64_t block = table_[bi] & kRefcountTableOffsetMask;
  if (block % cluster_size_ != 0) {
    co_return Corrupt(
        fmt::format("refcount table entry {} (0x{:x}) is not cluster-aligned", bi, table_[bi]));
  }
  const uint64_t in_block = cluster % entries_per_block_;
  const uint64_t slice_offset = block + in_block / entries_per_slice_ * cache_.slice_size();
  MetadataCache::SliceRef slice = cache_.TryGet(slice_offset);
  if (!slice) {
    auto loaded = co_await cache_.Get(slice_offset);
    if (!loaded.ok()) co_return loaded.status().WithContext("refcount block");
    slice = std::move(*loaded);
  }
  co_return Location{std::move(slice), in_block % entries_per_slice_};
}

Task<Result<uint64_t>> Refcounts::Get(uint64_t cluster) {
  const uint64_t bi = cluster / entries_per_block_;
  if (bi >= table_.size() || (table_[bi] & kRefcountTableOffsetMask) == 0) co_return uint64_t{0};
  CO_ASSIGN_OR_RETURN(Location loc, co_await Locate(cluster));
  co_return GetRefcount(loc.slice.bytes(), loc.index, order_);
}

Task<Status> Refcounts::EnsureBlock(uint64_t bi) {
  if (bi >= table_.size()) CO_RETURN_IF_ERROR(co_await GrowTable(bi));
  if ((table_[bi] & kRefcountTableOffsetMask) != 0) co_return Status::Ok();
  // Every cluster of range bi is free, so the range's first cluster can hold
  // its block, which then counts itself.
  const uint64_t offset = bi * entries_per_block_ * cluster_size_;
  CO_RETURN_IF_ERROR(CheckFree(offset / cluster_size_));
  for (uint64_t s = 0; s < cluster_size_; s += cache_.slice_size()) {
    MetadataCache::SliceRef slice = cache_.InsertZeroed(offset + s);
    if (s == 0) SetRefcount(slice.bytes(), 0, order_, 1);
    cache_.MarkDirty(slice);
  }
  table_[bi] = offset;
  used_end_ = std::max(used_end_, offset + cluster_size_);
  block_clusters_.insert(offset / cluster_size_);
  dirty_table_chunks_.insert(bi * 8 / kTableChunkBytes);
  co_return Status::Ok();
}

Task<Status> Refcounts::GrowTable(uint64_t needed_bi) {
  if (shadow_) {
    // BeginShadow grows the table for what the commit may allocate.
    co_return Status::NoSpace(fmt::format(
        "{}: the refcount table would have to move during a snapshot operation", file_->path()));
  }
  // What the new table will reference must be on disk before it is.
  CO_RETURN_IF_ERROR(co_await WriteBlocks());
  CO_RETURN_IF_ERROR(co_await file_->Sync());

  const uint64_t E = entries_per_block_;
  const uint64_t old_entries = table_.size();
  // A range no table entry covered yet: all of its clusters are free.
  const uint64_t first_range = std::max(old_entries, needed_bi + 1);
  uint64_t blocks = 1, new_entries = 0, table_clusters = 0;
  for (;;) {
    new_entries = std::max(old_entries + old_entries / 2, first_range + blocks);
    table_clusters = (new_entries * 8 + cluster_size_ - 1) / cluster_size_;
    new_entries = table_clusters * cluster_size_ / 8;
    uint64_t need = (table_clusters + blocks + E - 1) / E;
    if (need <= blocks) break;
    blocks = need;
  }
  if (table_clusters * cluster_size_ > kMaxRefcountTableBytes) {
    co_return Status::NoSpace(
        fmt::format("{}: the refcount table would exceed {} bytes; the image cannot grow",
                    file_->path(), kMaxRefcountTableBytes));
  }
  // Layout: the new blocks, then the new table, from the start of first_range.
  const uint64_t start = first_range * E;  // cluster index
  const uint64_t total = blocks + table_clusters;
  for (uint64_t c = start; c < start + total; c++) CO_RETURN_IF_ERROR(CheckFree(c));
  AlignedBuffer block_buf = SelfCountingBlocks(start, blocks, total);
  std::vector<uint64_t> table = table_;
  table.resize(new_entries, 0);
  for (uint64_t j = 0; j < blocks; j++) table[first_range + j] = (start + j) * cluster_size_;
  for (uint64_t j = 0; j < blocks; j++) block_clusters_.insert(start + j);
  AlignedBuffer table_buf(table_clusters * cluster_size_);
  for (uint64_t i = 0; i < table.size(); i++) StoreBE64(table_buf.span(), i * 8, table[i]);
  const uint64_t table_offset = (start + blocks) * cluster_size_;
  used_end_ = std::max(used_end_, (start + total) * cluster_size_);
  CO_RETURN_IF_ERROR(co_await file_->Write(start * cluster_size_, block_buf.span()));
  CO_RETURN_IF_ERROR(co_await file_->Write(table_offset, table_buf.span()));
  CO_RETURN_IF_ERROR(co_await file_->Sync());

  const uint64_t old_offset = header_->refcount_table_offset;
  const uint64_t old_clusters = header_->refcount_table_clusters;
  Header updated = *header_;
  updated.refcount_table_offset = table_offset;
  updated.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  CO_RETURN_IF_ERROR(co_await WriteHeader(*file_, updated));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  *header_ = std::move(updated);
  table_ = std::move(table);
  dirty_table_chunks_.clear();  // the whole table was just written
  for (uint64_t i = 0; i < old_clusters; i++) DeferDecrement(old_offset / cluster_size_ + i);
  co_return Status::Ok();
}

Task<Status> Refcounts::WriteTable() {
  std::set<uint64_t> chunks;
  chunks.swap(dirty_table_chunks_);
  for (uint64_t chunk : chunks) {
    const uint64_t first = chunk * kTableChunkBytes / 8;
    const uint64_t count = std::min<uint64_t>(kTableChunkBytes / 8, table_.size() - first);
    AlignedBuffer buf(count * 8);
    for (uint64_t i = 0; i < count; i++) StoreBE64(buf.span(), i * 8, table_[first + i]);
    Status st = co_await file_->Write(header_->refcount_table_offset + first * 8, buf.span());
    if (!st.ok()) {
      dirty_table_chunks_.insert(chunks.begin(), chunks.end());
      co_return st;
    }
  }
  co_return Status::Ok();
}

Task<Result<uint64_t>> Refcounts::Allocate(uint64_t count) {
  // A fresh range holds its own block in its first cluster, so it has only
  // E-1 free clusters in a row: the scan below, which makes blocks as it
  // goes, would never find a longer run there (it would grow the file
  // forever). Such runs get ranges of their own.
  if (count >= entries_per_block_) co_return co_await AllocateLongRun(count);
  uint64_t cluster = free_hint_;
  uint64_t run_start = 0, run = 0;
  bool hint_settled = false;
  while (run < count) {
    const uint64_t bi = cluster / entries_per_block_;
    CO_RETURN_IF_ERROR(co_await EnsureBlock(bi));
    CO_ASSIGN_OR_RETURN(Location loc, co_await Locate(cluster));
    // Scan the rest of this slice without further lookups.
    for (uint64_t i = loc.index; i < entries_per_slice_ && run < count; i++, cluster++) {
      if (GetRefcount(loc.slice.bytes(), i, order_) == 0 && !Fenced(cluster)) {
        CO_RETURN_IF_ERROR(CheckFree(cluster));
        if (run == 0) run_start = cluster;
        run++;
        if (!hint_settled) {
          free_hint_ = cluster;
          hint_settled = true;
        }
      } else {
        run = 0;
      }
    }
  }
  if (free_hint_ == run_start) free_hint_ = run_start + count;
  CO_RETURN_IF_ERROR(co_await MarkAllocated(run_start, count));
  co_return run_start* cluster_size_;
}

Task<Status> Refcounts::MarkAllocated(uint64_t start, uint64_t count) {
  used_end_ = std::max(used_end_, (start + count) * cluster_size_);
  for (uint64_t c = start; c < start + count; c++) {
    CO_ASSIGN_OR_RETURN(Location loc, co_await Locate(c));
    SetRefcount(loc.slice.bytes(), loc.index, order_, 1);
    cache_.MarkDirty(loc.slice);
  }
  co_return Status::Ok();
}

AlignedBuffer Refcounts::SelfCountingBlocks(uint64_t start, uint64_t blocks, uint64_t total) const {
  const uint64_t E = entries_per_block_;
  AlignedBuffer buf(blocks * cluster_size_);
  for (uint64_t c = start; c < start + total; c++) {
    const uint64_t j = (c - start) / E;  // block describing cluster c
    SetRefcount(buf.span().subspan(j * cluster_size_, cluster_size_), c % E, order_, 1);
  }
  return buf;
}

Task<Result<uint64_t>> Refcounts::AllocateLongRun(uint64_t count) {
  const uint64_t E = entries_per_block_;
  // First the ranges that already have blocks: freed space may hold the run.
  // Ranges without a block break a run (their block would land inside it).
  uint64_t covered_end = 0;  // one past the last range with a block
  for (uint64_t bi = table_.size(); bi > 0; bi--) {
    if ((table_[bi - 1] & kRefcountTableOffsetMask) != 0) {
      covered_end = bi;
      break;
    }
  }
  uint64_t run_start = 0, run = 0;
  for (uint64_t cluster = free_hint_; cluster < covered_end * E && run < count;) {
    const uint64_t bi = cluster / E;
    if ((table_[bi] & kRefcountTableOffsetMask) == 0) {
      run = 0;
      cluster = (bi + 1) * E;
      continue;
    }
    CO_ASSIGN_OR_RETURN(Location loc, co_await Locate(cluster));
    for (uint64_t i = loc.index; i < entries_per_slice_ && run < count; i++, cluster++) {
      if (GetRefcount(loc.slice.bytes(), i, order_) != 0 || Fenced(cluster)) {
        run = 0;
        continue;
      }
      CO_RETURN_IF_ERROR(CheckFree(cluster));
      if (run == 0) run_start = cluster;
      run++;
    }
  }
  if (run == count) {
    CO_RETURN_IF_ERROR(co_await MarkAllocated(run_start, count));
    co_return run_start* cluster_size_;
  }

  // Past everything in use: ranges [first, first + blocks) have no block, so
  // every cluster in them is free. Their blocks go first, then the run; the
  // blocks count themselves and the run (the layout GrowTable uses).
  const uint64_t blocks = (count + E - 2) / (E - 1);  // blocks + count <= blocks * E
  const uint64_t used_clusters = (used_end_ + cluster_size_ - 1) / cluster_size_;
  const uint64_t first = std::max(covered_end, (used_clusters + E - 1) / E);
  // GrowTable puts its own blocks and table past the ranges it must cover
  // (from `first + blocks`), so ours stay free and without blocks.
  if (first + blocks > table_.size()) CO_RETURN_IF_ERROR(co_await GrowTable(first + blocks - 1));
  const uint64_t start = first * E;  // cluster index
  const uint64_t total = blocks + count;
  for (uint64_t c = start; c < start + total; c++) CO_RETURN_IF_ERROR(CheckFree(c));
  AlignedBuffer block_buf = SelfCountingBlocks(start, blocks, total);
  // The blocks reach the disk (synced) before the table entries naming them,
  // which are only marked dirty here: Flush syncs before WriteTable only when
  // cached blocks are dirty, so these writes bypassing the cache sync now.
  CO_RETURN_IF_ERROR(co_await file_->Write(start * cluster_size_, block_buf.span()));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  for (uint64_t j = 0; j < blocks; j++) {
    table_[first + j] = (start + j) * cluster_size_;
    block_clusters_.insert(start + j);
    dirty_table_chunks_.insert((first + j) * 8 / kTableChunkBytes);
  }
  used_end_ = std::max(used_end_, (start + total) * cluster_size_);
  const uint64_t run_offset = (start + blocks) * cluster_size_;
  co_return run_offset;
}

Task<Status> Refcounts::Increment(uint64_t cluster) {
  CO_RETURN_IF_ERROR(co_await EnsureBlock(cluster / entries_per_block_));
  CO_ASSIGN_OR_RETURN(Location loc, co_await Locate(cluster));
  uint64_t rc = GetRefcount(loc.slice.bytes(), loc.index, order_);
  if (rc >= MaxRefcount(order_)) {
    co_return Status::NoSpace(fmt::format("{}: refcount of cluster {} would overflow its {} bits",
                                          file_->path(), cluster, 1u << order_));
  }
  SetRefcount(loc.slice.bytes(), loc.index, order_, rc + 1);
  cache_.MarkDirty(loc.slice);
  co_return Status::Ok();
}

Task<Result<std::vector<uint64_t>>> Refcounts::ApplyDeferredDecrements() {
  std::vector<uint64_t> pending;
  pending.swap(deferred_);
  std::vector<uint64_t> freed;
  for (size_t k = 0; k < pending.size(); k++) {
    const uint64_t cluster = pending[k];
    const uint64_t bi = cluster / entries_per_block_;
    if (bi >= table_.size() || (table_[bi] & kRefcountTableOffsetMask) == 0) {
      deferred_.insert(deferred_.end(), pending.begin() + k, pending.end());
      co_return Corrupt(fmt::format("freeing cluster {}, which has no refcount block", cluster));
    }
    auto loc = co_await Locate(cluster);
    if (!loc.ok()) {
      deferred_.insert(deferred_.end(), pending.begin() + k, pending.end());
      co_return loc.status();
    }
    uint64_t rc = GetRefcount(loc->slice.bytes(), loc->index, order_);
    if (rc == 0)
      co_return Corrupt(fmt::format("freeing cluster {}, whose refcount is already 0", cluster));
    SetRefcount(loc->slice.bytes(), loc->index, order_, rc - 1);
    cache_.MarkDirty(loc->slice);
    if (rc == 1) {
      freed.push_back(cluster);
      // During a shadow commit the cluster is free only once the header
      // switches: no allocation may take it before (see BeginShadow).
      if (shadow_) {
        shadow_->lowest_freed = std::min(shadow_->lowest_freed, cluster);
        shadow_->freed.insert(cluster);
      } else {
        free_hint_ = std::min(free_hint_, cluster);
      }
    }
  }
  co_return freed;
}

}  // namespace uq::qcow2
