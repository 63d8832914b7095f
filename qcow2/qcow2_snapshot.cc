// Internal snapshots of a Qcow2Image: create, delete, apply (see
// CreateSnapshot in qcow2_image.h for the order of the writes and what a
// crash leaves). QEMU's block/qcow2-snapshot.c is the reference for what
// each operation changes; the order is ours: every change that is not a
// leak happens in one header write.
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <unordered_map>

#include "base/endian.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/format.h"
#include "qcow2/qcow2_image.h"

namespace uq::qcow2 {

namespace {

// qemu-img copies the name into QEMUSnapshotInfo's 256-byte buffer.
constexpr size_t kMaxNameBytes = 255;

uint64_t ClustersFor(uint64_t bytes, uint64_t cluster_size) {
  return (bytes + cluster_size - 1) / cluster_size;
}

// Appends the clusters of a table of `bytes` at `offset` (0: none) to `out`.
void AppendClusters(uint64_t offset, uint64_t bytes, uint64_t cluster_size,
                    std::vector<uint64_t>* out) {
  if (offset == 0) return;
  for (uint64_t c = 0; c < ClustersFor(bytes, cluster_size); c++)
    out->push_back(offset / cluster_size + c);
}

}  // namespace

Status Qcow2Image::CheckSnapshotsSupported() const {
  if (data_file_ != nullptr) {
    // QEMU's qcow2_snapshot_create/goto return -ENOTSUP: a data file's
    // clusters have no refcounts, so nothing could keep them for a snapshot.
    return Status::NotSupported(
        fmt::format("{}: internal snapshots are not supported with an external data file", path()));
  }
  return Status::Ok();
}

Task<Result<std::vector<uint64_t>>> Qcow2Image::ReadSnapshotL1(size_t index) {
  const Snapshot& sn = snapshots_.at(index);
  CO_ASSIGN_OR_RETURN(const uint64_t file_size, file_->Size());
  CO_RETURN_IF_ERROR(ValidateSnapshotL1Table(sn, index, geo_.cluster_size, file_size));
  std::vector<uint64_t> l1(sn.l1_size);
  if (l1.empty()) co_return l1;
  const uint64_t bytes = (uint64_t{sn.l1_size} * 8 + kSectorSize - 1) / kSectorSize * kSectorSize;
  AlignedBuffer buf(bytes);
  CO_RETURN_IF_ERROR(co_await file_->ReadZeroPadded(sn.l1_table_offset, buf.span()));
  for (size_t i = 0; i < l1.size(); i++) l1[i] = LoadBE64(buf.span(), i * 8);
  co_return l1;
}

Task<Result<std::vector<uint64_t>>> Qcow2Image::ClustersReached(std::span<const uint64_t> l1) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t slice_bytes = l2_cache_.slice_size();
  std::vector<uint64_t> clusters;
  for (size_t i = 0; i < l1.size(); i++) {
    const uint64_t table = l1[i] & kL1OffsetMask;
    if (table == 0) continue;
    CO_RETURN_IF_ERROR(CheckL2TableOffset(i, table));
    clusters.push_back(table / cs);
    for (uint64_t at = 0; at < cs; at += slice_bytes) {
      CO_ASSIGN_OR_RETURN(MetadataCache::SliceRef slice, co_await l2_cache_.Get(table + at));
      for (uint64_t e = 0; e < slice_bytes; e += geo_.l2_entry_bytes) {
        L2Entry entry;
        entry.raw = LoadBE64(slice.bytes(), e);
        if (!entry.compressed() && entry.host_cluster() != 0 &&
            !geo_.cluster_aligned(entry.host_cluster())) {
          co_return Status::Corruption(
              fmt::format("{}: cluster allocation offset 0x{:x} unaligned (L2 offset: 0x{:x})",
                          path(), entry.host_cluster(), table));
        }
        for (uint64_t c : ReferencedClusters(entry)) clusters.push_back(c);
      }
    }
  }
  co_return clusters;
}

