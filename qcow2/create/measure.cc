#include "qcow2/create/measure.h"

#include <fmt/format.h>

#include <bit>
#include <string>
#include <vector>

#include "qcow2/create/option_list.h"
#include "qcow2/format.h"

namespace uq::qcow2 {
namespace {

uint64_t DivRoundUp(uint64_t n, uint64_t d) { return n / d + (n % d != 0); }
uint64_t RoundUp(uint64_t n, uint64_t d) { return DivRoundUp(n, d) * d; }

enum class Type { kString, kSize, kNumber, kBool };

struct KnownOption {
  std::string_view key;
  Type type;
};

// The options qemu-img accepts for a raw output: the raw format's and the
// file protocol's.
constexpr KnownOption kRawOptions[] = {
    {"size", Type::kSize},
    {"preallocation", Type::kString},
    {"nocow", Type::kBool},
    {"extent_size_hint", Type::kSize},
};

// qcow2's own create options (QEMU 7.2's qcow2_create_opts), then the file
// protocol's.
constexpr KnownOption kQcow2Options[] = {
    {"size", Type::kSize},
    {"compat", Type::kString},
    {"backing_file", Type::kString},
    {"backing_fmt", Type::kString},
    {"encryption", Type::kBool},
    {"encrypt.format", Type::kString},
    {"encrypt.key-secret", Type::kString},
    {"encrypt.cipher-alg", Type::kString},
    {"encrypt.cipher-mode", Type::kString},
    {"encrypt.ivgen-alg", Type::kString},
    {"encrypt.ivgen-hash-alg", Type::kString},
    {"encrypt.hash-alg", Type::kString},
    {"encrypt.iter-time", Type::kNumber},
    {"cluster_size", Type::kSize},
    {"data_file", Type::kString},
    {"data_file_raw", Type::kBool},
    {"preallocation", Type::kString},
    {"lazy_refcounts", Type::kBool},
    {"refcount_bits", Type::kNumber},
    {"compression_type", Type::kString},
    {"extended_l2", Type::kBool},
    {"nocow", Type::kBool},
    {"extent_size_hint", Type::kSize},
};

// QEMU's option parser: every key known, every value of its type. Returns
// the items, in order, for the caller to read the last of each key.
Result<std::vector<OptionItem>> ParseTyped(std::string_view list,
                                           std::span<const KnownOption> known) {
  ASSIGN_OR_RETURN(std::vector<OptionItem> items, SplitOptionList(list));
  for (const OptionItem& item : items) {
    const KnownOption* found = nullptr;
    for (const KnownOption& k : known) {
      if (k.key == item.key) found = &k;
    }
    if (found == nullptr) {
      return Status::InvalidArgument(fmt::format("Invalid parameter '{}'", item.key));
    }
    Status typed = Status::Ok();
    switch (found->type) {
      case Type::kString:
        break;
      case Type::kSize:
        typed = ParseOptionSize(item.key, item.value).status();
        break;
      case Type::kNumber:
        typed = ParseOptionNumber(item.key, item.value).status();
        break;
      case Type::kBool:
        typed = ParseOptionBool(item.key, item.value).status();
        break;
    }
    RETURN_IF_ERROR(typed);
  }
  return items;
}

// The last value given for `key`, if any.
const std::string* Last(const std::vector<OptionItem>& items, std::string_view key) {
  const std::string* value = nullptr;
  for (const OptionItem& item : items) {
    if (item.key == key) value = &item.value;
  }
  return value;
}

}  // namespace

Result<Qcow2MeasureOptions> ParseQcow2MeasureOptions(std::string_view list) {
  ASSIGN_OR_RETURN(std::vector<OptionItem> items, ParseTyped(list, kQcow2Options));
  Qcow2MeasureOptions o;
  if (const std::string* v = Last(items, "extended_l2")) {
    ASSIGN_OR_RETURN(o.geometry.extended_l2, ParseOptionBool("extended_l2", *v));
  }
  uint64_t cluster_size = o.geometry.cluster_size;
  if (const std::string* v = Last(items, "cluster_size")) {
    ASSIGN_OR_RETURN(cluster_size, ParseOptionSize("cluster_size", *v));
  }
  if (cluster_size < (uint64_t{1} << kMinClusterBits) ||
      cluster_size > (uint64_t{1} << kMaxClusterBits) || !std::has_single_bit(cluster_size)) {
    return Status::InvalidArgument("Cluster size must be a power of two between 512 and 2048k");
  }
  const uint64_t min_extended = (uint64_t{1} << kMinClusterBits) * kSubclustersPerCluster;
  if (o.geometry.extended_l2 && cluster_size < min_extended) {
    return Status::InvalidArgument(
        fmt::format("Extended L2 entries are only supported with cluster sizes of at least {} "
                    "bytes",
                    min_extended));
  }
  o.geometry.cluster_size = static_cast<uint32_t>(cluster_size);
  if (const std::string* v = Last(items, "compat")) {
    if (*v == "0.10") {
      o.version = 2;
    } else if (*v == "1.1") {
      o.version = 3;
    } else {
      return Status::InvalidArgument(fmt::format("Invalid compatibility level: '{}'", *v));
    }
  }
  uint64_t refcount_bits = 16;
  if (const std::string* v = Last(items, "refcount_bits")) {
    ASSIGN_OR_RETURN(refcount_bits, ParseOptionNumber("refcount_bits", *v));
  }
  if (refcount_bits > 64 || !std::has_single_bit(refcount_bits)) {
    return Status::InvalidArgument(
        "Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (o.version < 3 && refcount_bits != 16) {
    return Status::InvalidArgument(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
        "compat=1.1 or greater)");
  }
  o.geometry.refcount_bits = static_cast<uint32_t>(refcount_bits);
  if (const std::string* v = Last(items, "preallocation")) {
    if (*v == "falloc" || *v == "full") {
      o.full_preallocation = true;
    } else if (*v != "off" && *v != "metadata") {
      return Status::InvalidArgument(fmt::format("invalid parameter value: {}", *v));
    }
  }
  o.backing_file = Last(items, "backing_file") != nullptr;
  if (const std::string* v = Last(items, "encrypt.format"); v != nullptr && *v == "luks") {
    // QEMU adds the LUKS header's size, which needs its key derivation.
    return Status::NotSupported("encrypted images (encrypt.format=luks) are not supported");
  }
  return o;
}

Status CheckRawMeasureOptions(std::string_view list) {
  return ParseTyped(list, kRawOptions).status();
}

uint64_t RefcountMetadataBytes(uint64_t clusters, const MeasureGeometry& g) {
  const uint64_t blocks_per_table_cluster = g.cluster_size / 8;
  const uint64_t refcounts_per_block = uint64_t{g.cluster_size} * 8 / g.refcount_bits;
  // Blocks and table clusters count themselves too: iterate until adding
  // them needs no more of either (the counts only grow, so this ends).
  uint64_t table = 0, blocks = 0, n = 0, last;
  do {
    last = n;
    blocks = DivRoundUp(clusters + table + blocks, refcounts_per_block);
    table = DivRoundUp(blocks, blocks_per_table_cluster);
    n = clusters + blocks + table;
  } while (n != last);
  return (blocks + table) * g.cluster_size;
}

uint64_t FullyAllocatedBytes(uint64_t virtual_size, const MeasureGeometry& g) {
  const uint64_t cs = g.cluster_size;
  const uint64_t l2_entry_bytes = g.extended_l2 ? 16 : 8;
  const uint64_t data = RoundUp(virtual_size, cs);
  uint64_t meta = cs;  // the header cluster
  // Whole L2 tables for every data cluster.
  const uint64_t l2_entries = RoundUp(data / cs, cs / l2_entry_bytes);
  meta += l2_entries * l2_entry_bytes;
  // One L1 entry per L2 table, in whole clusters.
  const uint64_t l1_entries = RoundUp(l2_entries * l2_entry_bytes / cs, cs / 8);
  meta += l1_entries * 8;
  meta += RefcountMetadataBytes((meta + data) / cs, g);
  return meta + data;
}

uint64_t BitmapsBytes(uint64_t virtual_size, std::span<const BitmapToMeasure> bitmaps,
                      uint32_t cluster_size) {
  uint64_t total = 0, directory = 0;
  for (const BitmapToMeasure& b : bitmaps) {
    const uint64_t bits = DivRoundUp(virtual_size, b.granularity);
    const uint64_t clusters = DivRoundUp(DivRoundUp(bits, 8), cluster_size);
    total += clusters * cluster_size;              // the data, all of it allocated
    total += RoundUp(clusters * 8, cluster_size);  // its bitmap table
    directory += RoundUp(24 + b.name_size, 8);     // its directory entry
  }
  return total + RoundUp(directory, cluster_size);
}

uint64_t DataClusterCount::AddData(uint64_t offset, uint64_t length) {
  // QEMU counts from the start of the cluster `offset` lies in to the end of
  // the cluster the run ends in, and goes on from there.
  const uint64_t end = RoundUp(offset + length, cluster_size_);
  bytes_ += end - (offset - offset % cluster_size_);
  return end;
}

Result<Measurement> MeasureQcow2Size(uint64_t size, const Qcow2MeasureOptions& o) {
  const MeasureGeometry& g = o.geometry;
  const uint64_t virtual_size = RoundUp(size, g.cluster_size);
  const uint64_t l2_tables =
      DivRoundUp(virtual_size / g.cluster_size, g.cluster_size / (g.extended_l2 ? 16 : 8));
  if (l2_tables * 8 > kMaxL1Bytes) {
    return Status::InvalidArgument("The image size is too large (try using a larger cluster size)");
  }
  Measurement m;
  m.fully_allocated = FullyAllocatedBytes(virtual_size, g);
  m.required = o.full_preallocation ? m.fully_allocated : m.fully_allocated - virtual_size;
  return m;
}

Measurement MeasureQcow2Image(uint64_t virtual_size, uint64_t data_bytes,
                              const Qcow2MeasureOptions& o,
                              std::optional<std::span<const BitmapToMeasure>> bitmaps) {
  const MeasureGeometry& g = o.geometry;
  const uint64_t aligned = RoundUp(virtual_size, g.cluster_size);
  // Without knowing what a new backing file shares with the source, every
  // cluster may need writing.
  const uint64_t required = o.backing_file || o.full_preallocation ? aligned : data_bytes;
  Measurement m;
  m.fully_allocated = FullyAllocatedBytes(aligned, g);
  m.required = m.fully_allocated - aligned + required;
  if (o.version >= 3 && bitmaps) {
    m.bitmaps = BitmapsBytes(virtual_size, *bitmaps, g.cluster_size);
  }
  return m;
}

Measurement MeasureRawSize(uint64_t size) {
  Measurement m;
  m.required = m.fully_allocated = RoundUp(size, kSectorSize);
  return m;
}

Measurement MeasureRawImage(uint64_t virtual_size) {
  Measurement m;
  m.required = m.fully_allocated = virtual_size;
  return m;
}

}  // namespace uq::qcow2
