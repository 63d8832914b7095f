// The bitmap directory: the list of persistent dirty bitmaps an image
// carries (QEMU's docs/interop/qcow2.txt, "Bitmaps").
//
// The header's bitmaps extension names the directory (offset, size in bytes,
// number of entries); it is in force only while autoclear feature bit 0
// ("bitmaps") is set: a program that does not know bitmaps clears that bit
// when it writes the image, which tells everyone after it that the bitmaps
// no longer match the data, so QEMU then ignores the extension altogether.
//
// The directory is a run of entries, each starting on an 8-byte boundary:
//
//   0 -  7  bitmap_table_offset   16       type (1: dirty tracking)
//   8 - 11  bitmap_table_size     17       granularity_bits
//           (8-byte entries)      18 - 19  name_size
//  12 - 15  flags (1: in_use,     20 - 23  extra_data_size
//           2: auto)              24 -     extra data, then the name (not
//                                          NUL-terminated), zero padding to 8
//
// Parsing applies QEMU 7.2's rules (qcow2-bitmap.c) so that we refuse what it
// refuses, plus (BitmapDirectoryRules::kOpen) the spec's own "must"s QEMU leaves
// to later steps (a non-empty name, names unique, the bitmap table inside the
// file). The check (qcow2/check) applies QEMU's alone, as qemu-img check does,
// and reports what follows from the rest. Nothing is allocated
// from a field before it is checked: the directory is read only once its size
// is within QEMU's limit (64 MiB less 64 KiB).
//
// Thread model: plain functions on values; ReadBitmapDirectory awaits `file`
// and must run where that File's operations may be started.
#ifndef UBLK_QCOW2_QCOW2_BITMAP_DIRECTORY_H_
#define UBLK_QCOW2_QCOW2_BITMAP_DIRECTORY_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "qcow2/header.h"

namespace uq::qcow2 {

// Entry flags. Every other bit is reserved; QEMU 7.2 refuses an entry with any
// of them set (bit 2, the spec's extra_data_compatible, included).
inline constexpr uint32_t kBitmapInUse = 1u << 0;  // being written: contents unusable
inline constexpr uint32_t kBitmapAuto = 1u << 1;   // enabled: tracks guest writes
inline constexpr uint32_t kBitmapKnownFlags = kBitmapInUse | kBitmapAuto;

inline constexpr uint8_t kBitmapTypeDirtyTracking = 1;

// QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c).
// kMaxBitmaps and kMaxBitmapDirectorySize (the extension's limits) are in format.h.
inline constexpr uint32_t kMaxBitmapTableEntries = 0x8000000;
inline constexpr uint64_t kMaxBitmapBytes = 0x20000000;  // clusters a table may name, in bytes
inline constexpr uint32_t kMinBitmapGranularityBits = 9;
inline constexpr uint32_t kMaxBitmapGranularityBits = 31;
inline constexpr size_t kMaxBitmapNameSize = 1023;
inline constexpr size_t kBitmapEntryFixedBytes = 24;

struct BitmapDirEntry {
  std::string name;           // name_size bytes, as stored
  uint64_t table_offset = 0;  // the bitmap table: cluster-aligned
  uint32_t table_size = 0;    // its 8-byte entries
  uint32_t flags = 0;         // kBitmapInUse | kBitmapAuto
  uint8_t type = kBitmapTypeDirtyTracking;
  uint8_t granularity_bits = 16;
  // Always empty from ParseBitmapDirectory (QEMU 7.2 defines no extra data
  // and refuses an entry that has any); written as is by the serialiser.
  std::vector<std::byte> extra_data;

