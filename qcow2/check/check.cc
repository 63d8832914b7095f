// CheckImage and the order of a check pass's steps; see check.h for what is
// checked and check_pass.h for where each step lives.
#include "qcow2/check/check.h"

#include <fmt/format.h>

#include <algorithm>
#include <iterator>
#include <utility>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/check/check_pass.h"
#include "qcow2/check/check_util.h"
#include "qcow2/format.h"

namespace uq::qcow2::check_internal {

Task<Status> CheckPass::Run() {
  CO_RETURN_IF_ERROR(co_await Setup());
  Status s = co_await CheckAll();
  // Snapshots dropped off the table were repaired whatever followed.
  res_.corruptions_fixed += snapshot_fixed_;
  if (!s.ok()) {
    // QEMU: a negative return, "Check failed: <strerror>".
    out_.error = s.message();
  }
  CopyCounters();
  co_return Status::Ok();
}

void CheckPass::CopyCounters() {
  if (suppressed_ > 0) {
    out_.messages.push_back(fmt::format("({} more messages not shown)", suppressed_));
  }
  out_.corruptions = res_.corruptions;
  out_.leaks = res_.leaks;
  out_.check_errors = res_.check_errors;
  out_.corruptions_fixed = res_.corruptions_fixed;
  out_.leaks_fixed = res_.leaks_fixed;
  out_.allocated_clusters = res_.allocated_clusters;
  out_.fragmented_clusters = res_.fragmented_clusters;
  out_.compressed_clusters = res_.compressed_clusters;
}

Task<Status> CheckPass::Setup() {
  CO_ASSIGN_OR_RETURN(file_size_, file_.Size());
  CO_ASSIGN_OR_RETURN(h_, co_await ReadHeaderForCheck());
  CO_RETURN_IF_ERROR(CheckHeaderForIo(h_, file_.path()));
  g_ = Geometry::From(h_);
  const uint64_t nb_clusters = DivRoundUp(file_size_, cs());
  if (nb_clusters > kMaxCheckClusters) {
    co_return Status::InvalidArgument(
        fmt::format("{}: the file has {} clusters; at most {} can be checked", file_.path(),
                    nb_clusters, kMaxCheckClusters));
  }
  imrt_.emplace(cb(), h_.refcount_order, options_.max_memory_bytes);
  Status s = imrt_->Resize(nb_clusters);
  if (!s.ok())
    co_return Status::InvalidArgument(
        fmt::format("{}: too large to check: {}", file_.path(), s.message()));
  stored_.emplace(file_, cb(), h_.refcount_order);
  // bs->total_sectors is the virtual size in whole sectors.
  out_.total_clusters = DivRoundUp(h_.size / kSectorSize * kSectorSize, cs());
  co_return Status::Ok();
}

Task<Result<Header>> CheckPass::ReadHeaderForCheck() {
  AlignedBuffer probe(kHeaderProbeBytes);
  CO_ASSIGN_OR_RETURN(size_t n, co_await file_.Read(0, probe.span()));
  if (n < kHeaderProbeBytes) co_return ParseHeader(probe.span().first(n), file_size_, file_.path());
  uint32_t cluster_bits = LoadBE32(probe.span(), 20);
  if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits) {
    co_return ParseHeader(probe.span(), file_size_, file_.path());
  }
  AlignedBuffer first(std::min<uint64_t>(uint64_t{1} << cluster_bits, file_size_));
  CO_ASSIGN_OR_RETURN(size_t got, co_await file_.Read(0, first.span()));
  std::span<std::byte> bytes = first.span().first(got);
  // The snapshot table is the check's to judge (ReadSnapshots, with QEMU's
  // rules), not the header parser's, which refuses what qemu-img check
  // reports or repairs.
  uint32_t nb_snapshots = 0;
  if (bytes.size() >= kOffNbSnapshots + 4) {
    nb_snapshots = LoadBE32(bytes, kOffNbSnapshots);
    StoreBE32(bytes, kOffNbSnapshots, 0);
  }
  Result<Header> h = ParseHeader(bytes, file_size_, file_.path(), /*allow_encrypted=*/true);
  if (h.ok()) h->nb_snapshots = nb_snapshots;
  co_return h;
}

Task<Status> CheckPass::CheckAll() {
  CO_RETURN_IF_ERROR(co_await ReadSnapshots());
  Status s = co_await CheckRefcounts();
  if (!s.ok()) {
    res_.corruptions += snapshot_corruptions_;
    co_return s;
  }
  CO_RETURN_IF_ERROR(co_await FixSnapshotTable());
  if (fix_ != kNoFix && res_.check_errors == 0 && res_.corruptions == 0) {
    CO_RETURN_IF_ERROR(co_await MarkCleanAndConsistent());
  }
  co_return Status::Ok();
}