Task<Status> Qcow2Image::CheckIncrements(const std::vector<uint64_t>& clusters) {
  const uint32_t bits = 1u << header_.refcount_order;
  const uint64_t max =
      bits == 64 ? std::numeric_limits<uint64_t>::max() : (uint64_t{1} << bits) - 1;
  // Sorted, each cluster's references are one run (a compressed host
  // cluster may be reached many times): 8 bytes per reference, not a map.
  std::vector<uint64_t> sorted = clusters;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0, j; i < sorted.size(); i = j) {
    for (j = i + 1; j < sorted.size() && sorted[j] == sorted[i]; j++) {
    }
    const uint64_t cluster = sorted[i];
    const uint64_t add = j - i;
    CO_ASSIGN_OR_RETURN(const uint64_t refcount, co_await refcounts_->Get(cluster));
    if (refcount > max - add) {
      // QEMU's update_refcount fails with EINVAL (after changing part of it).
      co_return Status::InvalidArgument(fmt::format(
          "{}: the refcount of cluster {} would pass the maximum of {} (refcount_bits={})", path(),
          cluster, max, bits));
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::IncrementAll(const std::vector<uint64_t>& clusters) {
  CO_RETURN_IF_ERROR(co_await CheckIncrements(clusters));
  for (uint64_t c : clusters) CO_RETURN_IF_ERROR(co_await refcounts_->Increment(c));
  co_return Status::Ok();
}

Task<Status> Qcow2Image::ClearCopiedFlags(std::span<uint64_t> l1) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t slice_bytes = l2_cache_.slice_size();
  for (size_t i = 0; i < l1.size(); i++) {
    const uint64_t table = l1[i] & kL1OffsetMask;
    if (table == 0) continue;
    for (uint64_t at = 0; at < cs; at += slice_bytes) {
      // Dirty slices cannot be evicted: write them back in the flush order
      // when they fill the cache (every state on the way is consistent).
      if (l2_cache_.mostly_dirty() || refcounts_->blocks_mostly_dirty()) {
        CO_RETURN_IF_ERROR(co_await FlushLocked());
      }
      CO_ASSIGN_OR_RETURN(MetadataCache::SliceRef slice, co_await l2_cache_.Get(table + at));
      bool dirty = false;
      for (uint64_t e = 0; e < slice_bytes; e += geo_.l2_entry_bytes) {
        const uint64_t raw = LoadBE64(slice.bytes(), e);
        if (raw & kEntryCopied) {
          StoreBE64(slice.bytes(), e, raw & ~kEntryCopied);
          dirty = true;
        }
      }
      if (dirty) l2_cache_.MarkDirty(slice);
    }
    l1[i] &= ~kEntryCopied;
  }
  co_return Status::Ok();
}

Task<Result<uint64_t>> Qcow2Image::WriteTableClusters(std::span<const std::byte> bytes) {
  const uint64_t cs = geo_.cluster_size;
  if (bytes.empty()) co_return uint64_t{0};
  const uint64_t clusters = ClustersFor(bytes.size(), cs);
  CO_ASSIGN_OR_RETURN(const uint64_t offset, co_await refcounts_->Allocate(clusters));
  for (uint64_t c = 0; c < clusters; c++) metadata_clusters_.insert(offset / cs + c);
  file_size_ = std::max(file_size_, offset + clusters * cs);
  AlignedBuffer buf(clusters * cs);
  std::copy(bytes.begin(), bytes.end(), buf.span().begin());
  Status written = co_await file_->Write(offset, buf.span());
  if (!written.ok()) {
    for (uint64_t c = 0; c < clusters; c++) ReleaseCluster(offset / cs + c);
    co_return written;
  }
  co_return offset;
}

void Qcow2Image::ReleaseRange(uint64_t offset, uint64_t bytes) {
  const uint64_t cs = geo_.cluster_size;
  if (offset == 0 || bytes == 0) return;
  for (uint64_t c = offset / cs; c <= (offset + bytes - 1) / cs; c++) ReleaseCluster(c);
}

Status Qcow2Image::CheckL2TableOffset(size_t index, uint64_t table) const {
  if (!geo_.cluster_aligned(table) || table + geo_.cluster_size > file_size_) {
    return Status::Corruption(fmt::format(
        "{}: L1 entry {} points to an L2 table at 0x{:x}, unaligned or past the end of the file",
        path(), index, table));
  }
  return Status::Ok();
}

Task<Result<AlignedBuffer>> Qcow2Image::ReadL2Table(uint64_t table) {
  const uint64_t slice_bytes = l2_cache_.slice_size();
  AlignedBuffer buf(geo_.cluster_size);
  for (uint64_t at = 0; at < geo_.cluster_size; at += slice_bytes) {
    CO_ASSIGN_OR_RETURN(MetadataCache::SliceRef slice, co_await l2_cache_.Get(table + at));
    std::copy(slice.bytes().begin(), slice.bytes().end(), buf.span().begin() + at);
  }
  co_return buf;
}

uint64_t Qcow2Image::ShadowReach(uint64_t table_bytes) const {
  const uint64_t cs = geo_.cluster_size;
  uint64_t tables = 0;
  for (uint64_t e : l1_) tables += (e & kL1OffsetMask) != 0 ? 1 : 0;
  uint64_t blocks = 0;
  for (uint64_t e : refcounts_->table()) blocks += (e & kRefcountTableOffsetMask) != 0 ? 1 : 0;
  return tables + ClustersFor(l1_.size() * 8, cs) + ClustersFor(table_bytes, cs) +
         header_.refcount_table_clusters + blocks + 16;
}

Task<Status> Qcow2Image::CopyRewrittenL2Tables(
    const std::function<Task<Result<bool>>(uint64_t table, std::span<std::byte> l2)>& rewrite,
    const std::function<Task<Status>(size_t index, uint64_t table, uint64_t copy)>& place,
    std::vector<uint64_t>* made) {
  const uint64_t cs = geo_.cluster_size;
  for (size_t i = 0; i < l1_.size(); i++) {
    const uint64_t t = l1_[i] & kL1OffsetMask;
    if (t == 0) continue;
    CO_RETURN_IF_ERROR(CheckL2TableOffset(i, t));
    CO_ASSIGN_OR_RETURN(AlignedBuffer l2, co_await ReadL2Table(t));
    CO_ASSIGN_OR_RETURN(const bool changed, co_await rewrite(t, l2.span()));
    uint64_t copy = 0;
    if (changed) {
      CO_ASSIGN_OR_RETURN(copy, co_await WriteTableClusters(l2.span()));
      AppendClusters(copy, cs, cs, made);
    }
    CO_RETURN_IF_ERROR(co_await place(i, t, copy));
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::CommitSnapshotChange(std::vector<uint64_t> new_l1,
                                              std::vector<Snapshot> table,
                                              const std::vector<uint64_t>& release,
                                              std::vector<uint64_t>* made) {
  for (uint64_t c : release) ReleaseCluster(c);
  CO_ASSIGN_OR_RETURN(std::vector<uint64_t> freed, co_await refcounts_->ApplyDeferredDecrements());
  std::vector<std::byte> l1_bytes(new_l1.size() * 8);
  for (size_t i = 0; i < new_l1.size(); i++) StoreBE64(l1_bytes, i * 8, new_l1[i]);
  CO_ASSIGN_OR_RETURN(const uint64_t l1_offset, co_await WriteTableClusters(l1_bytes));
  AppendClusters(l1_offset, l1_bytes.size(), geo_.cluster_size, made);
  const std::vector<std::byte> table_bytes = SerializeSnapshotTable(table);
  CO_ASSIGN_OR_RETURN(const uint64_t table_offset, co_await WriteTableClusters(table_bytes));
  AppendClusters(table_offset, table_bytes.size(), geo_.cluster_size, made);
  CO_ASSIGN_OR_RETURN(const uint64_t refcount_table, co_await refcounts_->WriteShadow());
  // Everything the new header names is stable before it does.
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  Header updated = header_;
  updated.l1_table_offset = l1_offset;
  updated.l1_size = static_cast<uint32_t>(new_l1.size());
  updated.nb_snapshots = static_cast<uint32_t>(table.size());
  updated.snapshots_offset = table_offset;
  updated.refcount_table_offset = refcount_table;
  CO_RETURN_IF_ERROR(co_await WriteHeader(*file_, updated));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  const uint64_t old_refcount_table = header_.refcount_table_offset;
  header_ = std::move(updated);
  refcounts_->AdoptShadow(old_refcount_table, header_.refcount_table_clusters);
  file_size_ = std::max(file_size_, refcounts_->used_end());
  l1_ = std::move(new_l1);
  l1_dirty_chunks_.clear();
  snapshots_ = std::move(table);
  for (uint64_t c : freed) metadata_clusters_.erase(c);
  co_await ReturnFreed(std::move(freed));
  co_return Status::Ok();
}

Task<Status> Qcow2Image::RunSnapshotChange(
    uint64_t table_bytes, const std::function<Task<Status>(std::vector<uint64_t>* made)>& change) {
  CO_RETURN_IF_ERROR(co_await FlushLocked());
  const uint64_t end = std::max(file_size_, refcounts_->used_end());
  CO_RETURN_IF_ERROR(co_await refcounts_->BeginShadow(end, ShadowReach(table_bytes)));
  std::vector<uint64_t> made;  // the clusters of the tables written for the change
  Status st = co_await change(&made);
  if (!st.ok()) {
    // Nothing on disk names what was made; in memory it is forgotten too.
    refcounts_->AbandonShadow();
    for (uint64_t c : made) metadata_clusters_.erase(c);
  }
  co_return st;
}

Task<Result<std::string>> Qcow2Image::CreateSnapshot(Snapshot entry) {
  CO_RETURN_IF_ERROR(CheckWritable(0, 0));
  CO_RETURN_IF_ERROR(CheckSnapshotsSupported());
  if (snapshots_.size() >= kMaxSnapshotCount) {
    co_return Status::NoSpace(fmt::format("{}: the image has the most snapshots qcow2 allows ({})",
                                          path(), kMaxSnapshotCount),
                              EFBIG);
  }
  // QEMU's find_new_snapshot_id: one past the largest id read as a number.
  unsigned long id_max = 0;
  for (const Snapshot& s : snapshots_)
    id_max = std::max(id_max, std::strtoul(s.id.c_str(), nullptr, 10));
  entry.id = std::to_string(id_max + 1);
  if (entry.name.size() > kMaxNameBytes) entry.name.resize(kMaxNameBytes);
  entry.disk_size = size();
  std::vector<Snapshot> table = snapshots_;
  table.push_back(entry);
  CO_RETURN_IF_ERROR(ValidateSnapshotTableForWrite(table));

  CO_RETURN_IF_ERROR(co_await Flush());
  auto lock = co_await meta_mutex_.Acquire();
  // Everything the active tables reach is shared from the switch on: writes
  // in place from other threads stop now (the next write copies).
  co_await RevokeShared(SharedMap::After::kPublish);
  // The snapshot keeps the active L1 table where it is, with the L2 tables
  // it names; the active state moves to a new L1 table. An L2 table with
  // COPIED entries is copied for it with the flags cleared (its data is
  // shared now); one without is shared (one more reference). Data clusters
  // get one more reference each. QEMU clears the flags in place, which a
  // crash between its refcount and L2 writes leaves out of step; here
  // nothing the old state uses is written before the header switch.
  table.back().l1_table_offset = header_.l1_table_offset;
  table.back().l1_size = static_cast<uint32_t>(l1_.size());
  std::vector<uint64_t> release;  // the old snapshot table
  AppendClusters(header_.nb_snapshots > 0 ? header_.snapshots_offset : 0,
                 SnapshotTableSize(snapshots_), geo_.cluster_size, &release);
  const uint64_t table_bytes = SerializeSnapshotTable(table).size();
  // Refused before anything is written, as QEMU refuses it: a refcount that
  // would overflow (QEMU adds a reference to every L2 table too), an L2
  // table outside the file, an unaligned entry. The metadata mutex keeps the
  // tables as checked until the change below.
  {
    CO_ASSIGN_OR_RETURN(const std::vector<uint64_t> reached, co_await ClustersReached(l1_));
    CO_RETURN_IF_ERROR(co_await CheckIncrements(reached));
  }
  CO_RETURN_IF_ERROR(
      co_await RunSnapshotChange(table_bytes, [&](std::vector<uint64_t>* made) -> Task<Status> {
        const uint64_t cs = geo_.cluster_size;
        std::vector<uint64_t> new_l1 = l1_;
        std::vector<uint64_t> increments;
        auto rewrite = [&](uint64_t t, std::span<std::byte> l2) -> Task<Result<bool>> {
          bool changed = false;
          for (uint64_t e = 0; e < cs; e += geo_.l2_entry_bytes) {
            L2Entry entry;
            entry.raw = LoadBE64(l2, e);
            for (uint64_t c : ReferencedClusters(entry)) increments.push_back(c);
            if (entry.copied()) {
              StoreBE64(l2, e, entry.raw & ~kEntryCopied);
              changed = true;
            }
          }
          co_return changed;
        };
        auto place = [&](size_t i, uint64_t t, uint64_t copy) -> Task<Status> {
          if (copy == 0) increments.push_back(t / cs);
          new_l1[i] = copy != 0 ? copy | kEntryCopied : t;
          co_return Status::Ok();
        };
        CO_RETURN_IF_ERROR(co_await CopyRewrittenL2Tables(rewrite, place, made));
        // Checked above (CheckIncrements on all of it, the L2 tables too).
        for (uint64_t c : increments) CO_RETURN_IF_ERROR(co_await refcounts_->Increment(c));
        co_return co_await CommitSnapshotChange(std::move(new_l1), std::move(table), release, made);
      }));
  CO_RETURN_IF_ERROR(co_await FlushLocked());
  co_return entry.id;
}

Task<Status> Qcow2Image::DeleteSnapshot(size_t index) {
  CO_RETURN_IF_ERROR(CheckWritable(0, 0));
  CO_RETURN_IF_ERROR(CheckSnapshotsSupported());
  CO_RETURN_IF_ERROR(co_await Flush());
  CO_ASSIGN_OR_RETURN(const std::vector<uint64_t> sn_l1, co_await ReadSnapshotL1(index));
  auto lock = co_await meta_mutex_.Acquire();
  const uint64_t cs = geo_.cluster_size;
  CO_ASSIGN_OR_RETURN(std::vector<uint64_t> release, co_await ClustersReached(sn_l1));
  const Snapshot gone = snapshots_[index];
  AppendClusters(gone.l1_table_offset, uint64_t{gone.l1_size} * 8, cs, &release);
  AppendClusters(header_.snapshots_offset, SnapshotTableSize(snapshots_), cs, &release);
  // The active L1 table moves too (its COPIED flags change in the switch).
  AppendClusters(header_.l1_table_offset, l1_.size() * 8, cs, &release);
  std::vector<Snapshot> table = snapshots_;
  table.erase(table.begin() + static_cast<ptrdiff_t>(index));
  const uint64_t table_bytes = SerializeSnapshotTable(table).size();
  // Clusters whose refcount returns to 1 are the active table's own again:
  // COPIED flags come back in the same header switch that drops the
  // references, so the active L2 tables that change are copied (and the
  // copies are the active table's own).
  CO_RETURN_IF_ERROR(
      co_await RunSnapshotChange(table_bytes, [&](std::vector<uint64_t>* made) -> Task<Status> {
        std::unordered_map<uint64_t, uint64_t> drops;
        for (uint64_t c : release) drops[c]++;
        auto refcount_after = [&](uint64_t cluster) -> Task<Result<uint64_t>> {
          CO_ASSIGN_OR_RETURN(const uint64_t rc, co_await refcounts_->Get(cluster));
          auto it = drops.find(cluster);
          const uint64_t drop = it == drops.end() ? 0 : it->second;
          if (drop > rc) {
            co_return co_await MarkCorrupt(fmt::format(
                "snapshot {} references cluster {} more often than its refcount {} says", gone.id,
                cluster, rc));
          }
          co_return rc - drop;
        };
        std::vector<uint64_t> new_l1 = l1_;
        std::vector<uint64_t> moved_tables;
        auto rewrite = [&](uint64_t, std::span<std::byte> l2) -> Task<Result<bool>> {
          bool changed = false;
          for (uint64_t e = 0; e < cs; e += geo_.l2_entry_bytes) {
            L2Entry entry;
            entry.raw = LoadBE64(l2, e);
            if (entry.compressed() || entry.host_cluster() == 0) continue;
            CO_ASSIGN_OR_RETURN(const uint64_t rc,
                                co_await refcount_after(entry.host_cluster() / cs));
            const uint64_t want = rc == 1 ? entry.raw | kEntryCopied : entry.raw & ~kEntryCopied;
            if (want != entry.raw) {
              StoreBE64(l2, e, want);
              changed = true;
            }
          }
          co_return changed;
        };
        auto place = [&](size_t i, uint64_t t, uint64_t copy) -> Task<Status> {
          if (copy != 0) {
            new_l1[i] = copy | kEntryCopied;
            moved_tables.push_back(t / cs);
            co_return Status::Ok();
          }
          CO_ASSIGN_OR_RETURN(const uint64_t rc, co_await refcount_after(t / cs));
          new_l1[i] = rc == 1 ? t | kEntryCopied : t;
          co_return Status::Ok();
        };
        CO_RETURN_IF_ERROR(co_await CopyRewrittenL2Tables(rewrite, place, made));
        std::vector<uint64_t> all = release;
        all.insert(all.end(), moved_tables.begin(), moved_tables.end());
        co_return co_await CommitSnapshotChange(std::move(new_l1), std::move(table), all, made);
      }));
  co_return co_await FlushLocked();
}

Task<Status> Qcow2Image::ApplySnapshot(size_t index) {
  CO_RETURN_IF_ERROR(CheckWritable(0, 0));
  CO_RETURN_IF_ERROR(CheckSnapshotsSupported());
  if (ActiveBitmapsExtension(header_) != nullptr) {
    co_return Status::NotSupported(fmt::format("{}: Device has active dirty bitmaps", path()));
  }
  const Snapshot sn = snapshots_.at(index);
  const uint64_t new_size = sn.disk_size.value_or(size());
  const uint64_t span = geo_.cluster_size * geo_.l2_entries;
  CO_RETURN_IF_ERROR(co_await Flush());
  CO_ASSIGN_OR_RETURN(std::vector<uint64_t> new_l1, co_await ReadSnapshotL1(index));
  // As QEMU: the active table is at least as large as it was and as the
  // snapshot's, and covers the snapshot's size.
  const uint64_t entries =
      std::max({uint64_t{l1_.size()}, uint64_t{new_l1.size()}, (new_size + span - 1) / span});
  if (entries * 8 > kMaxL1Bytes) {
    co_return Status::NoSpace(
        fmt::format("{}: snapshot {} needs an L1 table of {} entries, past QEMU's limit", path(),
                    sn.id, entries));
  }
  new_l1.resize(entries, 0);
  auto lock = co_await meta_mutex_.Acquire();
  CO_ASSIGN_OR_RETURN(const std::vector<uint64_t> reached, co_await ClustersReached(new_l1));
  CO_ASSIGN_OR_RETURN(const std::vector<uint64_t> old_reached, co_await ClustersReached(l1_));
  CO_RETURN_IF_ERROR(co_await IncrementAll(reached));
  // Everything the new active table reaches is shared with the snapshot: no
  // COPIED flags, in its L1 entries or in its L2 tables (written before the
  // header names them).
  CO_RETURN_IF_ERROR(co_await ClearCopiedFlags(new_l1));
  std::vector<std::byte> l1_bytes(new_l1.size() * 8);
  for (size_t i = 0; i < new_l1.size(); i++) StoreBE64(l1_bytes, i * 8, new_l1[i]);
  CO_ASSIGN_OR_RETURN(const uint64_t l1_offset, co_await WriteTableClusters(l1_bytes));
  Status st = co_await FlushLocked();
  Header updated = header_;
  updated.l1_table_offset = l1_offset;
  updated.l1_size = static_cast<uint32_t>(entries);
  updated.size = new_size;
  if (st.ok()) st = co_await WriteHeader(*file_, updated);
  if (st.ok()) st = co_await file_->Sync();
  if (!st.ok()) {
    ReleaseRange(l1_offset, l1_bytes.size());
    co_return st;
  }
  co_await RevokeShared(SharedMap::After::kPublish);
  const uint64_t old_offset = header_.l1_table_offset;
  const uint64_t old_bytes = uint64_t{l1_.size()} * 8;
  header_ = std::move(updated);
  l1_ = std::move(new_l1);
  l1_dirty_chunks_.clear();
  size_.store(new_size, std::memory_order_release);
  // The old active tables are unreferenced on disk now.
  for (uint64_t c : old_reached) ReleaseCluster(c);
  ReleaseRange(old_offset, old_bytes);
  co_return co_await FlushLocked();
}

}  // namespace uq::qcow2
