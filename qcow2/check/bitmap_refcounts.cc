// Bitmaps' share of the references: the bitmap directory, each bitmap's
// table and the data clusters it names, checked as QEMU loads them
// (bitmap_list_load, check_dir_entry, bitmap_table_load).
#include "qcow2/check/bitmap_refcounts.h"

#include <fmt/format.h>

#include <string>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/check/check_pass.h"
#include "qcow2/check/check_util.h"
#include "qcow2/format.h"

namespace uq::qcow2::check_internal {
namespace {

// Bitmaps (block/qcow2-bitmap.c, block/qcow2.h).
constexpr size_t kBitmapDirEntryBytes = 24;
constexpr uint32_t kBmeMaxTableSize = 0x8000000;
constexpr uint64_t kBmeMaxPhysSize = 0x20000000;
constexpr uint32_t kBmeMaxGranularityBits = 31;
constexpr uint32_t kBmeMinGranularityBits = 9;
constexpr uint32_t kBmeReservedFlags = 0xfffffffcu;
constexpr uint32_t kBmeFlagInUse = 1;
constexpr uint32_t kBmeMaxNameSize = 1023;
constexpr uint8_t kBmeTypeDirtyTracking = 1;

}  // namespace

Result<std::vector<BitmapTableRef>> ParseBitmapDirectory(std::span<const std::byte> dir,
                                                         uint32_t nb_bitmaps, uint64_t cluster_size,
                                                         uint64_t disk_bytes) {
  std::vector<BitmapTableRef> tables;
  uint64_t pos = 0;
  uint32_t count = 0;
  while (pos < dir.size()) {
    if (dir.size() - pos < kBitmapDirEntryBytes)
      return Status::Corruption("broken bitmap directory");
    if (++count > nb_bitmaps) {
      return Status::Corruption("more bitmaps found than specified in the header extension");
    }
    const uint64_t table_offset = LoadBE64(dir, pos);
    const uint32_t table_size = LoadBE32(dir, pos + 8);
    const uint32_t flags = LoadBE32(dir, pos + 12);
    const uint8_t type = Load8(dir, pos + 16);
    const uint8_t granularity_bits = Load8(dir, pos + 17);
    const uint16_t name_size = LoadBE16(dir, pos + 18);
    const uint32_t extra_data_size = LoadBE32(dir, pos + 20);
    const uint64_t entry_size =
        RoundUp(kBitmapDirEntryBytes + uint64_t{name_size} + extra_data_size, 8);
    if (entry_size > dir.size() - pos) return Status::Corruption("broken bitmap directory");
    if (extra_data_size != 0) return Status::Corruption("bitmap extra data is not supported");
    const std::string name(reinterpret_cast<const char*>(dir.data() + pos + kBitmapDirEntryBytes),
                           name_size);
    bool bad = table_size == 0 || table_offset == 0 || (table_offset & (cluster_size - 1)) ||
               table_size > kBmeMaxTableSize || granularity_bits > kBmeMaxGranularityBits ||
               granularity_bits < kBmeMinGranularityBits || (flags & kBmeReservedFlags) ||
               name_size > kBmeMaxNameSize || type != kBmeTypeDirtyTracking;
    if (!bad) {
      const uint64_t phys_bytes = uint64_t{table_size} * cluster_size;
      // phys_bytes * 8 <= 2^32 and granularity_bits <= 31: no overflow. A
      // bitmap in use may be stale after a resize (as QEMU's check allows): only
      // a valid one must cover the disk.
      bad = phys_bytes > kBmeMaxPhysSize ||
            (!(flags & kBmeFlagInUse) && disk_bytes > ((phys_bytes * 8) << granularity_bits));
    }
    if (bad) {
      return Status::Corruption(fmt::format("bitmap '{}' doesn't satisfy the constraints", name));
    }
    tables.push_back({table_offset, table_size});
    pos += entry_size;
  }
  if (count != nb_bitmaps) {
    return Status::Corruption("fewer bitmaps found than specified in the header extension");
  }
  return tables;
}

Task<Status> CheckPass::CheckBitmaps() {
  if (!h_.bitmaps || !(h_.autoclear_features & kAutoclearBitmaps)) co_return Status::Ok();
  const BitmapsExtension& ext = *h_.bitmaps;
  if (ext.nb_bitmaps == 0 || ext.nb_bitmaps > kMaxBitmaps || (ext.directory_offset & (cs() - 1)) ||
      ext.directory_size == 0 || ext.directory_size > kMaxBitmapDirectorySize) {
    res_.corruptions++;
    co_return Status::Corruption(
        fmt::format("invalid bitmaps extension ({} bitmaps, directory at {:#x}, {} bytes)",
                    ext.nb_bitmaps, ext.directory_offset, ext.directory_size));
  }
  CO_RETURN_IF_ERROR(Inc(ext.directory_offset, ext.directory_size));
  AlignedBuffer dir(ext.directory_size);
  CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(ext.directory_offset, dir.span()));

  Result<std::vector<BitmapTableRef>> tables =
      ParseBitmapDirectory(dir.span(), ext.nb_bitmaps, cs(), h_.size / kSectorSize * kSectorSize);
  if (!tables.ok()) {
    res_.corruptions++;
    co_return tables.status();
  }
  for (const BitmapTableRef& t : *tables) {
    const uint64_t bytes = uint64_t{t.size} * 8;
    CO_RETURN_IF_ERROR(Inc(t.offset, bytes));
    AlignedBuffer table(bytes);
    CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(t.offset, table.span()));
    // bitmap_table_load: one bad entry fails the whole table.
    for (uint32_t i = 0; i < t.size; i++) {
      const uint64_t entry = LoadBE64(table.span(), uint64_t{i} * 8);
      if (!BitmapTableEntryValid(entry, cs())) {
        res_.corruptions++;
        co_return Status::Corruption(
            fmt::format("bitmap table at {:#x}: entry {} ({:#x}) is invalid", t.offset, i, entry));
      }
    }
    for (uint32_t i = 0; i < t.size; i++) {
      const uint64_t offset = LoadBE64(table.span(), uint64_t{i} * 8) & kBitmapTableEntryOffset;
      if (offset != 0) CO_RETURN_IF_ERROR(Inc(offset, cs()));
    }
  }
  co_return Status::Ok();
}

}  // namespace uq::qcow2::check_internal
