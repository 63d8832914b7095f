#include "qcow2/bitmap_directory.h"

#include <fmt/format.h>

#include <cassert>
#include <set>
#include <string_view>
#include <utility>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/format.h"

namespace uq::qcow2 {
namespace {

// Offsets of an entry's fixed fields.
constexpr size_t kOffTableOffset = 0;
constexpr size_t kOffTableSize = 8;
constexpr size_t kOffFlags = 12;
constexpr size_t kOffType = 16;
constexpr size_t kOffGranularityBits = 17;
constexpr size_t kOffNameSize = 18;
constexpr size_t kOffExtraDataSize = 20;

uint64_t AlignUp8(uint64_t v) { return (v + 7) & ~uint64_t{7}; }

uint64_t EntrySize(uint64_t extra_data_size, uint64_t name_size) {
  return AlignUp8(kBitmapEntryFixedBytes + extra_data_size + name_size);
}

template <typename... Args>
Status Corrupt(const std::string& path, fmt::format_string<Args...> f, Args&&... args) {
  return Status::Corruption(
      fmt::format("{}: bitmap directory: {}", path, fmt::format(f, std::forward<Args>(args)...)));
}

// QEMU's constraints on one entry (its check_dir_entry), then, with kOpen, the
// spec's on the table's place in the file. `disk_bytes` is the virtual size in
// whole sectors, the length QEMU compares a bitmap's coverage with.
Status CheckEntry(const BitmapDirEntry& e, const Header& header, uint64_t disk_bytes,
                  uint64_t file_size, const std::string& path, BitmapDirectoryRules rules) {
  const uint64_t cluster = header.cluster_size();
  auto bad = [&](std::string_view why) {
    return Corrupt(path, "bitmap '{}' doesn't satisfy the constraints: {}", e.name, why);
  };
  if (e.table_offset == 0) return bad("bitmap table offset is 0");
  if (e.table_offset % cluster != 0) {
    return bad(fmt::format("bitmap table offset {:#x} is not cluster-aligned", e.table_offset));
  }
  if (e.table_size == 0) return bad("bitmap table size is 0");
  if (e.table_size > kMaxBitmapTableEntries) {
    return bad(fmt::format("bitmap table of {} entries (at most {})", e.table_size,
                           kMaxBitmapTableEntries));
  }
  if (e.granularity_bits < kMinBitmapGranularityBits ||
      e.granularity_bits > kMaxBitmapGranularityBits) {
    return bad(fmt::format("granularity_bits {} is out of range ({} to {})", e.granularity_bits,
                           kMinBitmapGranularityBits, kMaxBitmapGranularityBits));
  }
  if (e.flags & ~kBitmapKnownFlags) {
    return bad(fmt::format("reserved flags set ({:#x})", e.flags & ~kBitmapKnownFlags));
  }
  if (e.type != kBitmapTypeDirtyTracking) {
    return bad(fmt::format("type {} (only 1, dirty tracking, is defined)", e.type));
  }
  // table_size <= 2^27 and cluster <= 2^21: no overflow.
  const uint64_t bitmap_bytes = uint64_t{e.table_size} * cluster;
  if (bitmap_bytes > kMaxBitmapBytes) {
    return bad(fmt::format("its table names {} bytes of bitmap (at most {})", bitmap_bytes,
                           kMaxBitmapBytes));
  }
  // A bitmap in use may be stale after a resize; a valid one must cover the
  // disk. bitmap_bytes * 8 <= 2^32, shifted by at most 31: fits.
  if (!e.in_use() && disk_bytes > ((bitmap_bytes * 8) << e.granularity_bits)) {
    return bad("its table is too small for the virtual disk");
  }
  if (rules == BitmapDirectoryRules::kQemu) return Status::Ok();
  // The spec's rules that QEMU checks only when it reads the table.
  const uint64_t table_bytes = uint64_t{e.table_size} * 8;
  if (e.table_offset > file_size || table_bytes > file_size - e.table_offset) {
    return Corrupt(path, "bitmap '{}': bitmap table at {:#x} ({} bytes) is outside the file",
                   e.name, e.table_offset, table_bytes);
  }
  return Status::Ok();
}

}  // namespace

const BitmapsExtension* ActiveBitmapsExtension(const Header& header) {
  if (!header.bitmaps.has_value() || !(header.autoclear_features & kAutoclearBitmaps)) {
    return nullptr;
  }
  return &*header.bitmaps;
}

Result<std::vector<BitmapDirEntry>> ParseBitmapDirectory(std::span<const std::byte> bytes,
                                                         const Header& header, uint64_t file_size,
                                                         const std::string& path,
                                                         BitmapDirectoryRules rules) {
  const BitmapsExtension* ext = ActiveBitmapsExtension(header);
  assert(ext != nullptr);
  const uint64_t disk_bytes = header.size & ~uint64_t{511};
  auto broken = [&] { return Corrupt(path, "an entry runs past its end (broken directory)"); };
  std::vector<BitmapDirEntry> entries;
  std::set<std::string_view> names;  // views into `bytes`
  size_t pos = 0;
  while (pos < bytes.size()) {
    if (bytes.size() - pos < kBitmapEntryFixedBytes) return broken();
    // Checked before anything is kept, so the vector never outgrows the header's count.
    if (entries.size() >= ext->nb_bitmaps) {
      return Corrupt(path, "more bitmaps found than the header extension says ({})",
                     ext->nb_bitmaps);
    }
    std::span<const std::byte> fixed = bytes.subspan(pos, kBitmapEntryFixedBytes);
    const uint32_t extra_size = LoadBE32(fixed, kOffExtraDataSize);
    const uint16_t name_size = LoadBE16(fixed, kOffNameSize);
    const uint64_t size = EntrySize(extra_size, name_size);
    if (size > bytes.size() - pos) return broken();
    if (extra_size != 0) {
      return Status::NotSupported(
          fmt::format("{}: bitmap directory: bitmap extra data is not supported", path));
    }
    std::string_view name(
        reinterpret_cast<const char*>(bytes.data()) + pos + kBitmapEntryFixedBytes + extra_size,
        name_size);
    BitmapDirEntry e;
    e.name = std::string(name);
    e.table_offset = LoadBE64(fixed, kOffTableOffset);
    e.table_size = LoadBE32(fixed, kOffTableSize);
    e.flags = LoadBE32(fixed, kOffFlags);
    e.type = Load8(fixed, kOffType);
    e.granularity_bits = Load8(fixed, kOffGranularityBits);
    // QEMU refuses a name over 1023 bytes among the field checks.
    if (name_size > kMaxBitmapNameSize) {
      return Corrupt(path, "bitmap {}: name of {} bytes (at most {})", entries.size(), name_size,
                     kMaxBitmapNameSize);
    }
    RETURN_IF_ERROR(CheckEntry(e, header, disk_bytes, file_size, path, rules));
    if (rules == BitmapDirectoryRules::kOpen) {
      if (name.empty()) return Corrupt(path, "bitmap {} has an empty name", entries.size());
      if (!names.insert(name).second) {
        return Corrupt(path, "two bitmaps are named '{}'", e.name);
      }
    }
    entries.push_back(std::move(e));
    pos += size;
  }
  if (entries.size() != ext->nb_bitmaps) {
    return Corrupt(path, "fewer bitmaps found ({}) than the header extension says ({})",
                   entries.size(), ext->nb_bitmaps);
  }
  return entries;
}

std::vector<std::byte> SerializeBitmapDirectory(std::span<const BitmapDirEntry> entries) {
  uint64_t total = 0;
  for (const BitmapDirEntry& e : entries) total += EntrySize(e.extra_data.size(), e.name.size());
  std::vector<std::byte> out(total);
  size_t pos = 0;
  for (const BitmapDirEntry& e : entries) {
    std::span<std::byte> entry(out.data() + pos, EntrySize(e.extra_data.size(), e.name.size()));
    StoreBE64(entry, kOffTableOffset, e.table_offset);
    StoreBE32(entry, kOffTableSize, e.table_size);
    StoreBE32(entry, kOffFlags, e.flags);
    Store8(entry, kOffType, e.type);
    Store8(entry, kOffGranularityBits, e.granularity_bits);
    StoreBE16(entry, kOffNameSize, static_cast<uint16_t>(e.name.size()));
    StoreBE32(entry, kOffExtraDataSize, static_cast<uint32_t>(e.extra_data.size()));
    std::byte* p = entry.data() + kBitmapEntryFixedBytes;
    for (std::byte b : e.extra_data) *p++ = b;
    for (char c : e.name) *p++ = static_cast<std::byte>(c);
    pos += entry.size();
  }
  return out;
}

Task<Result<std::vector<BitmapDirEntry>>> ReadBitmapDirectory(File& file, const Header& header,
                                                              BitmapDirectoryRules rules) {
  const BitmapsExtension* ext = ActiveBitmapsExtension(header);
  if (ext == nullptr) co_return std::vector<BitmapDirEntry>{};
  const std::string& path = file.path();
  CO_ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  if (ext->directory_size == 0) co_return Corrupt(path, "directory size is 0");
  if (ext->directory_size > kMaxBitmapDirectorySize) {
    co_return Corrupt(path, "directory of {} bytes (at most {})", ext->directory_size,
                      kMaxBitmapDirectorySize);
  }
  if (ext->directory_offset > file_size ||
      ext->directory_size > file_size - ext->directory_offset) {
    co_return Corrupt(path, "directory at {:#x} ({} bytes) is outside the file",
                      ext->directory_offset, ext->directory_size);
  }
  std::vector<std::byte> bytes(ext->directory_size);
  CO_RETURN_IF_ERROR(co_await file.ReadExact(ext->directory_offset, bytes));
  co_return ParseBitmapDirectory(bytes, header, file_size, path, rules);
}

Task<Result<std::vector<uint64_t>>> ReadBitmapTable(File& file, const BitmapDirEntry& e,
                                                    uint64_t cluster_size) {
  const uint64_t bytes = uint64_t{e.table_size} * 8;
  AlignedBuffer buf((bytes + kSectorSize - 1) / kSectorSize * kSectorSize);
  CO_RETURN_IF_ERROR(co_await file.ReadZeroPadded(e.table_offset, buf.span()));
  std::vector<uint64_t> table(e.table_size);
  for (size_t i = 0; i < table.size(); i++) {
    table[i] = LoadBE64(buf.span(), i * 8);
    if (!BitmapTableEntryValid(table[i], cluster_size)) {
      co_return Status::Corruption(
          fmt::format("{}: bitmap '{}': bitmap table entry {} (0x{:016x}) is invalid", file.path(),
                      e.name, i, table[i]));
    }
  }
  co_return table;
}

Task<Result<std::vector<std::optional<std::vector<uint64_t>>>>> ReadConsistentBitmapTables(
    File& file, std::span<const BitmapDirEntry> entries, uint64_t cluster_size) {
  std::vector<std::optional<std::vector<uint64_t>>> tables(entries.size());
  for (size_t i = 0; i < entries.size(); i++) {
    if (!entries[i].in_use()) {
      CO_ASSIGN_OR_RETURN(tables[i], co_await ReadBitmapTable(file, entries[i], cluster_size));
    }
  }
  co_return tables;
}

}  // namespace uq::qcow2
