// Comparing the computed refcounts with the stored ones (QEMU's
// compare_refcounts): a stored refcount below the computed one is a
// corruption, above it a leak; with repair the stored value is overwritten
// and clusters that drop to 0 are discarded.
#include <algorithm>
#include <cstdint>

#include "qcow2/check/check_pass.h"
#include "qcow2/check/check_util.h"
#include "qcow2/refcount_codec.h"

namespace uq::qcow2::check_internal {

Task<Status> CheckPass::CompareRefcounts(int fix, bool* rebuild, uint64_t* highest) {
  *highest = 0;
  const uint64_t n = imrt_->size();
  const uint64_t per_block = RefcountEntriesPerBlock(cb(), h_.refcount_order);
  for (uint64_t base = 0; base < n; base += per_block) {
    const uint64_t end = std::min(n, base + per_block);
    Result<std::byte*> block = co_await stored_->BlockFor(base);
    for (uint64_t i = base; i < end; i++) {
      if (!block.ok()) {
        Msg("Can't get refcount for cluster {}: {}", i, ErrorText(block.status()));
        res_.check_errors++;
        continue;
      }
      const uint64_t stored = *block == nullptr
                                  ? 0
                                  : GetRefcount(stored_->BlockSpan(*block),
                                                stored_->IndexInBlock(i), h_.refcount_order);
      const uint64_t computed = imrt_->Get(i);
      if (stored > 0 || computed > 0) *highest = i;
      if (stored == computed) continue;

      uint64_t* num_fixed = nullptr;
      if (stored == 0) {
        *rebuild = true;
      } else if (stored > computed && (fix & kFixLeaks)) {
        num_fixed = &res_.leaks_fixed;
      } else if (stored < computed && (fix & kFixErrors)) {
        num_fixed = &res_.corruptions_fixed;
      }
      Msg("{} cluster {} refcount={} reference={}",
          num_fixed != nullptr ? "Repairing"
          : stored < computed  ? "ERROR"
                               : "Leaked",
          i, stored, computed);
      if (num_fixed != nullptr) {
        SetRefcount(std::span<std::byte>(*block, cs()), stored_->IndexInBlock(i), h_.refcount_order,
                    computed);
        stored_->MarkDirty(*block);
        dirty_ = true;
        if (computed == 0) freed_.push_back(i);
        (*num_fixed)++;
        continue;
      }
      if (stored < computed) {
        res_.corruptions++;
      } else {
        res_.leaks++;
      }
    }
  }
  if (dirty_) {
    Status s = co_await stored_->Flush();
    if (s.ok()) s = co_await file_.Sync();
    dirty_ = false;
    if (!s.ok()) {
      Msg("ERROR writing refcount blocks: {}", s.message());
      res_.check_errors++;
      co_return s;
    }
    co_await DiscardFreed();
  }
  co_return Status::Ok();
}

Task<void> CheckPass::DiscardFreed() {
  std::sort(freed_.begin(), freed_.end());
  for (size_t i = 0; i < freed_.size();) {
    size_t j = i + 1;
    while (j < freed_.size() && freed_[j] == freed_[j - 1] + 1) j++;
    const uint64_t offset = freed_[i] << cb();
    if (offset < file_size_) {
      const uint64_t length = std::min((j - i) << cb(), file_size_ - offset);
      (void)co_await file_.Discard(offset, length);
    }
    i = j;
  }
  freed_.clear();
}

}  // namespace uq::qcow2::check_internal
