// How big a new image would be: the arithmetic of `qemu-img measure`
// (QEMU 7.2's qcow2_measure, qcow2_calc_prealloc_size, raw_measure and
// qcow2_get_persistent_dirty_bitmap_size), as pure functions.
//
// qemu-img measure prints two sizes for the file a `create` or `convert`
// would write:
//
//   fully allocated  every guest cluster allocated: the header cluster, the L2
//                    tables (whole tables), the L1 table (whole clusters), the
//                    refcount table and blocks that count all of these and
//                    themselves, and the data (the virtual size rounded up to
//                    a cluster);
//   required         the same metadata, but only the data clusters that hold
//                    data in the source (each output cluster a data byte of
//                    the source falls into counts whole; zeros and unallocated
//                    ranges count nothing). With a backing file for the new
//                    image (-o backing_file) or preallocation=falloc/full,
//                    every data cluster counts.
//
// plus, for a qcow2 v3 source measured for a qcow2 v3 output, the space its
// persistent dirty bitmaps would take (data clusters, bitmap tables and the
// bitmap directory, each rounded up to whole clusters of the output).
//
// For raw output both sizes are the virtual size (of the image, or --size
// rounded up to 512 bytes).
//
// The options a measure takes are those of `create` (see option_list.h), but
// judged as qemu-img measure judges them: only cluster_size, extended_l2,
// compat, refcount_bits, preallocation, backing_file and encrypt.format
// matter; every other known key only has to be well typed (so
// compat=0.10,lazy_refcounts=on measures fine, while create refuses it).
#ifndef UBLK_QCOW2_QCOW2_CREATE_MEASURE_H_
#define UBLK_QCOW2_QCOW2_CREATE_MEASURE_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "base/status.h"

namespace uq::qcow2 {

// What the sizes of a qcow2 image depend on.
struct MeasureGeometry {
  uint32_t cluster_size = 65536;  // a power of two, 512 to 2 MiB
  uint32_t refcount_bits = 16;    // a power of two, 1 to 64
  bool extended_l2 = false;       // 16-byte L2 entries instead of 8
};

// The -o options of `measure -O qcow2`, judged.
struct Qcow2MeasureOptions {
  MeasureGeometry geometry;
  int version = 3;                  // compat=0.10: 2
  bool full_preallocation = false;  // preallocation=falloc or full
  bool backing_file = false;        // backing_file given (any name)
};

// Parses `measure -O qcow2 -o LIST` as qemu-img measure does. Errors
// (InvalidArgument, QEMU's words): an unknown key ("Invalid parameter
// 'foo'"), a badly typed value (see option_list.h), then in this order: "Cluster
// size must be a power of two between 512 and 2048k", "Extended L2 entries
// are only supported with cluster sizes of at least 16384 bytes", "Invalid
// compatibility level: 'x'" (only "0.10" and "1.1" are), "Refcount width
// must be a power of two and may not exceed 64 bits", "Different refcount
// widths than 16 bits require compatibility level 1.1 or above (use
// compat=1.1 or greater)", "invalid parameter value: x" (preallocation:
// off, metadata, falloc, full). encrypt.format=luks is NotSupported.
// Later occurrences of a key win.
Result<Qcow2MeasureOptions> ParseQcow2MeasureOptions(std::string_view list);

// Checks `measure -O raw -o LIST`: raw takes only size, preallocation, nocow
// and extent_size_hint, and judges none of them beyond their types.
Status CheckRawMeasureOptions(std::string_view list);

// Bytes of refcount table and refcount blocks needed to count `clusters`
// clusters plus themselves: the fixed point QEMU's
// qcow2_refcount_metadata_size finds (without its "generous" growth).
uint64_t RefcountMetadataBytes(uint64_t clusters, const MeasureGeometry& g);

// The fully allocated size of an image of `virtual_size` bytes (QEMU's
// qcow2_calc_prealloc_size).
uint64_t FullyAllocatedBytes(uint64_t virtual_size, const MeasureGeometry& g);

// A persistent dirty bitmap of the source, as far as its size goes.
struct BitmapToMeasure {
  uint64_t name_size = 0;    // bytes
  uint64_t granularity = 0;  // bytes per bit, a power of two
};

// Space the bitmaps of a source of `virtual_size` bytes take in an image with
// `cluster_size` clusters: for each, its data (assumed all allocated) and its
// bitmap table, in whole clusters; plus the directory, in whole clusters.
uint64_t BitmapsBytes(uint64_t virtual_size, std::span<const BitmapToMeasure> bitmaps,
                      uint32_t cluster_size);

// Counts the output clusters that source data falls into, as qemu-img
// measure's walk over the source's block status does.
class DataClusterCount {
 public:
  explicit DataClusterCount(uint32_t cluster_size) : cluster_size_(cluster_size) {}
  // A run of data at [offset, offset + length): counts every output cluster
  // it touches, and returns where the walk goes on (the end of the last
  // cluster touched; the rest of that cluster is counted already).
  uint64_t AddData(uint64_t offset, uint64_t length);
  // Bytes of the clusters counted.
  uint64_t bytes() const { return bytes_; }

 private:
  uint64_t cluster_size_;
  uint64_t bytes_ = 0;
};

struct Measurement {
  uint64_t required = 0;
  uint64_t fully_allocated = 0;
  std::optional<uint64_t> bitmaps;  // printed only when set
};

// `measure -O qcow2 --size N`. Errors: InvalidArgument "The image size is too
// large (try using a larger cluster size)" when the L1 table would exceed
// QEMU's 32 MiB.
Result<Measurement> MeasureQcow2Size(uint64_t size, const Qcow2MeasureOptions& o);

// `measure -O qcow2 IMAGE`: `virtual_size` is the source's, `data_bytes`
// what DataClusterCount counted over it (with the output's cluster size),
// `bitmaps` the source's bitmaps when it can carry any (a qcow2 v3 image;
// the line is printed for an output of version 3 only). The virtual size is
// not checked against the L1 limit (qemu-img does not either).
Measurement MeasureQcow2Image(uint64_t virtual_size, uint64_t data_bytes,
                              const Qcow2MeasureOptions& o,
                              std::optional<std::span<const BitmapToMeasure>> bitmaps);

// `measure -O raw`: --size rounded up to 512 bytes, or the image's virtual size.
Measurement MeasureRawSize(uint64_t size);
Measurement MeasureRawImage(uint64_t virtual_size);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_CREATE_MEASURE_H_
