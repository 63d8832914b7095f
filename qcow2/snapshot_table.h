// The snapshot table: parsing, validation and serialisation of the internal
// snapshot directory (QEMU's docs/interop/qcow2.rst, "Snapshots").
//
// The table is a run of variable-length entries at the header's
// snapshots_offset, nb_snapshots of them, each starting on an 8-byte boundary:
//
//   0 -  7  l1_table_offset        24 - 31  vm_clock_nsec
//   8 - 11  l1_size                32 - 35  vm_state_size (32-bit, legacy)
//  12 - 13  id_str_size            36 - 39  extra_data_size
//  14 - 15  name_size              40 -     extra data (extra_data_size bytes):
//  16 - 19  date_sec                          +0  vm_state_size (64-bit)
//  20 - 23  date_nsec                         +8  disk_size
//                                            +16  icount (-1: disabled)
//           then the id, the name (neither NUL-terminated), zero padding to 8.
//
// Reading trusts nothing: the entry count, every size and every offset is
// checked against QEMU's limits and the file size before anything is
// allocated from it, so a hostile table costs at most a bounded read.
// Everything is kept, unknown extra data included, so that a table read and
// serialised again comes out byte for byte the same (see
// SerializeSnapshotTable for the two exceptions).
//
// Thread model: plain functions on values; ReadSnapshotTable awaits `file`
// and must run where that File's operations may be started.
#ifndef UBLK_QCOW2_QCOW2_SNAPSHOT_TABLE_H_
#define UBLK_QCOW2_QCOW2_SNAPSHOT_TABLE_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"

namespace uq::qcow2 {

// QEMU's limits (block/qcow2.h), which the reader enforces.
inline constexpr uint32_t kMaxSnapshotCount = 65536;           // QCOW_MAX_SNAPSHOTS
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;        // QCOW_MAX_SNAPSHOT_EXTRA_DATA
inline constexpr uint64_t kMaxSnapshotTableBytes = 64u << 20;  // QCOW_MAX_SNAPSHOTS_SIZE
inline constexpr size_t kSnapshotEntryFixedBytes = 40;
// Extra data a v3 entry must have (up to byte 55: vm_state_size and disk_size).
inline constexpr size_t kSnapshotV3MinExtraData = 16;

struct Snapshot {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;  // entries
  std::string id;        // unique ID string (QEMU: a decimal number)
  std::string name;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  // The 64-bit size from the extra data when present, else the 32-bit field.
  uint64_t vm_state_size = 0;
  // Virtual disk size when the snapshot was taken; absent in old entries
  // (fewer than 16 bytes of extra data), where QEMU assumes the current size.
  std::optional<uint64_t> disk_size;
  // Record/replay instruction count (extra data bytes 16-23), -1 when icount
  // was disabled; absent in entries with fewer than 24 bytes of extra data.
  std::optional<int64_t> icount;
  // All extra data bytes verbatim (known fields included), so unknown fields
  // survive a rewrite. Its size is the entry's extra_data_size.
  std::vector<std::byte> extra_data;
};

// Reads the `count` entries of the snapshot table at `offset` in `file`,
// whose size is `file_size`. `version` is the image's (2 or 3).
//
// Validated before any allocation or read they govern, with Corruption naming
// the snapshot index and the field:
//   count <= 65536 and count * 40 bytes fit in the file after `offset`;
//   each entry's fixed part, extra data, id and name lie inside the file;
//   extra_data_size <= 1024 (QEMU refuses more);
//   the table, up to the end of any entry, stays within 64 MiB.
// Not checked here, as QEMU does not check them when opening either:
//   the table offset's cluster alignment (the header parser's job);
//   each snapshot's L1 table (ValidateSnapshotL1Table, before using one);
//   v3 entries with less than 16 bytes of extra data, which QEMU reads and
//   `qemu-img check` reports (HasIncompleteExtraData).
// Other errors: IoError from the file; InvalidArgument for a version other
// than 2 or 3. count == 0 reads nothing and returns an empty table.
Task<Result<std::vector<Snapshot>>> ReadSnapshotTable(File& file, uint64_t offset, uint32_t count,
                                                      uint64_t file_size, int version);

struct SnapshotTableScan;

// The numeric fields of an entry's fixed part, as stored (the Snapshot
// fields of the same names; vm_state_size32 is the 32-bit one).
struct SnapshotFixedFields {
  uint64_t l1_table_offset = 0;
  uint64_t vm_clock_nsec = 0;
  uint32_t l1_size = 0;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint32_t vm_state_size32 = 0;
};

// The entries of a table as check's reader keeps them: each entry's numeric
// fields in a small record, its extra data, id and name in one shared byte
// pool. Why not a std::vector<Snapshot>: a check reads the table once per
// pass, and a damaged image may claim 65536 entries (of zeros, past the end
// of the file); as Snapshots (two strings, a vector and two optionals each)
// that was 10 MiB built and torn down per pass, plus a heap allocation per
// entry with extra data, most of a pass's time under the fuzzer's ASan. A
// check needs the L1 fields of every entry but a whole Snapshot only to
// rewrite the table (operator[], ToVector).
class PackedSnapshotTable {
 public:
  // The `count` entries SerializeSnapshotTable wrote into `bytes` (as a
  // table just written would read back; no limit is checked).
  // REQUIRES: `bytes` begins with what SerializeSnapshotTable returned for
  // `count` entries.
  static PackedSnapshotTable FromSerialized(std::span<const std::byte> bytes, size_t count);

  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  uint64_t l1_table_offset(size_t i) const { return entries_[i].fixed.l1_table_offset; }
  uint32_t l1_size(size_t i) const { return entries_[i].fixed.l1_size; }
  std::string_view id(size_t i) const { return Chars(entries_[i].id_at(), entries_[i].id_size); }
  std::string_view name(size_t i) const {
    return Chars(entries_[i].name_at(), entries_[i].name_size);
  }
  size_t extra_data_size(size_t i) const { return entries_[i].extra_size; }
  // Entry `i` as a Snapshot (made on each call).
  Snapshot operator[](size_t i) const;
  std::vector<Snapshot> ToVector() const;

