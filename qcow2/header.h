// The qcow2 header and its extensions: parsing, validation, serialisation.
//
// ParseHeader() is a pure function of the first cluster's bytes and the file
// size: it checks every field the engine will later trust (offsets aligned
// and inside the file, table sizes within QEMU's limits, feature bits known)
// before anything is allocated from them. Errors name the file and the field.
// Unknown header extensions and unknown additional header fields are kept
// verbatim so that rewriting the header preserves them.
#ifndef UBLK_QCOW2_QCOW2_HEADER_H_
#define UBLK_QCOW2_QCOW2_HEADER_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"

namespace uq::qcow2 {

struct FeatureName {
  uint8_t type = 0;  // kFeatureIncompatible / kFeatureCompatible / kFeatureAutoclear
  uint8_t bit = 0;
  std::string name;
};

// The feature name table QEMU writes into a version 3 header: empty for
// clusters of 4 KiB and less, where QEMU leaves it out to keep room for a
// backing file name. Used by create and by amend's upgrade.
std::vector<FeatureName> QemuFeatureNames(uint64_t cluster_size);

struct BitmapsExtension {
  uint32_t nb_bitmaps = 0;
  uint64_t directory_size = 0;
  uint64_t directory_offset = 0;
};

struct CryptoExtension {
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct RawExtension {
  uint32_t type = 0;
  std::vector<std::byte> data;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  // Version 3 fields (version 2 reads them as 0, 4 and 72).
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 72;
  uint8_t compression_type = 0;
  // Bytes [112, header_length) of a v3 header: fields we do not know, kept.
  std::vector<std::byte> unknown_fields;

  // Extensions.
  std::optional<std::string> backing_format;
  std::vector<FeatureName> feature_names;
  std::optional<BitmapsExtension> bitmaps;
  std::optional<CryptoExtension> crypto;
  std::optional<std::string> data_file;
  std::vector<RawExtension> unknown_extensions;  // in file order

  std::string backing_file;  // empty: none

  // Derived helpers.
  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  bool dirty() const { return incompatible_features & 1; }
  bool corrupt() const { return incompatible_features & 2; }
  bool has_data_file() const { return incompatible_features & 4; }
  bool extended_l2() const { return incompatible_features & 16; }
  bool data_file_raw() const { return autoclear_features & 2; }
  bool lazy_refcounts() const { return compatible_features & 1; }
  // The name of feature `bit` of `type` from the feature name table, or "".
  std::string FeatureNameFor(uint8_t type, int bit) const;
};

// Bytes needed to start parsing: enough for cluster_bits and header_length.
inline constexpr size_t kHeaderProbeBytes = 104;

// Parses and validates a header. `first_cluster` holds the file's first
// min(cluster size, file size) bytes (at least kHeaderProbeBytes when the file
// is that long); `file_size` bounds every offset; `path` names the file in
// errors. An encrypted image is NotSupported unless `allow_encrypted` (check
// reads an encrypted image's metadata without a key, as QEMU does).
Result<Header> ParseHeader(std::span<const std::byte> first_cluster, uint64_t file_size,
                           const std::string& path, bool allow_encrypted = false);

// What QEMU checks only when it opens an image for I/O (qemu-img info, which
// opens without I/O, accepts it): the data_file_raw bit without an external
// data file. OpenImage and check call it after ParseHeader.
Status CheckHeaderForIo(const Header& header, const std::string& path);

// Reads the header from `file` (two reads: the probe, then the first cluster)
// and parses it.
Task<Result<Header>> ReadHeader(File& file);

// The header and its extensions laid out as the first bytes of the file
// (header, extensions, end marker, backing file name). Fails if it does not
// fit in one cluster.
Result<std::vector<std::byte>> SerializeHeader(const Header& header);

// Serialises `header` and writes it at offset 0 (no sync: callers order it).
Task<Status> WriteHeader(File& file, const Header& header);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_HEADER_H_
