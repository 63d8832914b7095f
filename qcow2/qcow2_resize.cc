// Changing a Qcow2Image's virtual size: growing the L1 table, releasing a
// shrunken tail, preallocating a grown one (see Resize in qcow2_image.h for
// the order of the writes and what a crash leaves).
#include <fmt/format.h>

#include <algorithm>

#include "base/endian.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/format.h"
#include "qcow2/qcow2_image.h"

namespace uq::qcow2 {

Task<Status> Qcow2Image::Resize(uint64_t new_size, Preallocation prealloc) {
  CO_RETURN_IF_ERROR(CheckWritable(0, 0));
  if (new_size % kSectorSize != 0) {
    co_return Status::InvalidArgument(
        fmt::format("{}: the new size must be a multiple of {}", path(), kSectorSize));
  }
  if (luks_ && prealloc != Preallocation::kOff) {
    // Preallocated clusters would hold plain zeros that read back as the
    // decryption of zeros.
    co_return Status::NotSupported(
        fmt::format("{}: preallocation is not supported on encrypted images", path()));
  }
  if (header_.version < 3 && !snapshots_.empty()) {
    co_return Status::NotSupported(
        fmt::format("{}: can't resize a v2 image which has snapshots", path()));
  }
  const uint64_t old_size = size();
  if (new_size < old_size && prealloc != Preallocation::kOff) {
    co_return Status::InvalidArgument(
        fmt::format("{}: preallocation can't be used for shrinking an image", path()));
  }
  const uint64_t span = geo_.cluster_size * geo_.l2_entries;
  const uint64_t l1_entries = (new_size + span - 1) / span;
  if (l1_entries * 8 > kMaxL1Bytes) {
    co_return Status::NoSpace(
        fmt::format("{}: Failed to grow the L1 table: File too large ({} entries would pass "
                    "QEMU's limit of {} MiB)",
                    path(), l1_entries, kMaxL1Bytes >> 20));
  }
  // A raw data file must read as the image does: its new area is mapped 1:1.
  if (header_.data_file_raw() && new_size > old_size && prealloc == Preallocation::kOff) {
    prealloc = Preallocation::kMetadata;
  }
  CO_RETURN_IF_ERROR(co_await PrepareBitmapsForResize(new_size));
  CO_RETURN_IF_ERROR(co_await Flush());

  if (new_size < old_size) {
    CO_RETURN_IF_ERROR(co_await ReleaseTail(new_size));
  } else if (l1_entries > l1_.size()) {
    CO_RETURN_IF_ERROR(co_await GrowL1(l1_entries));
  }

  // From here requests may address the new area (preallocation and zeroing go
  // through the write path); on disk the old size holds until the header
  // names the new one, and whatever was done in the new area stays invisible.
  size_.store(new_size, std::memory_order_release);
  auto restore_size = [&](Status st) {
    if (!st.ok()) size_.store(old_size, std::memory_order_release);
    return st;
  };
  if (new_size > old_size) {
    if (prealloc != Preallocation::kOff) {
      CO_RETURN_IF_ERROR(restore_size(co_await PreallocateRange(old_size, new_size, prealloc)));
    }
    // An unallocated cluster reads from the backing file: where that is longer
    // than the old size, its data would appear in the new area.
    // As QEMU does, the last (sub)cluster is zeroed whole: the size is
    // widened to its end meanwhile, so that it gets the zero flag rather than
    // a data cluster written with zeros.
    if (backing_ && backing_->size() > old_size) {
      const uint64_t unit = geo_.subcluster_size;
      const uint64_t zero_end = (new_size + unit - 1) / unit * unit;
      // The (sub)cluster holding the old end gets its tail written with zero
      // bytes, as QEMU writes it (a data cluster, not a zero flag).
      const uint64_t head_end = std::min(new_size, (old_size + unit - 1) / unit * unit);
      Status zeroed = Status::Ok();
      if (head_end > old_size) zeroed = co_await WriteZeroBuffer(old_size, head_end - old_size);
      if (zeroed.ok() && zero_end > head_end) {
        size_.store(zero_end, std::memory_order_release);
        zeroed = co_await WriteZeroes(head_end, zero_end - head_end);
        size_.store(new_size, std::memory_order_release);
      }
      CO_RETURN_IF_ERROR(restore_size(std::move(zeroed)));
    }
  }
  if (data_file_) {
    // The data file follows the image's size, as QEMU truncates it.
    CO_RETURN_IF_ERROR(restore_size(data_file_->Truncate(new_size)));
  }
  CO_RETURN_IF_ERROR(restore_size(co_await Flush()));

  Header updated = header_;
  updated.size = new_size;
  Status st = co_await WriteHeader(*file_, updated);
  if (st.ok()) st = co_await file_->Sync();
  CO_RETURN_IF_ERROR(restore_size(std::move(st)));
  header_ = std::move(updated);
  co_await ResizeBitmaps(new_size);
  if (new_size < old_size) CO_RETURN_IF_ERROR(co_await TruncateAfterLastCluster());
  co_return Status::Ok();
}

Task<Status> Qcow2Image::GrowL1(uint64_t entries) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t clusters = (entries * 8 + cs - 1) / cs;
  const uint64_t old_offset = header_.l1_table_offset;
  const uint64_t old_clusters = (l1_.size() * 8 + cs - 1) / cs;
  auto lock = co_await meta_mutex_.Acquire();
  CO_ASSIGN_OR_RETURN(const uint64_t table, co_await refcounts_->Allocate(clusters));
  for (uint64_t c = 0; c < clusters; c++) metadata_clusters_.insert(table / cs + c);
  file_size_ = std::max(file_size_, table + clusters * cs);
  AlignedBuffer contents(clusters * cs);
  for (uint64_t i = 0; i < l1_.size(); i++) StoreBE64(contents.span(), i * 8, l1_[i]);
  Status written = co_await file_->Write(table, contents.span());
  // The new table and its refcounts become stable (FlushLocked syncs both)
  // before the header names it.
  if (written.ok()) written = co_await FlushLocked();
  if (!written.ok()) {
    for (uint64_t c = 0; c < clusters; c++) ReleaseCluster(table / cs + c);
    co_return written;
  }
  Header updated = header_;
  updated.l1_table_offset = table;
  updated.l1_size = static_cast<uint32_t>(entries);
  CO_RETURN_IF_ERROR(co_await WriteHeader(*file_, updated));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  header_ = std::move(updated);
  l1_.resize(entries, 0);
  l1_dirty_chunks_.clear();  // the whole table was just written
  // The old table is unreferenced on disk now; it is freed at the next flush.
  for (uint64_t c = 0; c < old_clusters && old_offset != 0; c++)
    ReleaseCluster(old_offset / cs + c);
  co_return co_await FlushLocked();
}

