// The COPIED flag of every active L1 and L2 entry (QEMU's
// check_oflag_copied): set iff the cluster's stored refcount is exactly 1.
// Runs after the refcounts were compared (and repaired), so it reads the
// stored refcounts.
#include <cstdint>
#include <optional>

#include "base/endian.h"
#include "qcow2/check/check_pass.h"
#include "qcow2/check/check_util.h"
#include "qcow2/format.h"

namespace uq::qcow2::check_internal {

Task<Status> CheckPass::CheckOflagCopied() {
  bool repair;
  if (fix_ & kFixErrors) {
    repair = true;
  } else if (fix_ & kFixLeaks) {
    // Only safe if the refcounts are now known to be right.
    repair = !res_.check_errors && !res_.corruptions && !res_.leaks;
  } else {
    repair = false;
  }
  if (h_.l1_size == 0) co_return Status::Ok();
  // Whole sectors, so that an entry is written back with its sector.
  const uint64_t l1_bytes = RoundUp(uint64_t{h_.l1_size} * 8, kSectorSize);
  AlignedBuffer l1(l1_bytes);
  CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(h_.l1_table_offset, l1.span()));
  AlignedBuffer l2(cs());
  bool wrote = false;
  for (uint32_t i = 0; i < h_.l1_size; i++) {
    const uint64_t l1_entry = LoadBE64(l1.span(), uint64_t{i} * 8);
    const uint64_t l2_offset = l1_entry & kL1OffsetMask;
    if (l2_offset == 0) continue;
    Result<uint64_t> refcount = co_await stored_->Get(l2_offset >> cb());
    if (!refcount.ok()) continue;  // already reported by the compare
    if ((*refcount == 1) != ((l1_entry & kEntryCopied) != 0)) {
      res_.corruptions++;
      Msg("{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}",
          repair ? "Repairing" : "ERROR", i, l1_entry, *refcount);
      if (repair) {
        StoreBE64(l1.span(), uint64_t{i} * 8,
                  *refcount == 1 ? l1_entry | kEntryCopied : l1_entry & ~kEntryCopied);
        const uint64_t sector = (uint64_t{i} * 8) & ~(kSectorSize - 1);
        Status s = co_await file_.Write(h_.l1_table_offset + sector,
                                        l1.span().subspan(sector, kSectorSize));
        if (!s.ok()) {
          res_.check_errors++;
          co_return s;
        }
        wrote = true;
        res_.corruptions--;
        res_.corruptions_fixed++;
      }
    }

    Status s = co_await file_.ReadZeroPadded(l2_offset, l2.span());
    if (!s.ok()) {
      Msg("ERROR: Could not read L2 table: {}", s.message());
      res_.check_errors++;
      co_return s;
    }
    // Only allocated entries are looked at: a zero entry is unallocated,
    // and a table of zeros has none.
    if (AllZero(l2.span())) continue;
    uint64_t l2_dirty = 0;
    for (uint64_t j = 0; j < g_.l2_entries; j++) {
      const uint64_t at = j * g_.l2_entry_bytes;
      const uint64_t l2_entry = LoadBE64(l2.span(), at);
      if (l2_entry == 0) continue;
      const ClusterType type = TypeOf(l2_entry);
      if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) continue;
      uint64_t data_refcount = 1;  // data file clusters always have refcount 1
      if (!has_data_file()) {
        const uint64_t cluster = (l2_entry & kL2OffsetMask) >> cb();
        std::optional<uint64_t> fast = stored_->TryGet(cluster);
        if (fast) {
          data_refcount = *fast;
        } else {
          Result<uint64_t> r = co_await stored_->Get(cluster);
          if (!r.ok()) continue;
          data_refcount = *r;
        }
      }
      if ((data_refcount == 1) != ((l2_entry & kEntryCopied) != 0)) {
        res_.corruptions++;
        Msg("{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
            repair ? "Repairing" : "ERROR", l2_entry, data_refcount);
        if (repair) {
          StoreBE64(l2.span(), at,
                    data_refcount == 1 ? l2_entry | kEntryCopied : l2_entry & ~kEntryCopied);
          l2_dirty++;
        }
      }
    }
    if (l2_dirty > 0) {
      Status w = co_await file_.Write(l2_offset, l2.span());
      if (!w.ok()) {
        Msg("ERROR: Could not write L2 table: {}", w.message());
        res_.check_errors++;
        co_return w;
      }
      wrote = true;
      res_.corruptions -= l2_dirty;
      res_.corruptions_fixed += l2_dirty;
    }
  }
  if (wrote) CO_RETURN_IF_ERROR(co_await file_.Sync());
  co_return Status::Ok();
}

}  // namespace uq::qcow2::check_internal
