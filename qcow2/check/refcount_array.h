// RefcountArray: the refcounts the check computes, held in memory while it
// walks the image's metadata (QEMU's in-memory refcount table, "imrt").
//
// One entry per host cluster of the image file, in the image's own refcount
// width, stored as whole refcount blocks: block i is exactly the refcount
// block that describes clusters [i * entries_per_block, ...), so that a
// rebuild can write the array's blocks to the file as they are.
//
// Memory: BytesFor(size()), bounded by the max_bytes given to the
// constructor (CheckOptions::max_memory_bytes). Not thread-safe; one check
// pass owns it.
#ifndef UBLK_QCOW2_QCOW2_CHECK_REFCOUNT_ARRAY_H_
#define UBLK_QCOW2_QCOW2_CHECK_REFCOUNT_ARRAY_H_

#include <fmt/format.h>

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/status.h"
#include "qcow2/check/check_util.h"
#include "qcow2/refcount_codec.h"

namespace uq::qcow2::check_internal {

class RefcountArray {
 public:
  // `order`: log2 of the refcount width in bits (the header's refcount_order).
  RefcountArray(uint32_t cluster_bits, uint32_t order, uint64_t max_bytes)
      : cluster_bits_(cluster_bits),
        order_(order),
        entries_per_block_(RefcountEntriesPerBlock(cluster_bits, order)),
        max_bytes_(max_bytes) {}

  uint64_t size() const { return entries_; }
  // The largest refcount an entry can hold.
  uint64_t max() const { return MaxRefcount(order_); }

  // Bytes needed for `entries` entries.
  uint64_t BytesFor(uint64_t entries) const {
    return DivRoundUp(entries, entries_per_block_) << cluster_bits_;
  }

  // Grows (never shrinks) to `entries`, new entries zero. NoSpace, with the
  // array unchanged, if that would pass the memory limit or QEMU's cluster
  // limit (kMaxCheckClusters).
  Status Resize(uint64_t entries) {
    if (entries <= entries_) return Status::Ok();
    uint64_t bytes = BytesFor(entries);
    if (entries > kMaxCheckClusters + entries_per_block_ || bytes > max_bytes_) {
      return Status::NoSpace(
          fmt::format("the in-memory refcount table for {} clusters would need {} bytes (limit {})",
                      entries, bytes, max_bytes_));
    }
    if (bytes > bytes_.size()) bytes_.resize(bytes);
    entries_ = entries;
    return Status::Ok();
  }

  // Sets every entry to 0, keeping the size.
  void Clear() { std::fill(bytes_.begin(), bytes_.end(), std::byte{0}); }

  // REQUIRES: i < size().
  uint64_t Get(uint64_t i) const {
    assert(i < entries_);
    return GetRefcount(bytes_, i, order_);
  }
  // REQUIRES: i < size(), v <= max().
  void Set(uint64_t i, uint64_t v) {
    assert(i < entries_);
    SetRefcount(bytes_, i, order_, v);
  }

  // Refcount block `index`, cluster-sized. REQUIRES: it lies inside the array.
  std::span<const std::byte> Block(uint64_t index) const {
    return std::span<const std::byte>(bytes_).subspan(index << cluster_bits_,
                                                      uint64_t{1} << cluster_bits_);
  }

 private:
  const uint32_t cluster_bits_;
  const uint32_t order_;
  const uint64_t entries_per_block_;
  const uint64_t max_bytes_;
  uint64_t entries_ = 0;
  std::vector<std::byte> bytes_;  // a whole number of clusters
};

}  // namespace uq::qcow2::check_internal

#endif  // UBLK_QCOW2_QCOW2_CHECK_REFCOUNT_ARRAY_H_
