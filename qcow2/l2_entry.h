// Decoding L2 entries: what a guest cluster (or subcluster) is backed by.
//
// An L2 entry (plus, with extended L2, its 64-bit subcluster bitmap) says one
// of: unallocated (read the backing file, or zeros), zeros, data at a host
// offset, or compressed data. Decode() turns the raw bits into that answer
// and rejects entries the spec forbids (unaligned offsets, a subcluster both
// allocated and zero, allocation bits without a host cluster), so the read and
// write paths never act on a corrupt entry.
#ifndef UBLK_QCOW2_QCOW2_L2_ENTRY_H_
#define UBLK_QCOW2_QCOW2_L2_ENTRY_H_

#include <cstdint>

#include "qcow2/format.h"
#include "qcow2/geometry.h"

namespace uq::qcow2 {

enum class SubclusterKind : uint8_t {
  kUnallocated,  // read through to the backing file or zeros
  kZero,         // reads as zeros
  kData,         // at host_offset
  kCompressed,   // whole cluster, compressed
  kInvalid,      // the entry contradicts the spec
};

struct L2Entry {
  uint64_t raw = 0;
  uint64_t bitmap = 0;  // extended L2 only

  // The host cluster of a standard cluster (0 if none). Meaningful for data.
  uint64_t host_cluster() const { return raw & kL2OffsetMask; }
  bool compressed() const { return raw & kEntryCompressed; }
  bool copied() const { return raw & kEntryCopied; }

  // Whether the cluster has a host cluster of its own (data or
  // preallocated zeros). With an external data file, offset 0 is valid and
  // bit 63 tells it apart from "unallocated".
  bool has_host_cluster(bool has_data_file) const {
    if (compressed()) return false;
    return host_cluster() != 0 || (has_data_file && copied());
  }

  // What subcluster `sc` (0..31; always 0 without extended L2) is.
  SubclusterKind Kind(const Geometry& g, bool has_data_file, uint32_t sc) const {
    if (compressed()) return SubclusterKind::kCompressed;
    const bool allocated = has_host_cluster(has_data_file);
    if (allocated && !g.cluster_aligned(host_cluster())) return SubclusterKind::kInvalid;
    if (!g.extended_l2) {
      if (raw & kEntryZero) return SubclusterKind::kZero;
      return allocated ? SubclusterKind::kData : SubclusterKind::kUnallocated;
    }
    const bool alloc_bit = (bitmap >> sc) & 1;
    const bool zero_bit = (bitmap >> (32 + sc)) & 1;
    if (alloc_bit && zero_bit) return SubclusterKind::kInvalid;
    if (alloc_bit) return allocated ? SubclusterKind::kData : SubclusterKind::kInvalid;
    if (zero_bit) return SubclusterKind::kZero;
    return SubclusterKind::kUnallocated;
  }

  // Compressed descriptor: host byte offset and the bytes to read.
  uint64_t compressed_offset(const Geometry& g) const {
    return raw & ((uint64_t{1} << g.compressed_offset_bits()) - 1);
  }
  uint64_t compressed_length(const Geometry& g) const {
    uint32_t x = g.compressed_offset_bits();
    uint64_t extra_sectors = (raw >> x) & ((uint64_t{1} << (62 - x)) - 1);
    return (extra_sectors + 1) * kSectorSize - (compressed_offset(g) & (kSectorSize - 1));
  }
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_L2_ENTRY_H_