Task<Status> CheckPass::CheckRefcounts() {
  CO_RETURN_IF_ERROR(co_await LoadRefcountTable());
  CO_RETURN_IF_ERROR(co_await BuildMetadataMap());
  bool rebuild = false;
  CO_RETURN_IF_ERROR(co_await CalculateRefcounts(fix_, &rebuild));

  // When only fixing, the compare is repeated with fixing on; its first
  // result is thrown away (QEMU's pre_compare_res).
  Counters pre_compare = res_;
  uint64_t highest = 0;
  CO_RETURN_IF_ERROR(co_await CompareRefcounts(kNoFix, &rebuild, &highest));

  if (rebuild && (fix_ & kFixErrors)) {
    Counters old = res_;
    uint64_t fresh_leaks = 0;
    Msg("Rebuilding refcount structure");
    Status s = co_await RebuildRefcountStructure();
    if (!s.ok()) {
      res_.check_errors++;
      co_return s;
    }
    res_.corruptions = 0;
    res_.leaks = 0;
    // The old refcount table has been replaced: count again.
    rebuild = false;
    imrt_->Clear();
    res_.allocated_clusters = res_.fragmented_clusters = res_.compressed_clusters = 0;
    CO_RETURN_IF_ERROR(co_await BuildMetadataMap());
    CO_RETURN_IF_ERROR(co_await CalculateRefcounts(kNoFix, &rebuild));
    if (fix_ & kFixLeaks) {
      // The old refcount structure is now leaked; free it. Leaks that
      // cannot be fixed were made by the rebuild and are reported.
      Counters saved = res_;
      res_ = Counters{};
      CO_RETURN_IF_ERROR(co_await CompareRefcounts(kFixLeaks, &rebuild, &highest));
      if (rebuild) Msg("ERROR rebuilt refcount structure is still broken");
      fresh_leaks = res_.leaks;
      res_ = saved;
    }
    if (res_.corruptions < old.corruptions) {
      res_.corruptions_fixed += old.corruptions - res_.corruptions;
    }
    if (res_.leaks < old.leaks) res_.leaks_fixed += old.leaks - res_.leaks;
    res_.leaks += fresh_leaks;
  } else if (fix_ != kNoFix) {
    if (rebuild) {
      Msg("ERROR need to rebuild refcount structures");
      res_.check_errors++;
      co_return Status::Corruption(
          "the refcount structure must be rebuilt, which only repairing all errors does");
    }
    if (res_.leaks || res_.corruptions) {
      res_ = pre_compare;
      CO_RETURN_IF_ERROR(co_await CompareRefcounts(fix_, &rebuild, &highest));
    }
  }

  CO_RETURN_IF_ERROR(co_await CheckOflagCopied());
  out_.image_end_offset = (highest + 1) * cs();
  co_return Status::Ok();
}

Task<Status> CheckPass::LoadRefcountTable() {
  const uint64_t bytes = uint64_t{h_.refcount_table_clusters} * cs();  // <= 8 MiB (ParseHeader)
  AlignedBuffer buf(bytes);
  Status s = co_await file_.ReadZeroPadded(h_.refcount_table_offset, buf.span());
  if (!s.ok()) {
    res_.check_errors++;
    co_return s;
  }
  std::vector<uint64_t> table(bytes / 8);
  for (size_t i = 0; i < table.size(); i++) table[i] = LoadBE64(buf.span(), i * 8);
  stored_->SetTable(std::move(table));
  co_return Status::Ok();
}

Task<Status> CheckPass::MarkCleanAndConsistent() {
  if (h_.version < 3) co_return Status::Ok();
  const uint64_t bits = kIncompatDirty | kIncompatCorrupt;
  if (!(h_.incompatible_features & bits)) co_return Status::Ok();
  CO_RETURN_IF_ERROR(co_await file_.Sync());
  std::byte field[8];
  StoreBE64(field, 0, h_.incompatible_features & ~bits);
  CO_RETURN_IF_ERROR(co_await file_.Write(kOffIncompatibleFeatures, field));
  CO_RETURN_IF_ERROR(co_await file_.Sync());
  h_.incompatible_features &= ~bits;
  co_return Status::Ok();
}

}  // namespace uq::qcow2::check_internal

namespace uq::qcow2 {

using check_internal::CheckPass;

Task<Result<CheckResult>> CheckImage(File& file, const CheckOptions& options) {
  CheckResult first;
  {
    CheckPass pass(file, options, &first);
    CO_RETURN_IF_ERROR(co_await pass.Run());
  }
  // Like qemu-img: after repairing something, check again and report that,
  // keeping the repair counts.
  if (!first.error.empty() || (first.corruptions_fixed == 0 && first.leaks_fixed == 0)) {
    co_return first;
  }
  CheckOptions again = options;
  again.repair = RepairMode::kNone;
  again.max_messages = options.max_messages > first.messages.size()
                           ? options.max_messages - first.messages.size()
                           : 0;
  CheckResult second;
  {
    CheckPass pass(file, again, &second);
    CO_RETURN_IF_ERROR(co_await pass.Run());
  }
  second.corruptions_fixed = first.corruptions_fixed;
  second.leaks_fixed = first.leaks_fixed;
  first.messages.insert(first.messages.end(), std::make_move_iterator(second.messages.begin()),
                        std::make_move_iterator(second.messages.end()));
  second.messages = std::move(first.messages);
  co_return second;
}

}  // namespace uq::qcow2