Task<Status> Qcow2Image::ReleaseTail(uint64_t new_size) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t span = cs * geo_.l2_entries;
  const uint64_t old_size = size();
  const uint64_t start = (new_size + cs - 1) / cs * cs;
  // Every mapped cluster past the new end, table by table (absent tables map
  // nothing).
  for (uint64_t index = start / span; index < l1_.size() && index * span < old_size; index++) {
    if ((l1_[index] & kL1OffsetMask) == 0) continue;
    const uint64_t from = std::max(start, index * span);
    const uint64_t to = std::min(old_size, (index + 1) * span);
    for (uint64_t pos = from; pos < to; pos += cs) {
      CO_RETURN_IF_ERROR(co_await DiscardCluster(pos, /*unallocate=*/true));
    }
  }
  // The entries reach the disk, then the references they held are dropped.
  CO_RETURN_IF_ERROR(co_await Flush());

  // L2 tables wholly past the new end leave the L1 table (its size stays, as
  // QEMU keeps it), then their clusters are released.
  const uint64_t keep = (new_size + span - 1) / span;
  auto lock = co_await meta_mutex_.Acquire();
  std::vector<uint64_t> dropped;
  for (uint64_t index = keep; index < l1_.size(); index++) {
    if ((l1_[index] & kL1OffsetMask) == 0) continue;
    dropped.push_back((l1_[index] & kL1OffsetMask) / cs);
    l1_[index] = 0;
    l1_dirty_chunks_.insert(index * 8 / 4096);
  }
  if (dropped.empty()) co_return Status::Ok();
  CO_RETURN_IF_ERROR(co_await FlushLocked());  // the L1 entries cleared on disk
  for (uint64_t c : dropped) ReleaseCluster(c);
  co_return co_await FlushLocked();
}