 private:
  friend Task<Result<SnapshotTableScan>> ReadSnapshotTableForCheck(File& file, uint64_t offset,
                                                                   uint32_t count);
  struct Entry {
    SnapshotFixedFields fixed;
    uint32_t at = 0;          // in pool_: extra data, id, name (all < 64 MiB + one entry)
    uint16_t extra_size = 0;  // <= 1024
    uint16_t id_size = 0;
    uint16_t name_size = 0;
    uint64_t id_at() const { return uint64_t{at} + extra_size; }
    uint64_t name_at() const { return id_at() + id_size; }
  };
  // Appends an entry from its fixed part as stored (its sizes are not used).
  Entry& Begin(std::span<const std::byte> fixed);
  // Appends `bytes` to the last entry's extra data, id or name.
  void AddExtra(std::span<const std::byte> bytes);
  void AddId(std::span<const std::byte> bytes);
  void AddName(std::span<const std::byte> bytes);
  void PopBack();
  std::string_view Chars(uint64_t at, size_t n) const {
    return {reinterpret_cast<const char*>(pool_.data()) + at, n};
  }

  std::vector<Entry> entries_;
  std::vector<std::byte> pool_;
};

// What ReadSnapshotTableForCheck found.
struct SnapshotTableScan {
  // The entries kept, in table order.
  PackedSnapshotTable snapshots;
  // Bytes from the table's offset to the end of the last entry kept, as the
  // entries lie in the file (cut extra data counts whole): what the table
  // occupies, which the check owes a refcount. QEMU's snapshots_size.
  uint64_t size_on_disk = 0;
  // Entries whose extra data was over the 1024-byte limit and was cut to its
  // first 1024 bytes: (index, extra_data_size as stored).
  std::vector<std::pair<uint32_t, uint32_t>> extra_data_cut;
  // Entries dropped off the end of the table, from the one with which the
  // table (extra data counted as cut) passes 64 MiB, or with which the entries
  // as stored pass INT_MAX bytes. 0 if none. Every cut entry comes before them.
  uint32_t dropped = 0;
};

// Reads the snapshot table as QEMU's check does (qcow2_check_read_snapshot_table
// in repair mode), for `ublk-qcow2 check`, which must report and repair what
// qemu-img check does, rather than refuse the image as ReadSnapshotTable does:
//   bytes past the end of the file read as zeros (QEMU reads them so);
//   id and name end at their first NUL byte (QEMU keeps them as C strings);
//   extra data over 1024 bytes is cut to its first 1024 bytes
//     (extra_data_cut), the rest skipped;
//   entries that take the table past its size limits are dropped (dropped).
// Without repair, qemu-img check fails on the first cut or drop; the caller
// decides, from the result. Not checked: the count and the offset (QEMU's
// qcow2_validate_table, before this) and incomplete v3 extra data.
// Errors: IoError from the file only.
// REQUIRES: count <= 65536; offset + count * 40 <= INT64_MAX.
Task<Result<SnapshotTableScan>> ReadSnapshotTableForCheck(File& file, uint64_t offset,
                                                          uint32_t count);

// Checks that `snapshots` can be written as a table that ReadSnapshotTable
// (and QEMU) will read back: at most 65536 entries, id and name at most 65535
// bytes each, extra data at most 1024 bytes, the table at most 64 MiB.
// Errors: InvalidArgument naming the snapshot index and field; NoSpace when
// the table as a whole is too big.
Status ValidateSnapshotTableForWrite(const std::vector<Snapshot>& snapshots);

// The table's bytes, entry after entry, each entry but the last followed by
// zero padding to 8 bytes (the table's length is where the last name ends, as
// QEMU counts it). REQUIRES: ValidateSnapshotTableForWrite(snapshots).ok().
//
// Each entry's extra data is `extra_data` with the known fields overwritten
// from the struct: vm_state_size at +0, disk_size at +8 and icount at +16,
// each when the extra data reaches that far. The extra data grows (zero
// filled) as far as needed to hold vm_state_size when it exceeds 32 bits, and
// disk_size or icount when they are set. The legacy 32-bit vm_state_size is
// vm_state_size when it fits, else 0 (QEMU's rule: a reader that does not know
// the 64-bit field then sees a disk-only snapshot rather than a truncated one).
//
// Round trip: serialising what ReadSnapshotTable returned reproduces the
// table's bytes exactly, except for non-zero padding bytes (written as zeros)
// and a legacy 32-bit vm_state_size that disagrees with QEMU's rule above.
std::vector<std::byte> SerializeSnapshotTable(const std::vector<Snapshot>& snapshots);

// The number of bytes SerializeSnapshotTable(snapshots) returns.
uint64_t SnapshotTableSize(const std::vector<Snapshot>& snapshots);

// Checks snapshot `index`'s L1 table before it is used: offset cluster-aligned,
// at most 32 MiB (QEMU's limit), inside the file. Corruption naming the index
// and the field otherwise. REQUIRES: cluster_size is a power of two.
Status ValidateSnapshotL1Table(const Snapshot& snapshot, size_t index, uint64_t cluster_size,
                               uint64_t file_size);

// True if `version` >= 3 and the entry has less extra data than v3 requires
// (16 bytes: vm_state_size and disk_size). QEMU reads such entries and
// `qemu-img check -r all` rewrites them with disk_size filled in.
bool HasIncompleteExtraData(const Snapshot& snapshot, int version);
// The same for an entry with `extra_data_size` bytes of extra data.
bool HasIncompleteExtraData(size_t extra_data_size, int version);

// Names a snapshot as qemu-img's -l does: by id, by name, or by both (every
// field given must match).
struct SnapshotRef {
  std::optional<std::string> id;
  std::optional<std::string> name;
};

// The index of the first snapshot `ref` matches (QEMU's
// find_snapshot_by_id_and_name); nullopt when none does, or `ref` names
// nothing.
std::optional<size_t> FindSnapshot(std::span<const Snapshot> snapshots, const SnapshotRef& ref);

struct SnapshotInfo;  // qcow2/image_info.h

// The entry as `ublk-qcow2 info` reports it: call as ToSnapshotInfo(snapshot).
// `virtual_size` stands in for disk_size when the entry records none (QEMU's
// rule: the current size); icount is -1 when not recorded.
//
// A template only so that this header need not include qcow2/image_info.h,
// which belongs to the engine target that depends on this one; `Info` is
// SnapshotInfo in every real use, and is instantiated where it is complete.
template <class Info = SnapshotInfo>
Info ToSnapshotInfo(const Snapshot& snapshot, uint64_t virtual_size = 0) {
  Info info;
  info.id = snapshot.id;
  info.name = snapshot.name;
  info.vm_state_size = snapshot.vm_state_size;
  info.date_sec = snapshot.date_sec;
  info.date_nsec = snapshot.date_nsec;
  info.vm_clock_nsec = snapshot.vm_clock_nsec;
  info.icount = snapshot.icount.value_or(-1);
  info.disk_size = snapshot.disk_size.value_or(virtual_size);
  return info;
}

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_SNAPSHOT_TABLE_H_