  uint64_t granularity() const { return uint64_t{1} << granularity_bits; }
  bool in_use() const { return flags & kBitmapInUse; }
  bool enabled() const { return flags & kBitmapAuto; }
};

// Which rules ParseBitmapDirectory applies.
enum class BitmapDirectoryRules {
  // QEMU's and the spec's: what the engine (open, info, convert) accepts.
  kOpen,
  // QEMU 7.2's alone (bitmap_list_load, check_dir_entry): what qemu-img check
  // accepts. An empty or repeated name passes, and a bitmap table outside the
  // file is left to the check, which counts its clusters as references past
  // the end of the file (its bytes read as zeros, as in QEMU).
  kQemu,
};

// The header's bitmaps extension if it is in force (present and the autoclear
// "bitmaps" bit set), else nullptr: QEMU ignores the extension without that bit.
const BitmapsExtension* ActiveBitmapsExtension(const Header& header);

// Parses the directory `bytes` (the directory_size bytes at directory_offset)
// of the image whose header is `header`, whose file holds `file_size` bytes;
// `path` names the file in errors. REQUIRES: ActiveBitmapsExtension(header).
//
// Corruption, naming the file and (once its name is known) the bitmap, when:
//   an entry's fixed part, extra data, name or padding runs past the
//   directory ("broken directory"; so do bytes left after the last entry);
//   the directory holds more or fewer entries than the extension's nb_bitmaps;
//   a field breaks QEMU's constraints: table offset 0 or not cluster-aligned,
//   table size 0 or above kMaxBitmapTableEntries, table clusters above
//   kMaxBitmapBytes, granularity_bits outside 9..31, a reserved flag set,
//   type other than 1, name longer than 1023 bytes;
//   a bitmap not in use whose table is too small to cover the virtual disk;
// and, with BitmapDirectoryRules::kOpen only, when:
//   the name is empty or repeats an earlier one (the spec forbids both);
//   the bitmap table lies (partly) outside the file.
// NotSupported when an entry has extra data (as QEMU 7.2).
// Entries come back in directory order.
Result<std::vector<BitmapDirEntry>> ParseBitmapDirectory(
    std::span<const std::byte> bytes, const Header& header, uint64_t file_size,
    const std::string& path, BitmapDirectoryRules rules = BitmapDirectoryRules::kOpen);

// The directory's bytes: each entry followed by zero padding to 8 bytes, so
// that the result's size is what the extension's directory_size must say.
// Writes what it is given (the caller keeps the entries valid: see
// ParseBitmapDirectory); serialising what ParseBitmapDirectory returned
// reproduces the directory byte for byte, except non-zero padding (written
// as zeros).
std::vector<std::byte> SerializeBitmapDirectory(std::span<const BitmapDirEntry> entries);

// Reads and parses (with `rules`) the directory `header` names in `file`. An
// empty list when the extension is absent or not in force. Errors: as
// ParseBitmapDirectory; Corruption if the directory size is 0 or above
// kMaxBitmapDirectorySize or the directory is not inside the file (checked
// before reading; ParseHeader refuses such a header already); IoError from the
// file.
Task<Result<std::vector<BitmapDirEntry>>> ReadBitmapDirectory(
    File& file, const Header& header, BitmapDirectoryRules rules = BitmapDirectoryRules::kOpen);

// Bitmap table entries (8 bytes, big-endian): the offset of one cluster of the bitmap's
// serialised bits, or 0, bit 0 then saying whether that cluster's bits are all ones.
inline constexpr uint64_t kBitmapTableEntryReserved = 0xff000000000001feull;
inline constexpr uint64_t kBitmapTableEntryOffset = 0x00fffffffffffe00ull;
inline constexpr uint64_t kBitmapTableEntryAllOnes = 1;

// QEMU's check_table_entry: reserved bits clear, an offset aligned to `cluster_size`, the
// all-ones flag only without an offset.
inline bool BitmapTableEntryValid(uint64_t entry, uint64_t cluster_size) {
  const uint64_t offset = entry & kBitmapTableEntryOffset;
  return !(entry & kBitmapTableEntryReserved) && offset % cluster_size == 0 &&
         !(offset != 0 && (entry & kBitmapTableEntryAllOnes));
}

// Reads the bitmap table of `e` (an entry ParseBitmapDirectory returned: at most 2^20 entries,
// since they name at most kMaxBitmapBytes of 512-byte clusters; bytes past the end of the file
// read as zeros, as in QEMU) and checks every entry (BitmapTableEntryValid), as QEMU's
// bitmap_table_load. Corruption "PATH: bitmap 'NAME': bitmap table entry I (0x...) is
// invalid"; IoError from the file.
Task<Result<std::vector<uint64_t>>> ReadBitmapTable(File& file, const BitmapDirEntry& e,
                                                    uint64_t cluster_size);

// What QEMU does on every open, read-only too (it loads every consistent bitmap): the table
// of each bitmap in `entries` that is not in use read and checked (ReadBitmapTable), so an
// image QEMU will not open is refused by info and convert as well. Inconsistent bitmaps
// are never read, by QEMU or by us. Returns them, one per entry (nullopt for a bitmap in
// use), for a caller that goes on to use them.
Task<Result<std::vector<std::optional<std::vector<uint64_t>>>>> ReadConsistentBitmapTables(
    File& file, std::span<const BitmapDirEntry> entries, uint64_t cluster_size);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_BITMAP_DIRECTORY_H_