Task<Status> Qcow2Image::PreallocateRange(uint64_t start, uint64_t end, Preallocation prealloc) {
  const uint64_t cs = geo_.cluster_size;
  const bool has_df = data_file_ != nullptr;
  // Clusters below the file's end may hold old bytes; those past it read as
  // zeros until written.
  const uint64_t dirty_below = file_size_;
  uint64_t pos = start / cs * cs;
  if (pos < start) {
    // The cluster holding the old end keeps what its head reads (perhaps from
    // a backing file): if unmapped, it is mapped by writing that head back
    // through the write path, which copies the rest of the cluster in.
    CO_ASSIGN_OR_RETURN(const L2Entry e, co_await LookupEntry(pos));
    if (!e.compressed() && !e.has_host_cluster(has_df)) {
      AlignedBuffer head(start - pos);
      CO_RETURN_IF_ERROR(co_await Read(pos, head.span()));
      CO_RETURN_IF_ERROR(co_await Write(pos, head.span(), false));
    }
    pos += cs;
  }
  const uint64_t zero_below = prealloc == Preallocation::kFull ? ~uint64_t{0} : dirty_below;
  for (; pos < end; pos += cs) {
    CO_ASSIGN_OR_RETURN(const uint64_t host, co_await PreallocateCluster(pos, zero_below));
    if (host == 0) continue;
    // The file covers the cluster before its entry can reach the disk (the
    // next flush syncs the size first): an entry past the end of the file is
    // a corruption. As QEMU's metadata preallocation leaves it, the file ends
    // at the image's last byte, not at its cluster's end.
    const uint64_t covered = host + std::min(cs, end - pos);
    CO_ASSIGN_OR_RETURN(const uint64_t size, file_->Size());
    if (size < covered) CO_RETURN_IF_ERROR(file_->Truncate(covered));
  }
  CO_RETURN_IF_ERROR(co_await Flush());
  if (prealloc == Preallocation::kMetadata) co_return Status::Ok();
  // falloc: the new clusters' space reserved (those in the image file were
  // handed out past `dirty_below`, or zeroed); full: PreallocateCluster wrote
  // the image file's clusters, and a data file's range is written here.
  File& target = data_file_ ? *data_file_ : *file_;
  const uint64_t from = data_file_ ? start : dirty_below;
  const uint64_t to = data_file_ ? end : file_size_;
  if (to <= from) co_return Status::Ok();
  if (prealloc == Preallocation::kFalloc) {
    CO_RETURN_IF_ERROR(co_await target.Allocate(from, to - from));
  } else if (data_file_) {
    CO_RETURN_IF_ERROR(co_await WriteZeroBytes(target, from, to - from));
  }
  co_return co_await target.Sync();
}

Task<Result<uint64_t>> Qcow2Image::PreallocateCluster(uint64_t offset, uint64_t zero_below) {
  auto exclusive = co_await LockToRemap(geo_.guest_cluster(offset));
  const bool has_df = data_file_ != nullptr;
  CO_ASSIGN_OR_RETURN(L2Entry old, co_await LookupEntry(offset));
  if (old.compressed() || old.has_host_cluster(has_df)) co_return uint64_t{0};
  CO_RETURN_IF_ERROR(co_await PrepareL2(offset));
  uint64_t host = offset;  // an external data file maps 1:1
  if (!has_df) {
    CO_ASSIGN_OR_RETURN(host, co_await AllocateWholeCluster());
    if (host < zero_below) {
      Status st = co_await WriteZeroBytes(*file_, host, geo_.cluster_size);
      if (!st.ok()) {
        auto lock = co_await meta_mutex_.Acquire();
        ReleaseCluster(host / geo_.cluster_size);
        co_return st;
      }
    }
  }
  L2Entry entry;
  entry.raw = host | kEntryCopied;
  if (geo_.extended_l2) entry.bitmap = kAllSubclusters;  // every subcluster allocated
  auto lock = co_await meta_mutex_.Acquire();
  CO_RETURN_IF_ERROR(co_await StoreEntry(offset, entry));
  ReleaseEntry(old);  // a zero entry may hold a cluster
  co_return has_df ? uint64_t{0} : host;
}

Task<Status> Qcow2Image::TruncateAfterLastCluster() {
  const uint64_t cs = geo_.cluster_size;
  CO_ASSIGN_OR_RETURN(const uint64_t size, file_->Size());
  uint64_t end = (size + cs - 1) / cs;
  while (end > 1) {
    CO_ASSIGN_OR_RETURN(const uint64_t refcount, co_await refcounts_->Get(end - 1));
    if (refcount != 0) break;
    end--;
  }
  if (end * cs >= size) co_return Status::Ok();
  // Only space is at stake: a failure here leaves a longer file, as QEMU warns.
  (void)file_->Truncate(end * cs);
  file_size_ = std::min(file_size_, end * cs);
  grown_end_ = std::min(grown_end_, end * cs);
  co_return Status::Ok();
}

}  // namespace uq::qcow2
