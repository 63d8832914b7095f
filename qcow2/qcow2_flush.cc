// Making a Qcow2Image's writes durable, in the order that keeps the image
// consistent after a crash at any point (see qcow2_image.h and refcounts.h),
// plus opening for writing and marking an image corrupt.
#include <fmt/format.h>

#include <algorithm>

#include "base/endian.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/format.h"
#include "qcow2/qcow2_image.h"

namespace uq::qcow2 {

Task<Status> Qcow2Image::OpenForWriting() {
  if (header_.dirty()) {
    // OpenImage rebuilds the refcounts of a dirty image before we get here.
    co_return Status::Corruption(
        fmt::format("{}: image is dirty (refcounts may be stale)", path()));
  }
  refcounts_ = std::make_unique<Refcounts>(file_.get(), &header_,
                                           std::max<uint64_t>(header_.cluster_size(), 1 << 20));
  CO_RETURN_IF_ERROR(co_await refcounts_->Load());
  refcounts_->set_in_use([this](uint64_t c) { return metadata_clusters_.count(c) != 0; });

  // What the data path must never overwrite.
  const uint64_t cs = geo_.cluster_size;
  auto add_range = [&](uint64_t offset, uint64_t bytes) {
    for (uint64_t c = offset / cs; bytes > 0 && c <= (offset + bytes - 1) / cs; c++)
      metadata_clusters_.insert(c);
  };
  add_range(0, 1);
  add_range(header_.l1_table_offset, uint64_t{header_.l1_size} * 8);
  if (header_.crypto) add_range(header_.crypto->offset, header_.crypto->length);  // LUKS area
  for (uint64_t e : l1_) {
    if (e & kL1OffsetMask) metadata_clusters_.insert((e & kL1OffsetMask) / cs);
  }
  if (header_.nb_snapshots > 0) {
    add_range(header_.snapshots_offset, SnapshotTableSize(snapshots_));
    for (const Snapshot& s : snapshots_) add_range(s.l1_table_offset, uint64_t{s.l1_size} * 8);
  }

  // Bitmaps are ours to maintain (qcow2_bitmaps.cc): their autoclear bit
  // stays. Other autoclear features we do not know: clear them, so that
  // readers know the data they guard may be stale.
  CO_RETURN_IF_ERROR(co_await OpenBitmapsForWriting());
  const uint64_t keep = header_.autoclear_features &
                        (kAutoclearDataFileRaw | (header_.bitmaps ? kAutoclearBitmaps : 0));
  if (header_.autoclear_features != keep) {
    Header updated = header_;
    updated.autoclear_features = keep;
    CO_RETURN_IF_ERROR(co_await WriteHeader(*file_, updated));
    CO_RETURN_IF_ERROR(co_await file_->Sync());
    header_ = std::move(updated);
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::MarkCorrupt(std::string why) {
  co_return co_await MarkCorrupt(Status::Corruption(fmt::format("{}: {}", path(), why)));
}

Task<Status> Qcow2Image::MarkCorrupt(Status cause) {
  Status error =
      Status::Corruption(cause.message() + "; the image is marked corrupt and now read-only");
  if (!writable_) co_return error;
  writable_ = false;
  corrupted_ = true;
  co_await RevokeShared(SharedMap::After::kStop);  // no more writes from other threads either
  Header updated = header_;
  updated.incompatible_features |= kIncompatCorrupt;
  Status st = co_await WriteHeader(*file_, updated);
  if (st.ok()) st = co_await file_->Sync();
  if (st.ok()) header_ = std::move(updated);
  co_return error;
}

Qcow2Image::L1Writes Qcow2Image::TakeL1Writes() {
  L1Writes out;
  out.chunks.swap(l1_dirty_chunks_);
  for (uint64_t chunk : out.chunks) {
    const uint64_t first = chunk * 512;  // 4 KiB of entries
    const uint64_t count = std::min<uint64_t>(512, l1_.size() - first);
    AlignedBuffer buf(count * 8);
    for (uint64_t i = 0; i < count; i++) StoreBE64(buf.span(), i * 8, l1_[first + i]);
    out.writes.emplace_back(header_.l1_table_offset + first * 8, std::move(buf));
  }
  return out;
}

Task<Status> Qcow2Image::WriteL1Chunks(L1Writes& l1) {
  for (auto& [offset, buf] : l1.writes) {
    Status st = co_await file_->Write(offset, buf.span());
    if (!st.ok()) {
      l1_dirty_chunks_.insert(l1.chunks.begin(), l1.chunks.end());
      co_return st;
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::WriteL1() {
  L1Writes l1 = TakeL1Writes();
  co_return co_await WriteL1Chunks(l1);
}

Task<Status> Qcow2Image::Flush() {
  if (corrupted_) co_return co_await FlushMarkedCorrupt();
  if (!writable_) co_return Status::Ok();
  auto lock = co_await meta_mutex_.Acquire();
  co_return co_await FlushLocked();
}

bool Qcow2Image::MetadataDirty() const {
  return refcounts_->blocks_dirty() || refcounts_->table_dirty() || l2_cache_.dirty_slices() > 0 ||
         !l1_dirty_chunks_.empty();
}

Task<Status> Qcow2Image::StabilizeMetadata() {
  if (!stable_metadata_ || !writable_) co_return Status::Ok();
  // No round running (it would hold round_mutex_, a flush meta_mutex_) and
  // nothing dirty: whatever this request changed is in the file already.
  if (!round_mutex_.locked() && !meta_mutex_.locked() && !MetadataDirty()) co_return Status::Ok();
  // Our changes are in the caches now; a round that starts from here on
  // covers them.
  const uint64_t ticket = ++stabilize_requests_;
  auto round = co_await round_mutex_.Acquire();
  if (stabilized_ >= ticket) co_return Status::Ok();  // a round started after us did it
  RoundWrites writes;
  uint64_t covers;
  {
    auto lock = co_await meta_mutex_.Acquire();
    covers = stabilize_requests_;
    CO_ASSIGN_OR_RETURN(writes, co_await StabilizeLocked());
    // The writes go out after the mutex is released: allocations and new
    // entries carry on meanwhile (they reach the next round).
    round_io_ = true;
  }
  Status st = co_await WriteRound(writes);
  // The clusters whose entries this round wrote may be published writable
  // from now on; on failure they wait for the next round.
  if (!st.ok()) unstable_clusters_.merge(writing_clusters_);
  writing_clusters_.clear();
  round_io_ = false;
  round_io_done_.NotifyAll();
  CO_RETURN_IF_ERROR(st);
  stabilized_ = std::max(stabilized_, covers);
  co_return Status::Ok();
}

Task<void> Qcow2Image::WaitRoundWrites() {
  while (round_io_) co_await round_io_done_.Wait();
}

Task<Result<Qcow2Image::RoundWrites>> Qcow2Image::StabilizeLocked() {
  RoundWrites writes;
  // Every cluster an L2 or L1 entry in the caches names has a stable
  // refcount: it came from the reserve, or was referenced before. New L2
  // tables were synced before their L1 entries were set (PrepareL2). So the
  // entries may reach the file, and the disk, in any order, without a sync:
  // a power loss finds every entry pointing at a counted cluster (its data
  // may be old, as for any write not yet flushed). Decrements stay deferred
  // to the next flush, which syncs the entries that dropped them first.
  //
  // Refcounts dirty in memory (a compressed cluster's extra reference, an
  // allocation outside the reserve) break that premise: flush in full.
  // So does a long list of deferred decrements, which would hold on to
  // freed clusters until the guest flushes.
  if (refcounts_->blocks_dirty() || refcounts_->table_dirty() ||
      refcounts_->deferred_count() > ReserveBatch()) {
    CO_RETURN_IF_ERROR(co_await FlushLocked());
    co_return std::move(writes);
  }
  // Copy-on-write data shown by a new entry (a backing file's bytes around a
  // small write, say) is not the guest's to lose: it must be on disk before
  // the entry is, or a power cut would show what the host cluster held
  // before. Every such data write completed before its entry was stored,
  // so a sync started by WriteRound covers it.
  writes.sync_first = entries_need_data_sync_;
  entries_need_data_sync_ = false;
  // Copies of the dirty slices (in runs) and L1 chunks, taken now: the
  // requests whose ticket this round covers made their changes before.
  writes.l2 = l2_cache_.TakeBatch();
  writes.l1 = TakeL1Writes();
  // Their clusters stay read-only for other threads until these copies are
  // in the file; entries stored meanwhile start a new set.
  writing_clusters_.swap(unstable_clusters_);
  co_return std::move(writes);
}

Task<Status> Qcow2Image::WriteRound(RoundWrites& writes) {
  Status st = Status::Ok();
  if (writes.sync_first) {
    st = co_await file_->Sync();
    if (st.ok() && data_file_) st = co_await data_file_->Sync();
    if (!st.ok()) {
      entries_need_data_sync_ = true;
      l2_cache_.Redirty(writes.l2.dirty);
    }
  }
  // One write per run of dirty slices (concurrent), shared by every request
  // whose ticket this round covers. A failed batch redirties its slices.
  if (st.ok()) st = co_await l2_cache_.WriteBatch(writes.l2);
  // The L1 chunks go out last (WriteL1Chunks requeues them if they fail);
  // after an earlier failure they wait for the next round or flush.
  if (st.ok()) co_return co_await WriteL1Chunks(writes.l1);
  l1_dirty_chunks_.insert(writes.l1.chunks.begin(), writes.l1.chunks.end());
  co_return st;
}

Task<Status> Qcow2Image::FlushLocked() {
  // A round's entry writes still in flight: they must land before anything
  // here (a later copy of the same slice, a sync meant to cover them, a
  // decrement whose dropping entry they carry).
  co_await WaitRoundWrites();
  auto sync_all = [this]() -> Task<Status> {
    CO_RETURN_IF_ERROR(co_await file_->Sync());
    if (data_file_) CO_RETURN_IF_ERROR(co_await data_file_->Sync());
    co_return Status::Ok();
  };
  // 1. Refcount increases and new refcount blocks, then the table naming them.
  if (refcounts_->blocks_dirty()) {
    CO_RETURN_IF_ERROR(co_await refcounts_->WriteBlocks());
    if (refcounts_->table_dirty()) CO_RETURN_IF_ERROR(co_await file_->Sync());
  }
  if (refcounts_->table_dirty()) CO_RETURN_IF_ERROR(co_await refcounts_->WriteTable());
  // 2. Guest data, new L2 tables and all of the above become stable.
  CO_RETURN_IF_ERROR(co_await sync_all());
  entries_need_data_sync_ = false;
  // 3. L2 entries, now that what they point at is stable.
  if (l2_cache_.dirty_slices() > 0) {
    CO_RETURN_IF_ERROR(co_await l2_cache_.WriteDirty());
    CO_RETURN_IF_ERROR(co_await file_->Sync());
  }
  // 4. L1 entries naming new L2 tables.
  if (!l1_dirty_chunks_.empty()) {
    CO_RETURN_IF_ERROR(co_await WriteL1());
    CO_RETURN_IF_ERROR(co_await file_->Sync());
  }
  unstable_clusters_.clear();  // every cached entry is in the file
  // 5. References dropped by entries now gone from disk.
  if (refcounts_->has_deferred()) {
    CO_ASSIGN_OR_RETURN(std::vector<uint64_t> freed,
                        co_await refcounts_->ApplyDeferredDecrements());
    // Free from now on: before the next suspension, at which an allocation
    // may pick one and must not take it for metadata (Refcounts::set_in_use).
    for (uint64_t c : freed) metadata_clusters_.erase(c);
    CO_RETURN_IF_ERROR(co_await refcounts_->WriteBlocks());
    co_await ReturnFreed(std::move(freed));
    CO_RETURN_IF_ERROR(co_await file_->Sync());
  }
  co_return Status::Ok();
}

Task<void> Qcow2Image::ReturnFreed(std::vector<uint64_t> freed) {
  const uint64_t cs = geo_.cluster_size;
  for (uint64_t c : freed) l2_cache_.Invalidate(c * cs, cs);
  // Give the space back to the host, a run of adjacent clusters at a time
  // (dropping a snapshot frees thousands); a failure only costs space.
  std::sort(freed.begin(), freed.end());
  for (size_t i = 0, j; i < freed.size(); i = j) {
    for (j = i + 1; j < freed.size() && freed[j] == freed[j - 1] + 1; j++) {
    }
    (void)co_await file_->Discard(freed[i] * cs, (j - i) * cs);
  }
}

Task<Status> Qcow2Image::Close() {
  if (closed_) co_return Status::Ok();
  // Nothing may be written from another thread after the last flush.
  co_await RevokeShared(SharedMap::After::kStop);
  // Reserved clusters nothing uses go back to refcount 0 in this flush: a
  // clean image leaks nothing.
  if (writable_) ReleaseReserve(/*for_good=*/true);
  Status st = co_await Flush();
  // The bitmaps, with the bits of every write, back on disk and no longer
  // in use (a corrupt image, read-only now, leaves them in use).
  if (st.ok() && writable_ && BitmapsNeedStore()) st = co_await StoreBitmaps();
  closed_ = true;
  if (st.ok() && writable_ && grown_end_ > file_size_) {
    // Give back what was grown ahead and not used: everything referenced
    // lies below the size at open or below what refcounts handed out.
    const uint64_t used = std::max(file_size_, refcounts_->used_end());
    if (used < grown_end_) st = file_->Truncate(used);
  }
  // Reserved clusters released above may have grown the file: cut it after
  // the last cluster in use.
  if (st.ok() && writable_ && reserve_extended_) st = co_await TruncateAfterLastCluster();
  co_return st;
}

}  // namespace uq::qcow2
