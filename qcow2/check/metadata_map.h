// MetadataMap: where the image's metadata lives, so that the check can name
// the structure a data cluster overlaps ("Overlap: ... which holds the
// active L1 table"). The overlap itself is counted by the refcount
// comparison; the map only explains it.
//
// Lookups are logarithmic except in the handful of fixed structures. When
// corrupt metadata itself overlaps, one of the candidates is named.
// CheckPass::BuildMetadataMap (metadata_map.cc) fills it from the image.
// Not thread-safe.
#ifndef UBLK_QCOW2_QCOW2_CHECK_METADATA_MAP_H_
#define UBLK_QCOW2_QCOW2_CHECK_METADATA_MAP_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace uq::qcow2::check_internal {

class MetadataMap {
 public:
  // A structure at clusters [first_cluster, first_cluster + clusters).
  void AddFixed(uint64_t first_cluster, uint64_t clusters, std::string label) {
    if (clusters > 0) fixed_.push_back({first_cluster, first_cluster + clusters, std::move(label)});
  }
  void AddSnapshotL1(uint64_t first_cluster, uint64_t clusters, std::string label) {
    if (clusters > 0) {
      snapshot_l1_.push_back({first_cluster, first_cluster + clusters, std::move(label)});
    }
  }
  void AddL2(uint64_t cluster) { l2_.push_back(cluster); }
  void AddRefblock(uint64_t cluster) { refblocks_.push_back(cluster); }
  // Call once everything is added, before Find.
  void Finish();
  // The metadata at `cluster`, or nullptr. The label lives as long as the map.
  const std::string* Find(uint64_t cluster) const;

 private:
  struct Range {
    uint64_t first;
    uint64_t end;
    std::string label;
  };
  static inline const std::string kL2Label = "an active L2 table";
  static inline const std::string kRefblockLabel = "a refcount block";
  std::vector<Range> fixed_;
  std::vector<Range> snapshot_l1_;
  std::vector<uint64_t> l2_;
  std::vector<uint64_t> refblocks_;
};

}  // namespace uq::qcow2::check_internal

#endif  // UBLK_QCOW2_QCOW2_CHECK_METADATA_MAP_H_
