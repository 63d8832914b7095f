// The snapshot table's part of a check pass: QEMU's limits on reading the
// table (qcow2_check_read_snapshot_table) and the rewrite that completes
// short extra data (qcow2_check_fix_snapshot_table).
#include <fmt/format.h>

#include <cerrno>
#include <cstdint>
#include <utility>

#include "base/endian.h"
#include "qcow2/check/check_pass.h"
#include "qcow2/check/check_util.h"
#include "qcow2/format.h"

namespace uq::qcow2::check_internal {

Task<Status> CheckPass::ReadSnapshots() {
  const bool repair = (fix_ & kFixErrors) != 0;
  const uint32_t stored_count = h_.nb_snapshots;
  uint32_t count = stored_count;
  if (count > kMaxSnapshotCount && repair) {
    Msg("Discarding {} overhanging snapshots", count - kMaxSnapshotCount);
    count = kMaxSnapshotCount;
  }
  // qcow2_validate_table.
  if (count > kMaxSnapshotCount) {
    res_.check_errors++;
    Msg("ERROR snapshot table too large");
    Msg("You can force-remove all {} overhanging snapshots with qemu-img check -r all",
        count - kMaxSnapshotCount);
    co_return Errno(EFBIG);
  }
  if (uint64_t{INT64_MAX} - uint64_t{count} * kSnapshotEntryFixedBytes < h_.snapshots_offset ||
      (h_.snapshots_offset & (cs() - 1)) != 0) {
    res_.check_errors++;
    Msg("ERROR snapshot table offset invalid");
    co_return Errno(EINVAL);
  }

  Result<SnapshotTableScan> scan =
      co_await ReadSnapshotTableForCheck(file_, h_.snapshots_offset, count);
  if (!scan.ok()) {
    res_.check_errors++;
    Msg("ERROR failed to read the snapshot table: {}", scan.status().message());
    co_return scan.status();
  }
  // Without repair, QEMU fails on the first entry it would have to change.
  if (!repair && !scan->extra_data_cut.empty()) {
    res_.check_errors++;
    Msg("ERROR failed to read the snapshot table: Too much extra metadata in snapshot table "
        "entry {}",
        scan->extra_data_cut.front().first);
    Msg("You can force-remove this extra metadata with qemu-img check -r all");
    co_return Errno(EFBIG);
  }
  if (!repair && scan->dropped > 0) {
    res_.check_errors++;
    Msg("ERROR failed to read the snapshot table: Snapshot table is too big");
    Msg("You can force-remove all {} overhanging snapshots with qemu-img check -r all",
        scan->dropped);
    co_return Errno(EFBIG);
  }
  for (const auto& [index, size] : scan->extra_data_cut) {
    Msg("Discarding too much extra metadata in snapshot table entry {} ({} > {})", index, size,
        kMaxSnapshotExtraData);
  }
  snapshot_corruptions_ += scan->extra_data_cut.size();
  if (scan->dropped > 0) {
    Msg("Discarding {} overhanging snapshots (snapshot table is too big)", scan->dropped);
    count -= scan->dropped;
  }
  if (count != stored_count) {
    // Safe before the refcount check: the dropped entries' clusters leak.
    std::byte field[4];
    StoreBE32(field, 0, count);
    Status s = co_await file_.Write(kOffNbSnapshots, field);
    if (s.ok()) s = co_await file_.Sync();
    if (!s.ok()) {
      res_.check_errors++;
      Msg("ERROR failed to update the snapshot count in the image header: {}", ErrorText(s));
      co_return s;
    }
    h_.nb_snapshots = count;
    snapshot_fixed_ += stored_count - count;
  }
  snapshots_ = std::move(scan->snapshots);
  snapshots_size_ = scan->size_on_disk;
  for (size_t i = 0; i < snapshots_.size(); i++) {
    if (HasIncompleteExtraData(snapshots_.extra_data_size(i), static_cast<int>(h_.version))) {
      snapshot_corruptions_++;
      Msg("{} snapshot table entry {} is incomplete", repair ? "Repairing" : "ERROR", i);
    }
  }
  co_return Status::Ok();
}

Task<Status> CheckPass::FixSnapshotTable() {
  if (snapshot_corruptions_ == 0) co_return Status::Ok();
  if (!(fix_ & kFixErrors)) {
    res_.corruptions += snapshot_corruptions_;
    co_return Status::Ok();
  }
  if (res_.corruptions || res_.leaks || res_.check_errors) {
    res_.corruptions += snapshot_corruptions_;
    res_.check_errors++;
    Msg("ERROR failed to update snapshot table: the refcounts are not consistent");
    co_return Status::Corruption("failed to update snapshot table: inconsistent refcounts");
  }
  Status s = co_await RewriteSnapshotTable();
  if (!s.ok()) {
    res_.corruptions += snapshot_corruptions_;
    res_.check_errors++;
    Msg("ERROR failed to update snapshot table: {}", s.message());
    co_return s;
  }
  res_.corruptions_fixed += snapshot_corruptions_;
  co_return Status::Ok();
}

Task<Status> CheckPass::RewriteSnapshotTable() {
  std::vector<Snapshot> snapshots = snapshots_.ToVector();
  const uint64_t disk_size = h_.size / kSectorSize * kSectorSize;
  for (Snapshot& sn : snapshots) {
    if (!sn.disk_size) sn.disk_size = disk_size;
    if (!sn.icount) sn.icount = -1;
  }
  CO_RETURN_IF_ERROR(ValidateSnapshotTableForWrite(snapshots));
  std::vector<std::byte> bytes = SerializeSnapshotTable(snapshots);
  const uint64_t table_size = bytes.size();  // SnapshotTableSize(snapshots)
  const uint64_t clusters = DivRoundUp(bytes.size(), cs());
  uint64_t first_free = 0;
  CO_ASSIGN_OR_RETURN(uint64_t offset, AllocClusters(clusters, &first_free));
  // The new clusters' refcounts on disk; their refcount blocks must exist.
  for (uint64_t c = offset >> cb(); c < (offset >> cb()) + clusters; c++) {
    CO_RETURN_IF_ERROR(co_await stored_->Set(c, 1));
  }
  CO_RETURN_IF_ERROR(co_await stored_->Flush());
  CO_RETURN_IF_ERROR(co_await file_.Sync());
  bytes.resize(clusters * cs());
  CO_RETURN_IF_ERROR(co_await file_.Write(offset, bytes));
  CO_RETURN_IF_ERROR(co_await file_.Sync());
  std::byte header[12];
  StoreBE32(header, 0, static_cast<uint32_t>(snapshots.size()));
  StoreBE64(header, 4, offset);
  CO_RETURN_IF_ERROR(co_await file_.Write(kOffNbSnapshots, header));
  CO_RETURN_IF_ERROR(co_await file_.Sync());
  // Free the old table.
  if (snapshots_size_ == 0) {
    h_.snapshots_offset = offset;
    snapshots_ = PackedSnapshotTable::FromSerialized(bytes, snapshots.size());
    snapshots_size_ = table_size;
    co_return Status::Ok();
  }
  const uint64_t old_first = h_.snapshots_offset >> cb();
  const uint64_t old_last = (h_.snapshots_offset + snapshots_size_ - 1) >> cb();
  for (uint64_t c = old_first; c <= old_last; c++) {
    CO_ASSIGN_OR_RETURN(uint64_t r, co_await stored_->Get(c));
    if (r > 0) CO_RETURN_IF_ERROR(co_await stored_->Set(c, r - 1));
    if (r == 1) freed_.push_back(c);
    if (c < imrt_->size() && imrt_->Get(c) > 0) imrt_->Set(c, imrt_->Get(c) - 1);
  }
  CO_RETURN_IF_ERROR(co_await stored_->Flush());
  CO_RETURN_IF_ERROR(co_await file_.Sync());
  co_await DiscardFreed();
  h_.snapshots_offset = offset;
  snapshots_ = PackedSnapshotTable::FromSerialized(bytes, snapshots.size());
  snapshots_size_ = table_size;
  co_return Status::Ok();
}

}  // namespace uq::qcow2::check_internal
