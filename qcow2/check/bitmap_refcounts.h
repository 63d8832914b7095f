// The bitmap directory as the check reads it: QEMU 7.2's bitmap_list_load
// and check_dir_entry, reduced to what counting references needs (where each
// bitmap's table lies and how big it is). CheckPass::CheckBitmaps
// (bitmap_refcounts.cc) counts the directory, the tables and the clusters
// they name. Internal to qcow2/check.
#ifndef UBLK_QCOW2_QCOW2_CHECK_BITMAP_REFCOUNTS_H_
#define UBLK_QCOW2_QCOW2_CHECK_BITMAP_REFCOUNTS_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/status.h"

namespace uq::qcow2::check_internal {

// A bitmap's table, from the bitmap directory.
struct BitmapTableRef {
  uint64_t offset;
  uint32_t size;  // entries
};

// The tables of the `nb_bitmaps` bitmaps in directory `dir`, in directory
// order. Corruption, with QEMU's wording, if the directory is broken, holds
// more or fewer entries than `nb_bitmaps`, or an entry breaks QEMU's
// constraints (given the image's `cluster_size` and `disk_bytes`, its
// virtual size in whole sectors).
Result<std::vector<BitmapTableRef>> ParseBitmapDirectory(std::span<const std::byte> dir,
                                                         uint32_t nb_bitmaps, uint64_t cluster_size,
                                                         uint64_t disk_bytes);

}  // namespace uq::qcow2::check_internal

#endif  // UBLK_QCOW2_QCOW2_CHECK_BITMAP_REFCOUNTS_H_
