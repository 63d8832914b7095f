// MetadataMap, and how a check pass fills it from the image and uses it for
// the "Overlap:" messages.
#include "qcow2/check/metadata_map.h"

#include <fmt/format.h>

#include <algorithm>
#include <iterator>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/check/check_pass.h"
#include "qcow2/format.h"

namespace uq::qcow2::check_internal {

void MetadataMap::Finish() {
  std::sort(snapshot_l1_.begin(), snapshot_l1_.end(),
            [](const Range& a, const Range& b) { return a.first < b.first; });
  std::sort(l2_.begin(), l2_.end());
  std::sort(refblocks_.begin(), refblocks_.end());
}

const std::string* MetadataMap::Find(uint64_t cluster) const {
  for (const Range& r : fixed_) {
    if (cluster >= r.first && cluster < r.end) return &r.label;
  }
  auto after = std::upper_bound(snapshot_l1_.begin(), snapshot_l1_.end(), cluster,
                                [](uint64_t c, const Range& r) { return c < r.first; });
  if (after != snapshot_l1_.begin() && cluster < std::prev(after)->end) {
    return &std::prev(after)->label;
  }
  if (std::binary_search(l2_.begin(), l2_.end(), cluster)) return &kL2Label;
  if (std::binary_search(refblocks_.begin(), refblocks_.end(), cluster)) return &kRefblockLabel;
  return nullptr;
}

Task<Status> CheckPass::BuildMetadataMap() {
  map_ = MetadataMap{};
  map_.AddFixed(0, 1, "the image header");
  auto clusters_of = [this](uint64_t offset, uint64_t bytes) {
    if (bytes == 0) return uint64_t{0};
    return ((offset + bytes - 1) >> cb()) - (offset >> cb()) + 1;
  };
  map_.AddFixed(h_.l1_table_offset >> cb(), clusters_of(h_.l1_table_offset, h_.l1_size * 8ull),
                "the active L1 table");
  map_.AddFixed(h_.refcount_table_offset >> cb(),
                clusters_of(h_.refcount_table_offset, stored_->table().size() * 8),
                "the refcount table");
  if (!snapshots_.empty()) {
    map_.AddFixed(h_.snapshots_offset >> cb(), clusters_of(h_.snapshots_offset, snapshots_size_),
                  "the snapshot table");
  }
  for (size_t i = 0; i < snapshots_.size(); i++) {
    // The map keeps no empty range: its label is made only for a range kept
    // (a table of 65536 snapshots of zeros made 65536 labels per pass).
    const uint64_t l1_offset = snapshots_.l1_table_offset(i);
    const uint64_t clusters = clusters_of(l1_offset, snapshots_.l1_size(i) * 8ull);
    if (clusters == 0) continue;
    map_.AddSnapshotL1(l1_offset >> cb(), clusters,
                       fmt::format("the L1 table of snapshot {}", snapshots_.id(i)));
  }
  if (h_.crypto) {
    map_.AddFixed(h_.crypto->offset >> cb(), clusters_of(h_.crypto->offset, h_.crypto->length),
                  "the encryption header");
  }
  if (h_.bitmaps && (h_.autoclear_features & kAutoclearBitmaps)) {
    map_.AddFixed(h_.bitmaps->directory_offset >> cb(),
                  clusters_of(h_.bitmaps->directory_offset, h_.bitmaps->directory_size),
                  "the bitmap directory");
  }
  for (uint64_t e : stored_->table()) {
    if ((e & kRefcountTableOffsetMask) != 0)
      map_.AddRefblock((e & kRefcountTableOffsetMask) >> cb());
  }
  if (h_.l1_size > 0) {
    AlignedBuffer l1(uint64_t{h_.l1_size} * 8);
    CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(h_.l1_table_offset, l1.span()));
    for (uint32_t i = 0; i < h_.l1_size; i++) {
      const uint64_t off = LoadBE64(l1.span(), uint64_t{i} * 8) & kL1OffsetMask;
      if (off != 0) map_.AddL2(off >> cb());
    }
  }
  map_.Finish();
  co_return Status::Ok();
}

void CheckPass::NoteOverlap(uint64_t cluster, int64_t l1_index, uint64_t l2_index,
                            const char* what) {
  const std::string* label = map_.Find(cluster);
  if (label == nullptr) return;
  if (l1_index >= 0) {
    const uint64_t guest = ((static_cast<uint64_t>(l1_index) << g_.l2_bits) + l2_index) << cb();
    Msg("Overlap: guest cluster at offset {:#x} ({}) is host cluster {}, which holds {}", guest,
        what, cluster, *label);
  } else {
    Msg("Overlap: a snapshot's {} cluster (L2 index {}) is host cluster {}, which holds {}", what,
        l2_index, cluster, *label);
  }
}

}  // namespace uq::qcow2::check_internal
