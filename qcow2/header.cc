#include "qcow2/header.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/format.h"

namespace uq::qcow2 {
namespace {

// Field offsets in the header.
enum : size_t {
  kOffMagic = 0,
  kOffVersion = 4,
  kOffBackingFileOffset = 8,
  kOffBackingFileSize = 16,
  kOffClusterBits = 20,
  kOffSize = 24,
  kOffCryptMethod = 32,
  kOffL1Size = 36,
  kOffL1TableOffset = 40,
  kOffRefcountTableOffset = 48,
  kOffRefcountTableClusters = 56,
  kOffNbSnapshots = 60,
  kOffSnapshotsOffset = 64,
  kOffIncompatible = 72,
  kOffCompatible = 80,
  kOffAutoclear = 88,
  kOffRefcountOrder = 96,
  kOffHeaderLength = 100,
  kOffCompressionType = 104,
};

uint64_t RoundUp8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

std::string TrimName(std::span<const std::byte> bytes) {
  std::string s(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  size_t nul = s.find('\0');
  if (nul != std::string::npos) s.resize(nul);
  return s;
}

class HeaderParser {
 public:
  HeaderParser(std::span<const std::byte> bytes, uint64_t file_size, const std::string& path,
               bool allow_encrypted)
      : b_(bytes), file_size_(file_size), path_(path), allow_encrypted_(allow_encrypted) {}

  Result<Header> Parse() {
    RETURN_IF_ERROR(ParseFixedFields());
    RETURN_IF_ERROR(ParseExtensions());
    RETURN_IF_ERROR(ParseBackingFileName());
    RETURN_IF_ERROR(CheckFeatures());
    RETURN_IF_ERROR(CheckTables());
    return std::move(h_);
  }

 private:
  template <class... Args>
  Status Corrupt(fmt::format_string<Args...> f, Args&&... args) {
    return Status::Corruption(
        fmt::format("{}: {}", path_, fmt::format(f, std::forward<Args>(args)...)));
  }
  template <class... Args>
  Status Unsupported(fmt::format_string<Args...> f, Args&&... args) {
    return Status::NotSupported(
        fmt::format("{}: {}", path_, fmt::format(f, std::forward<Args>(args)...)));
  }

  Status ParseFixedFields() {
    if (b_.size() < 8 || LoadBE32(b_, kOffMagic) != kMagic) {
      if (b_.size() >= 4 && LoadBE32(b_, kOffMagic) == kMagic) {
        return Corrupt("file is too short for a qcow2 header ({} bytes)", file_size_);
      }
      return Status::InvalidArgument(fmt::format("{}: not a qcow2 image (bad magic)", path_));
    }
    h_.version = LoadBE32(b_, kOffVersion);
    if (h_.version != 2 && h_.version != 3) {
      return Unsupported("unsupported qcow2 version {} (2 and 3 are supported)", h_.version);
    }
    size_t fixed = h_.version == 2 ? kV2HeaderLength : kV3MinHeaderLength;
    if (b_.size() < fixed) {
      return Corrupt("file is too short for a qcow2 version {} header ({} bytes, need {})",
                     h_.version, b_.size(), fixed);
    }
    h_.backing_file_offset = LoadBE64(b_, kOffBackingFileOffset);
    h_.backing_file_size = LoadBE32(b_, kOffBackingFileSize);
    h_.cluster_bits = LoadBE32(b_, kOffClusterBits);
    h_.size = LoadBE64(b_, kOffSize);
    h_.crypt_method = LoadBE32(b_, kOffCryptMethod);
    h_.l1_size = LoadBE32(b_, kOffL1Size);
    h_.l1_table_offset = LoadBE64(b_, kOffL1TableOffset);
    h_.refcount_table_offset = LoadBE64(b_, kOffRefcountTableOffset);
    h_.refcount_table_clusters = LoadBE32(b_, kOffRefcountTableClusters);
    h_.nb_snapshots = LoadBE32(b_, kOffNbSnapshots);
    h_.snapshots_offset = LoadBE64(b_, kOffSnapshotsOffset);

    if (h_.cluster_bits < kMinClusterBits || h_.cluster_bits > kMaxClusterBits) {
      return Corrupt("cluster_bits {} is out of range (must be {} to {})", h_.cluster_bits,
                     kMinClusterBits, kMaxClusterBits);
    }
    if (h_.version == 2) {
      h_.header_length = kV2HeaderLength;
      h_.refcount_order = 4;
      return Status::Ok();
    }
    h_.incompatible_features = LoadBE64(b_, kOffIncompatible);
    h_.compatible_features = LoadBE64(b_, kOffCompatible);
    h_.autoclear_features = LoadBE64(b_, kOffAutoclear);
    h_.refcount_order = LoadBE32(b_, kOffRefcountOrder);
    h_.header_length = LoadBE32(b_, kOffHeaderLength);
    if (h_.header_length < kV3MinHeaderLength || h_.header_length % 8 != 0) {
      return Corrupt("header_length {} is invalid (must be a multiple of 8, at least {})",
                     h_.header_length, kV3MinHeaderLength);
    }
    if (h_.header_length > h_.cluster_size() || h_.header_length > b_.size()) {
      return Corrupt("header_length {} exceeds the first cluster", h_.header_length);
    }
    if (h_.header_length > kOffCompressionType)
      h_.compression_type = Load8(b_, kOffCompressionType);
    if (h_.header_length > kV3HeaderLengthWithCompression) {
      auto extra = b_.subspan(kV3HeaderLengthWithCompression,
                              h_.header_length - kV3HeaderLengthWithCompression);
      h_.unknown_fields.assign(extra.begin(), extra.end());
    }
    if (h_.refcount_order > kMaxRefcountOrder) {
      return Corrupt("refcount_order {} is invalid (at most {})", h_.refcount_order,
                     kMaxRefcountOrder);
    }
    return Status::Ok();
  }

  // QEMU's qcow2_read_extensions: the extensions end where the backing file
  // name starts (else at the end of the first cluster), and one that runs
  // past that end is refused. Bytes past the end of a short file read as
  // zeros (an end marker), as QEMU reads them.
  Status ParseExtensions() {
    const uint64_t end = h_.backing_file_offset != 0
                             ? std::min<uint64_t>(h_.backing_file_offset, h_.cluster_size())
                             : h_.cluster_size();
    uint64_t pos = h_.header_length;
    while (pos < end) {
      if (pos + 8 > b_.size()) return Status::Ok();  // zeros: the end marker
      uint32_t type = LoadBE32(b_, pos);
      uint32_t len = LoadBE32(b_, pos + 4);
      if (type == kExtEnd && pos + 8 <= end) return Status::Ok();
      pos += 8;
      if (pos > end || len > end - pos) {
        return Corrupt("header extension 0x{:08x} ({} bytes) runs past {}", type, len,
                       h_.backing_file_offset != 0 ? "the start of the backing file name"
                                                   : "the first cluster");
      }
      if (pos + len > b_.size()) {
        return Corrupt("header extension 0x{:08x} ({} bytes) lies past the end of the file", type,
                       len);
      }
      RETURN_IF_ERROR(ParseExtension(type, b_.subspan(pos, len)));
      pos += RoundUp8(len);
    }
    return Status::Ok();
  }

  Status ParseExtension(uint32_t type, std::span<const std::byte> data) {
    std::string as_string(reinterpret_cast<const char*>(data.data()), data.size());
    switch (type) {
      case kExtBackingFormat:
        if (data.size() > kMaxBackingFormatSize) {
          return Corrupt("backing file format name is {} bytes long (at most {})", data.size(),
                         kMaxBackingFormatSize);
        }
        h_.backing_format = TrimName(data);
        return Status::Ok();
      case kExtDataFile:
        if (data.size() > 1023) return Corrupt("external data file name is too long");
        h_.data_file = TrimName(data);
        return Status::Ok();
      case kExtFeatureNames:
        for (size_t i = 0; i + kFeatureNameEntrySize <= data.size(); i += kFeatureNameEntrySize) {
          FeatureName f;
          f.type = Load8(data, i);
          f.bit = Load8(data, i + 1);
          f.name = TrimName(data.subspan(i + 2, 46));
          h_.feature_names.push_back(std::move(f));
        }
        return Status::Ok();
      case kExtBitmaps: {
        if (data.size() != 24) {
          return Corrupt("bitmaps extension has {} bytes, not 24", data.size());
        }
        // Without the autoclear bit, a program that knows no bitmaps has
        // written the image since: the extension is stale and ignored (and
        // dropped when the header is next written), as QEMU does.
        if (!(h_.autoclear_features & kAutoclearBitmaps)) return Status::Ok();
        BitmapsExtension e;
        e.nb_bitmaps = LoadBE32(data, 0);
        const uint32_t reserved = LoadBE32(data, 4);
        e.directory_size = LoadBE64(data, 8);
        e.directory_offset = LoadBE64(data, 16);
        if (reserved != 0) return Corrupt("bitmaps extension has a non-zero reserved field");
        if (e.nb_bitmaps == 0) return Corrupt("bitmaps extension lists no bitmaps");
        if (e.nb_bitmaps > kMaxBitmaps) {
          return Corrupt("bitmaps extension lists {} bitmaps (at most {})", e.nb_bitmaps,
                         kMaxBitmaps);
        }
        if (e.directory_size == 0) return Corrupt("bitmap directory size is 0");
        if (e.directory_size > kMaxBitmapDirectorySize) {
          return Corrupt("bitmap directory is {} bytes (at most {})", e.directory_size,
                         kMaxBitmapDirectorySize);
        }
        h_.bitmaps = e;
        return Status::Ok();
      }
      case kExtCrypto: {
        if (h_.crypt_method != kCryptLuks) {
          return Corrupt("encryption header extension in an image whose encryption method is {}",
                         h_.crypt_method == kCryptNone ? "none" : "not LUKS");
        }
        if (data.size() != 16)
          return Corrupt("encryption header extension has {} bytes, not 16", data.size());
        h_.crypto = CryptoExtension{LoadBE64(data, 0), LoadBE64(data, 8)};
        return Status::Ok();
      }
      default:
        h_.unknown_extensions.push_back(RawExtension{type, {data.begin(), data.end()}});
        return Status::Ok();
    }
  }

  Status ParseBackingFileName() {
    if (h_.backing_file_offset == 0) return Status::Ok();
    if (h_.backing_file_size > kMaxBackingFileNameSize) {
      return Corrupt("backing file name is {} bytes long (at most {})", h_.backing_file_size,
                     kMaxBackingFileNameSize);
    }
    uint64_t end = h_.backing_file_offset + h_.backing_file_size;
    if (h_.backing_file_offset > h_.cluster_size() || end > h_.cluster_size() || end > b_.size()) {
      return Corrupt("backing file name at offset {} lies outside the first cluster",
                     h_.backing_file_offset);
    }
    // A C string, as QEMU reads it: a NUL ends the name, and a name that
    // starts with one is no backing file at all.
    h_.backing_file = TrimName(b_.subspan(h_.backing_file_offset, h_.backing_file_size));
    return Status::Ok();
  }

  Status CheckFeatures() {
    uint64_t unknown = h_.incompatible_features & ~kIncompatKnown;
    if (unknown != 0) {
      std::string names;
      for (int bit = 0; bit < 64; bit++) {
        if (!(unknown & (uint64_t{1} << bit))) continue;
        std::string name = h_.FeatureNameFor(kFeatureIncompatible, bit);
        if (!names.empty()) names += ", ";
        names +=
            name.empty() ? fmt::format("bit {}", bit) : fmt::format("'{}' (bit {})", name, bit);
      }
      return Unsupported("image uses unsupported incompatible feature(s): {}", names);
    }
    // LUKS and legacy AES images parse (the key is asked for when the image
    // is opened for I/O: OpenImage); unknown methods are refused unless the
    // caller only reads metadata (check). QEMU: "Unsupported encryption
    // method N".
    if (h_.crypt_method > kCryptLuks && !allow_encrypted_) {
      return Unsupported("Unsupported encryption method {}", h_.crypt_method);
    }
    if (h_.crypt_method == kCryptLuks && !h_.crypto && !allow_encrypted_) {
      return Corrupt("LUKS-encrypted image without the encryption header extension");
    }
    bool compression_bit = h_.incompatible_features & kIncompatCompression;
    if (compression_bit) {
      if (h_.header_length <= kOffCompressionType || h_.compression_type == 0) {
        return Corrupt("compression type bit is set but compression_type is missing or zero");
      }
    } else if (h_.compression_type != 0) {
      return Corrupt("compression_type {} is set without the compression type bit",
                     h_.compression_type);
    }
    if (h_.compression_type > kCompressionZstd) {
      return Unsupported("unknown compression type {}", h_.compression_type);
    }
    if (h_.extended_l2() && h_.cluster_bits < kMinExtendedL2ClusterBits) {
      return Corrupt("extended L2 entries need clusters of at least 16 KiB (cluster_bits {})",
                     h_.cluster_bits);
    }
    if (h_.has_data_file() && !h_.backing_file.empty() && h_.data_file_raw()) {
      return Corrupt("a raw external data file cannot have a backing file");
    }
    return Status::Ok();
  }

  // Every table the engine will load: aligned, inside the file, within limits.
  Status CheckTable(const char* what, uint64_t offset, uint64_t bytes) {
    if (offset & (h_.cluster_size() - 1)) {
      return Corrupt("{} offset 0x{:x} is not aligned to a cluster", what, offset);
    }
    if (bytes > file_size_ || offset > file_size_ - bytes) {
      return Corrupt("{} (offset 0x{:x}, {} bytes) lies past the end of the file ({} bytes)", what,
                     offset, bytes, file_size_);
    }
    return Status::Ok();
  }

  Status CheckTables() {
    const uint64_t cs = h_.cluster_size();
    const uint64_t entry_bytes = h_.extended_l2() ? 16 : 8;
    const uint64_t l2_entries = cs / entry_bytes;
    if (h_.size > (uint64_t{1} << 62)) return Corrupt("virtual size {} is too large", h_.size);
    const uint64_t clusters = (h_.size + cs - 1) / cs;
    const uint64_t needed_l1 = (clusters + l2_entries - 1) / l2_entries;
    if (needed_l1 * 8 > kMaxL1Bytes) {
      return Unsupported("virtual size {} needs an L1 table larger than 32 MiB", h_.size);
    }
    if (uint64_t{h_.l1_size} * 8 > kMaxL1Bytes) {
      return Corrupt("L1 table has {} entries (at most {})", h_.l1_size, kMaxL1Bytes / 8);
    }
    if (h_.l1_size < needed_l1) {
      return Corrupt("L1 table has {} entries, too few for a virtual size of {} (needs {})",
                     h_.l1_size, h_.size, needed_l1);
    }
    if (h_.l1_size > 0)
      RETURN_IF_ERROR(CheckTable("L1 table", h_.l1_table_offset, h_.l1_size * 8ull));

    if (h_.refcount_table_clusters == 0) return Corrupt("image has no refcount table");
    uint64_t rt_bytes = uint64_t{h_.refcount_table_clusters} * cs;
    if (rt_bytes > kMaxRefcountTableBytes) {
      return Corrupt("refcount table is {} bytes (at most {})", rt_bytes, kMaxRefcountTableBytes);
    }
    RETURN_IF_ERROR(CheckTable("refcount table", h_.refcount_table_offset, rt_bytes));

    if (h_.nb_snapshots > kMaxSnapshots) {
      return Corrupt("image claims {} snapshots (at most {})", h_.nb_snapshots, kMaxSnapshots);
    }
    if (h_.nb_snapshots > 0) {
      // Entries are at least 40 bytes; ReadSnapshotTable checks each one.
      RETURN_IF_ERROR(CheckTable("snapshot table", h_.snapshots_offset, 40));
    }
    if (h_.crypto) {
      RETURN_IF_ERROR(CheckTable("encryption header", h_.crypto->offset, h_.crypto->length));
      RETURN_IF_ERROR(CheckCryptoArea());
    }
    if (h_.bitmaps && h_.bitmaps->directory_size > 0) {
      RETURN_IF_ERROR(
          CheckTable("bitmap directory", h_.bitmaps->directory_offset, h_.bitmaps->directory_size));
    }
    return Status::Ok();
  }

  // The LUKS area (whose key slots the crypto layer bounds inside it) must not
  // share bytes with the header cluster or the tables named so far: a key slot
  // written over an L1 table, or the other way round, would destroy both.
  Status CheckCryptoArea() {
    const uint64_t start = h_.crypto->offset, end = start + h_.crypto->length;
    if (h_.crypto->length == 0) return Corrupt("the encryption header is empty");
    auto overlaps = [&](uint64_t offset, uint64_t bytes) {
      return bytes > 0 && start < offset + bytes && offset < end;
    };
    const char* what = nullptr;
    if (overlaps(0, h_.cluster_size())) what = "the header cluster";
    if (h_.l1_size > 0 && overlaps(h_.l1_table_offset, h_.l1_size * 8ull)) what = "the L1 table";
    if (overlaps(h_.refcount_table_offset,
                 uint64_t{h_.refcount_table_clusters} * h_.cluster_size())) {
      what = "the refcount table";
    }
    if (h_.nb_snapshots > 0 && overlaps(h_.snapshots_offset, 40)) what = "the snapshot table";
    if (what != nullptr) {
      return Corrupt("encryption header (offset 0x{:x}, {} bytes) overlaps {}", start,
                     h_.crypto->length, what);
    }
    return Status::Ok();
  }

  std::span<const std::byte> b_;
  uint64_t file_size_;
  const std::string& path_;
  const bool allow_encrypted_;
  Header h_;
};

}  // namespace

std::string Header::FeatureNameFor(uint8_t type, int bit) const {
  for (const FeatureName& f : feature_names) {
    if (f.type == type && f.bit == bit) return f.name;
  }
  return "";
}

Result<Header> ParseHeader(std::span<const std::byte> first_cluster, uint64_t file_size,
                           const std::string& path, bool allow_encrypted) {
  return HeaderParser(first_cluster, file_size, path, allow_encrypted).Parse();
}

Status CheckHeaderForIo(const Header& h, const std::string& path) {
  if (h.data_file_raw() && !h.has_data_file()) {
    return Status::Corruption(fmt::format(
        "{}: the data_file_raw bit is set but the image has no external data file", path));
  }
  return Status::Ok();
}

Task<Result<Header>> ReadHeader(File& file) {
  CO_ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  AlignedBuffer probe(kHeaderProbeBytes);
  CO_ASSIGN_OR_RETURN(size_t n, co_await file.Read(0, probe.span()));
  auto probed = probe.span().first(n);
  if (n < kHeaderProbeBytes) co_return ParseHeader(probed, file_size, file.path());
  uint32_t cluster_bits = LoadBE32(probed, 20);
  if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits) {
    co_return ParseHeader(probed, file_size, file.path());  // reports the bad field
  }
  uint64_t want = std::min<uint64_t>(uint64_t{1} << cluster_bits, file_size);
  AlignedBuffer first(want);
  CO_ASSIGN_OR_RETURN(size_t got, co_await file.Read(0, first.span()));
  co_return ParseHeader(first.span().first(got), file_size, file.path());
}

Result<std::vector<std::byte>> SerializeHeader(const Header& h) {
  const uint64_t cs = h.cluster_size();
  std::vector<std::byte> out(h.version == 2 ? kV2HeaderLength : h.header_length);
  std::span<std::byte> b(out);
  StoreBE32(b, kOffMagic, kMagic);
  StoreBE32(b, kOffVersion, h.version);
  StoreBE32(b, kOffBackingFileSize, h.backing_file.empty() ? 0 : h.backing_file.size());
  StoreBE32(b, kOffClusterBits, h.cluster_bits);
  StoreBE64(b, kOffSize, h.size);
  StoreBE32(b, kOffCryptMethod, h.crypt_method);
  StoreBE32(b, kOffL1Size, h.l1_size);
  StoreBE64(b, kOffL1TableOffset, h.l1_table_offset);
  StoreBE64(b, kOffRefcountTableOffset, h.refcount_table_offset);
  StoreBE32(b, kOffRefcountTableClusters, h.refcount_table_clusters);
  StoreBE32(b, kOffNbSnapshots, h.nb_snapshots);
  StoreBE64(b, kOffSnapshotsOffset, h.snapshots_offset);
  if (h.version >= 3) {
    StoreBE64(b, kOffIncompatible, h.incompatible_features);
    StoreBE64(b, kOffCompatible, h.compatible_features);
    StoreBE64(b, kOffAutoclear, h.autoclear_features);
    StoreBE32(b, kOffRefcountOrder, h.refcount_order);
    StoreBE32(b, kOffHeaderLength, h.header_length);
    if (h.header_length > kOffCompressionType) Store8(b, kOffCompressionType, h.compression_type);
    if (h.header_length > kV3HeaderLengthWithCompression) {
      std::copy(h.unknown_fields.begin(), h.unknown_fields.end(),
                out.begin() + kV3HeaderLengthWithCompression);
    }
  }
  auto add_ext = [&out](uint32_t type, std::span<const std::byte> data) {
    size_t at = out.size();
    out.resize(at + 8 + RoundUp8(data.size()));
    StoreBE32(out, at, type);
    StoreBE32(out, at + 4, data.size());
    std::copy(data.begin(), data.end(), out.begin() + at + 8);
  };
  auto bytes_of = [](const std::string& s) {
    return std::span<const std::byte>(reinterpret_cast<const std::byte*>(s.data()), s.size());
  };
  if (h.backing_format) add_ext(kExtBackingFormat, bytes_of(*h.backing_format));
  if (h.data_file) add_ext(kExtDataFile, bytes_of(*h.data_file));
  if (h.crypto) {
    std::byte buf[16];
    StoreBE64(buf, 0, h.crypto->offset);
    StoreBE64(buf, 8, h.crypto->length);
    add_ext(kExtCrypto, buf);
  }
  if (!h.feature_names.empty()) {
    std::vector<std::byte> table(h.feature_names.size() * kFeatureNameEntrySize);
    for (size_t i = 0; i < h.feature_names.size(); i++) {
      const FeatureName& f = h.feature_names[i];
      Store8(table, i * kFeatureNameEntrySize, f.type);
      Store8(table, i * kFeatureNameEntrySize + 1, f.bit);
      std::memcpy(table.data() + i * kFeatureNameEntrySize + 2, f.name.data(),
                  std::min<size_t>(f.name.size(), 46));
    }
    add_ext(kExtFeatureNames, table);
  }
  if (h.bitmaps) {
    std::byte buf[24] = {};
    StoreBE32(buf, 0, h.bitmaps->nb_bitmaps);
    StoreBE64(buf, 8, h.bitmaps->directory_size);
    StoreBE64(buf, 16, h.bitmaps->directory_offset);
    add_ext(kExtBitmaps, buf);
  }
  for (const RawExtension& e : h.unknown_extensions) add_ext(e.type, e.data);
  out.resize(out.size() + 8);  // end marker: type 0, length 0
  if (!h.backing_file.empty()) {
    StoreBE64(std::span<std::byte>(out), kOffBackingFileOffset, out.size());
    out.insert(out.end(), bytes_of(h.backing_file).begin(), bytes_of(h.backing_file).end());
  }
  if (out.size() > cs) {
    return Status::InvalidArgument(fmt::format(
        "header, extensions and backing file name ({} bytes) do not fit in a cluster of {}",
        out.size(), cs));
  }
  return out;
}

Task<Status> WriteHeader(File& file, const Header& header) {
  CO_ASSIGN_OR_RETURN(std::vector<std::byte> bytes, SerializeHeader(header));
  // Whole 512-byte sectors, zero padded, so nothing stale trails a shorter header.
  bytes.resize((bytes.size() + 511) / 512 * 512);
  AlignedBuffer buf(bytes.size());
  std::memcpy(buf.data(), bytes.data(), bytes.size());
  co_return co_await file.Write(0, buf.span());
}

std::vector<FeatureName> QemuFeatureNames(uint64_t cluster_size) {
  if (cluster_size <= 4096) return {};
  return {
      {kFeatureIncompatible, 0, "dirty bit"},
      {kFeatureIncompatible, 1, "corrupt bit"},
      {kFeatureIncompatible, 2, "external data file"},
      {kFeatureIncompatible, 3, "compression type"},
      {kFeatureIncompatible, 4, "extended L2 entries"},
      {kFeatureCompatible, 0, "lazy refcounts"},
      {kFeatureAutoclear, 0, "bitmaps"},
      {kFeatureAutoclear, 1, "raw external data"},
  };
}

}  // namespace uq::qcow2
