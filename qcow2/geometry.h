// Geometry: the numbers derived from a header that every mapping computation
// uses — cluster and subcluster sizes, L2 entries per table, and where a
// guest offset's L1 and L2 entries are. Pure arithmetic, no I/O.
#ifndef UBLK_QCOW2_QCOW2_GEOMETRY_H_
#define UBLK_QCOW2_QCOW2_GEOMETRY_H_

#include <cstdint>

#include "qcow2/format.h"
#include "qcow2/header.h"

namespace uq::qcow2 {

struct Geometry {
  uint32_t cluster_bits = 16;
  uint64_t cluster_size = 65536;
  bool extended_l2 = false;
  uint32_t l2_entry_bytes = 8;  // 16 with extended L2
  uint32_t l2_bits = 13;        // log2(entries per L2 table)
  uint64_t l2_entries = 8192;
  uint64_t subcluster_size = 65536;  // cluster_size / 32 with extended L2
  uint32_t refcount_order = 4;
  uint64_t virtual_size = 0;

  static Geometry From(const Header& h) {
    Geometry g;
    g.cluster_bits = h.cluster_bits;
    g.cluster_size = uint64_t{1} << h.cluster_bits;
    g.extended_l2 = h.extended_l2();
    g.l2_entry_bytes = g.extended_l2 ? 16 : 8;
    g.l2_bits = h.cluster_bits - (g.extended_l2 ? 4 : 3);
    g.l2_entries = uint64_t{1} << g.l2_bits;
    g.subcluster_size = g.extended_l2 ? g.cluster_size / kSubclustersPerCluster : g.cluster_size;
    g.refcount_order = h.refcount_order;
    g.virtual_size = h.size;
    return g;
  }

  uint64_t cluster_offset_in(uint64_t offset) const { return offset & (cluster_size - 1); }
  uint64_t guest_cluster(uint64_t offset) const { return offset >> cluster_bits; }
  uint64_t l1_index(uint64_t offset) const { return offset >> (cluster_bits + l2_bits); }
  uint64_t l2_index(uint64_t offset) const { return guest_cluster(offset) & (l2_entries - 1); }
  bool cluster_aligned(uint64_t host_offset) const { return cluster_offset_in(host_offset) == 0; }

  // Compressed cluster descriptor fields.
  uint32_t compressed_offset_bits() const { return 62 - (cluster_bits - 8); }
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_GEOMETRY_H_
