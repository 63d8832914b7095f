#include "qcow2/snapshot_table.h"

#include <fmt/format.h>

#include <algorithm>
#include <cassert>
#include <climits>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <utility>

#include "base/endian.h"

namespace uq::qcow2 {

namespace {

constexpr uint64_t kMaxSnapshotL1Bytes = 32ull << 20;  // QEMU's QCOW_MAX_L1_SIZE
constexpr uint32_t kMaxStringSize = 0xffff;            // id_str_size, name_size: 16 bits
// Entries are read through a window (or one entry, if larger) that starts at
// kFirstReadChunk bytes and doubles with each refill up to kReadChunk: a table
// of many small entries costs few reads (a 64 MiB one, 7 more than with
// 256 KiB windows throughout), and a table of a few entries, the common case,
// costs a 4 KiB buffer rather than a 256 KiB one, which matters where a
// buffer that size is expensive (ASan maps and unmaps each one; check's
// reader, with no limit, always filled a whole window).
constexpr size_t kFirstReadChunk = 4 << 10;
constexpr size_t kReadChunk = 256 << 10;

// Offsets of the fixed part's fields.
constexpr size_t kOffL1TableOffset = 0;
constexpr size_t kOffL1Size = 8;
constexpr size_t kOffIdSize = 12;
constexpr size_t kOffNameSize = 14;
constexpr size_t kOffDateSec = 16;
constexpr size_t kOffDateNsec = 20;
constexpr size_t kOffVmClockNsec = 24;
constexpr size_t kOffVmStateSize32 = 32;
constexpr size_t kOffExtraDataSize = 36;
// Offsets of the known fields inside the extra data, and where each ends.
constexpr size_t kExtraVmStateSize = 0;
constexpr size_t kExtraDiskSize = 8;
constexpr size_t kExtraIcount = 16;

uint64_t AlignUp8(uint64_t v) { return (v + 7) & ~uint64_t{7}; }

// Sequential reads of the table through a bounded window.
class TableReader {
 public:
  // Reads never reach past `limit`. With `zero_past_eof`, bytes past the end
  // of the file read as zeros (as QEMU's check reads them); without, a read
  // past it fails.
  TableReader(File& file, uint64_t limit, bool zero_past_eof = false)
      : file_(file), limit_(limit), zero_past_eof_(zero_past_eof) {}

  // The `n` bytes at `pos` if the window holds them (no I/O, no coroutine),
  // valid until the next Get.
  std::optional<std::span<const std::byte>> Peek(uint64_t pos, size_t n) const {
    if (pos >= start_ && pos - start_ <= size_ && n <= size_ - (pos - start_)) {
      return std::span<const std::byte>(window_.get() + (pos - start_), n);
    }
    return std::nullopt;
  }

  // The `n` bytes at `pos`, valid until the next call.
  // REQUIRES: pos + n <= limit.
  Task<Result<std::span<const std::byte>>> Get(uint64_t pos, size_t n) {
    assert(pos <= limit_ && n <= limit_ - pos);
    if (std::optional<std::span<const std::byte>> hit = Peek(pos, n)) co_return *hit;
    uint64_t len = std::min<uint64_t>(std::max(n, chunk_), limit_ - pos);
    chunk_ = std::min(chunk_ * 2, kReadChunk);
    // Nothing of the old window is kept, and the read fills the new one whole
    // (ReadZeroPadded zeroes what lies past the end of the file): the buffer
    // is reused when big enough and never zeroed first. Zeroing each window
    // before the read overwrote it cost check's reader, which reads 2.5 MiB
    // for a table of 65536 entries of zeros, a visible share of a pass.
    size_ = 0;
    if (len > capacity_) {
      window_ = std::make_unique_for_overwrite<std::byte[]>(len);
      capacity_ = len;
    }
    const std::span<std::byte> window(window_.get(), len);
    // (Not a conditional expression: GCC mishandles co_await inside one.)
    Status s;
    if (zero_past_eof_) {
      s = co_await file_.ReadZeroPadded(pos, window);
    } else {
      s = co_await file_.ReadExact(pos, window);
    }
    if (!s.ok()) co_return s;
    start_ = pos;
    size_ = len;
    co_return std::span<const std::byte>(window_.get(), n);
  }

 private:
  File& file_;
  const uint64_t limit_;
  const bool zero_past_eof_;
  std::unique_ptr<std::byte[]> window_;  // capacity_ bytes, of which size_ hold the window
  size_t capacity_ = 0;
  size_t size_ = 0;
  uint64_t start_ = 0;
  size_t chunk_ = kFirstReadChunk;  // the next refill's size (unless one entry needs more)
};

// The sizes of what follows an entry's fixed part.
struct FixedPart {
  uint16_t id_size = 0;
  uint16_t name_size = 0;
  uint32_t extra_size = 0;
};

FixedPart ParseSizes(std::span<const std::byte> fixed) {
  return {.id_size = LoadBE16(fixed, kOffIdSize),
          .name_size = LoadBE16(fixed, kOffNameSize),
          .extra_size = LoadBE32(fixed, kOffExtraDataSize)};
}

SnapshotFixedFields ParseFixedFields(std::span<const std::byte> fixed) {
  return {.l1_table_offset = LoadBE64(fixed, kOffL1TableOffset),
          .vm_clock_nsec = LoadBE64(fixed, kOffVmClockNsec),
          .l1_size = LoadBE32(fixed, kOffL1Size),
          .date_sec = LoadBE32(fixed, kOffDateSec),
          .date_nsec = LoadBE32(fixed, kOffDateNsec),
          .vm_state_size32 = LoadBE32(fixed, kOffVmStateSize32)};
}

// Sets the fields of `s` that `f` holds, in place (a Snapshot is not cheap
// to move).
void SetFixedFields(const SnapshotFixedFields& f, Snapshot& s) {
  s.l1_table_offset = f.l1_table_offset;
  s.l1_size = f.l1_size;
  s.date_sec = f.date_sec;
  s.date_nsec = f.date_nsec;
  s.vm_clock_nsec = f.vm_clock_nsec;
  s.vm_state_size = f.vm_state_size32;
}

// Sets the fields of `s` that the fixed part holds.
FixedPart ParseFixedPart(std::span<const std::byte> fixed, Snapshot& s) {
  SetFixedFields(ParseFixedFields(fixed), s);
  return ParseSizes(fixed);
}

// Keeps `extra` in `s` and reads the known fields from as far as it reaches.
void SetExtraData(Snapshot& s, std::span<const std::byte> extra) {
  s.extra_data.assign(extra.begin(), extra.end());
  if (extra.size() >= kExtraVmStateSize + 8) s.vm_state_size = LoadBE64(extra, kExtraVmStateSize);
  if (extra.size() >= kExtraDiskSize + 8) s.disk_size = LoadBE64(extra, kExtraDiskSize);
  if (extra.size() >= kExtraIcount + 8) {
    s.icount = static_cast<int64_t>(LoadBE64(extra, kExtraIcount));
  }
}

// The extra data size SerializeSnapshotTable writes for `s`.
size_t ExtraSize(const Snapshot& s) {
  size_t need = 0;
  if (s.vm_state_size > 0xffffffffu) need = kExtraVmStateSize + 8;
  if (s.disk_size.has_value()) need = kExtraDiskSize + 8;
  if (s.icount.has_value()) need = kExtraIcount + 8;
  return std::max(s.extra_data.size(), need);
}

uint64_t EntrySize(const Snapshot& s) {
  return kSnapshotEntryFixedBytes + ExtraSize(s) + s.id.size() + s.name.size();
}

}  // namespace

Task<Result<std::vector<Snapshot>>> ReadSnapshotTable(File& file, uint64_t offset, uint32_t count,
                                                      uint64_t file_size, int version) {
  if (version != 2 && version != 3) {
    co_return Status::InvalidArgument(
        fmt::format("{}: snapshot table of a version {} image", file.path(), version));
  }
  std::vector<Snapshot> table;
  if (count == 0) co_return table;
  if (count > kMaxSnapshotCount) {
    co_return Status::Corruption(fmt::format("{}: image claims {} snapshots (at most {})",
                                             file.path(), count, kMaxSnapshotCount));
  }
  if (offset > file_size || uint64_t{count} * kSnapshotEntryFixedBytes > file_size - offset) {
    co_return Status::Corruption(
        fmt::format("{}: snapshot table at offset {} cannot hold {} snapshots: the file ends at {}",
                    file.path(), offset, count, file_size));
  }
  // Bounded: count <= 65536 and the file holds at least 40 bytes for each.
  table.reserve(count);

  auto entry_error = [&](uint32_t i, std::string what) {
    return Status::Corruption(
        fmt::format("{}: snapshot table entry {} of {}: {}", file.path(), i, count, what));
  };
  // [at, at + size) must lie inside the file.
  auto check_in_file = [&](uint32_t i, const char* field, uint64_t at, uint64_t size) {
    if (at <= file_size && size <= file_size - at) return Status::Ok();
    return entry_error(i, fmt::format("{} ({} bytes at offset {}) lies past the end of the file "
                                      "({} bytes)",
                                      field, size, at, file_size));
  };
  // The table up to `end` must stay within QEMU's limit.
  auto check_table_size = [&](uint32_t i, uint64_t end) {
    if (end - offset <= kMaxSnapshotTableBytes) return Status::Ok();
    return entry_error(i, fmt::format("the snapshot table grows past {} bytes (QEMU's limit)",
                                      kMaxSnapshotTableBytes));
  };

  // Reads stay inside the file and within the table's size limit.
  TableReader reader(file, offset + std::min(file_size - offset, kMaxSnapshotTableBytes));
  uint64_t pos = offset;
  for (uint32_t i = 0; i < count; ++i) {
    pos = AlignUp8(pos);
    CO_RETURN_IF_ERROR(check_in_file(i, "fixed part", pos, kSnapshotEntryFixedBytes));
    CO_RETURN_IF_ERROR(check_table_size(i, pos + kSnapshotEntryFixedBytes));
    Result<std::span<const std::byte>> fixed = co_await reader.Get(pos, kSnapshotEntryFixedBytes);
    if (!fixed.ok()) {
      co_return fixed.status().WithContext(fmt::format("reading snapshot table entry {}", i));
    }
    Snapshot s;
    FixedPart f = ParseFixedPart(*fixed, s);
    const uint16_t id_size = f.id_size;
    const uint16_t name_size = f.name_size;
    const uint32_t extra_size = f.extra_size;

    if (extra_size > kMaxSnapshotExtraData) {
      co_return entry_error(i, fmt::format("extra_data_size is {} bytes (at most {}, QEMU's limit)",
                                           extra_size, kMaxSnapshotExtraData));
    }
    const uint64_t extra_at = pos + kSnapshotEntryFixedBytes;
    const uint64_t id_at = extra_at + extra_size;
    const uint64_t name_at = id_at + id_size;
    const uint64_t end = name_at + name_size;
    CO_RETURN_IF_ERROR(check_in_file(i, "extra data", extra_at, extra_size));
    CO_RETURN_IF_ERROR(check_in_file(i, "id", id_at, id_size));
    CO_RETURN_IF_ERROR(check_in_file(i, "name", name_at, name_size));
    CO_RETURN_IF_ERROR(check_table_size(i, end));

    Result<std::span<const std::byte>> rest = co_await reader.Get(extra_at, end - extra_at);
    if (!rest.ok()) {
      co_return rest.status().WithContext(fmt::format("reading snapshot table entry {}", i));
    }
    SetExtraData(s, rest->subspan(0, extra_size));
    const char* chars = reinterpret_cast<const char*>(rest->data());
    s.id.assign(chars + extra_size, id_size);
    s.name.assign(chars + extra_size + id_size, name_size);
    table.push_back(std::move(s));
    pos = end;
  }
  co_return table;
}

Task<Result<SnapshotTableScan>> ReadSnapshotTableForCheck(File& file, uint64_t offset,
                                                          uint32_t count) {
  assert(count <= kMaxSnapshotCount);
  assert(offset <= uint64_t{INT64_MAX} - uint64_t{count} * kSnapshotEntryFixedBytes);
  SnapshotTableScan scan;
  // Bounded: at most 65536 entries, and the loop stops once the entries kept
  // pass 64 MiB.
  scan.snapshots.entries_.reserve(count);
  // The table may reach past the end of the file; such bytes read as zeros.
  TableReader reader(file, UINT64_MAX, /*zero_past_eof=*/true);
  // Fields come from the reader's window without a coroutine call: a call
  // per field nests a stack frame per field whenever reads complete at once
  // (SyncEnv), which overflowed the stack at 70000 snapshots under ASan.
  // Only a window miss awaits.
  auto read = [&](uint64_t at, size_t n) -> Task<Result<std::span<const std::byte>>> {
    Result<std::span<const std::byte>> r = co_await reader.Get(at, n);
    if (!r.ok()) co_return r.status().WithContext("Failed to read snapshot table");
    co_return r;
  };
  std::optional<std::span<const std::byte>> fixed, extra, id, name;

  uint64_t pos = offset;
  uint64_t kept_length = 0;  // the table's length with extra data cut to the limit
  for (uint32_t i = 0; i < count; ++i) {
    const uint64_t previous_end = pos;
    kept_length = AlignUp8(kept_length);
    pos = AlignUp8(pos);
    fixed = reader.Peek(pos, kSnapshotEntryFixedBytes);
    if (!fixed) {
      CO_ASSIGN_OR_RETURN(fixed, co_await read(pos, kSnapshotEntryFixedBytes));
    }
    // Appended at once (the window may move on), taken off if dropped.
    const FixedPart f = ParseSizes(*fixed);
    scan.snapshots.Begin(*fixed);
    pos += kSnapshotEntryFixedBytes;
    uint32_t kept_extra = f.extra_size;
    if (kept_extra > kMaxSnapshotExtraData) {
      scan.extra_data_cut.push_back({i, f.extra_size});
      kept_extra = kMaxSnapshotExtraData;
    }
    // An entry with nothing after its fixed part (every entry of a table
    // past the end of the file, which a damaged count can make 65536 of)
    // needs no more look-ups: under the fuzzer's instrumentation, three
    // empty ones per entry were a visible share of a pass.
    if (f.extra_size != 0 || f.id_size != 0 || f.name_size != 0) {
      extra = reader.Peek(pos, kept_extra);
      if (!extra) {
        CO_ASSIGN_OR_RETURN(extra, co_await read(pos, kept_extra));
      }
      scan.snapshots.AddExtra(*extra);
      pos += f.extra_size;  // what was cut is skipped
      id = reader.Peek(pos, f.id_size);
      if (!id) {
        CO_ASSIGN_OR_RETURN(id, co_await read(pos, f.id_size));
      }
      scan.snapshots.AddId(*id);
      pos += f.id_size;
      name = reader.Peek(pos, f.name_size);
      if (!name) {
        CO_ASSIGN_OR_RETURN(name, co_await read(pos, f.name_size));
      }
      scan.snapshots.AddName(*name);
      pos += f.name_size;
    }

    kept_length += kSnapshotEntryFixedBytes + kept_extra + f.id_size + f.name_size;
    if (kept_length > kMaxSnapshotTableBytes || pos - offset > INT_MAX) {
      scan.dropped = count - i;
      scan.snapshots.PopBack();
      pos = previous_end;
      break;
    }
  }
  scan.size_on_disk = pos - offset;
  co_return scan;
}

PackedSnapshotTable::Entry& PackedSnapshotTable::Begin(std::span<const std::byte> fixed) {
  Entry& e = entries_.emplace_back();
  e.fixed = ParseFixedFields(fixed);
  e.at = static_cast<uint32_t>(pool_.size());
  return e;
}

void PackedSnapshotTable::AddExtra(std::span<const std::byte> bytes) {
  assert(bytes.size() <= kMaxSnapshotExtraData);
  pool_.insert(pool_.end(), bytes.begin(), bytes.end());
  entries_.back().extra_size = static_cast<uint16_t>(bytes.size());
}

namespace {
// QEMU holds id and name as C strings: each ends at its first NUL.
std::span<const std::byte> CString(std::span<const std::byte> bytes) {
  return bytes.first(std::find(bytes.begin(), bytes.end(), std::byte{0}) - bytes.begin());
}
}  // namespace

void PackedSnapshotTable::AddId(std::span<const std::byte> bytes) {
  bytes = CString(bytes);
  pool_.insert(pool_.end(), bytes.begin(), bytes.end());
  entries_.back().id_size = static_cast<uint16_t>(bytes.size());
}

void PackedSnapshotTable::AddName(std::span<const std::byte> bytes) {
  bytes = CString(bytes);
  pool_.insert(pool_.end(), bytes.begin(), bytes.end());
  entries_.back().name_size = static_cast<uint16_t>(bytes.size());
}

void PackedSnapshotTable::PopBack() {
  pool_.resize(entries_.back().at);
  entries_.pop_back();
}

PackedSnapshotTable PackedSnapshotTable::FromSerialized(std::span<const std::byte> b,
                                                        size_t count) {
  PackedSnapshotTable t;
  t.entries_.reserve(count);
  uint64_t pos = 0;
  for (size_t i = 0; i < count; i++) {
    pos = AlignUp8(pos);
    const std::span<const std::byte> fixed = b.subspan(pos, kSnapshotEntryFixedBytes);
    const FixedPart f = ParseSizes(fixed);
    t.Begin(fixed);
    pos += kSnapshotEntryFixedBytes;
    t.AddExtra(b.subspan(pos, f.extra_size));
    pos += f.extra_size;
    t.AddId(b.subspan(pos, f.id_size));
    pos += f.id_size;
    t.AddName(b.subspan(pos, f.name_size));
    pos += f.name_size;
  }
  return t;
}

Snapshot PackedSnapshotTable::operator[](size_t i) const {
  const Entry& e = entries_[i];
  Snapshot s;
  SetFixedFields(e.fixed, s);
  SetExtraData(s, std::span<const std::byte>(pool_).subspan(e.at, e.extra_size));
  s.id = id(i);
  s.name = name(i);
  return s;
}

std::vector<Snapshot> PackedSnapshotTable::ToVector() const {
  std::vector<Snapshot> v;
  v.reserve(size());
  for (size_t i = 0; i < size(); i++) v.push_back((*this)[i]);
  return v;
}

Status ValidateSnapshotTableForWrite(const std::vector<Snapshot>& snapshots) {
  if (snapshots.size() > kMaxSnapshotCount) {
    return Status::NoSpace(
        fmt::format("{} snapshots (at most {})", snapshots.size(), kMaxSnapshotCount));
  }
  uint64_t size = 0;
  for (size_t i = 0; i < snapshots.size(); ++i) {
    const Snapshot& s = snapshots[i];
    auto bad = [&](std::string what) {
      return Status::InvalidArgument(fmt::format("snapshot {} (id '{}'): {}", i, s.id, what));
    };
    if (s.id.size() > kMaxStringSize) {
      return bad(fmt::format("id is {} bytes (at most {})", s.id.size(), kMaxStringSize));
    }
    if (s.name.size() > kMaxStringSize) {
      return bad(fmt::format("name is {} bytes (at most {})", s.name.size(), kMaxStringSize));
    }
    if (ExtraSize(s) > kMaxSnapshotExtraData) {
      return bad(
          fmt::format("{} bytes of extra data (at most {})", ExtraSize(s), kMaxSnapshotExtraData));
    }
    size = AlignUp8(size) + EntrySize(s);
    if (size > kMaxSnapshotTableBytes) {
      return Status::NoSpace(fmt::format("the snapshot table would exceed {} bytes at snapshot {}",
                                         kMaxSnapshotTableBytes, i));
    }
  }
  return Status::Ok();
}

uint64_t SnapshotTableSize(const std::vector<Snapshot>& snapshots) {
  uint64_t size = 0;
  for (const Snapshot& s : snapshots) size = AlignUp8(size) + EntrySize(s);
  return size;
}

std::vector<std::byte> SerializeSnapshotTable(const std::vector<Snapshot>& snapshots) {
  assert(ValidateSnapshotTableForWrite(snapshots).ok());
  std::vector<std::byte> out(SnapshotTableSize(snapshots));
  std::span<std::byte> b(out);
  uint64_t pos = 0;
  for (const Snapshot& s : snapshots) {
    pos = AlignUp8(pos);  // the padding is already zero
    const size_t extra_size = ExtraSize(s);
    StoreBE64(b, pos + kOffL1TableOffset, s.l1_table_offset);
    StoreBE32(b, pos + kOffL1Size, s.l1_size);
    StoreBE16(b, pos + kOffIdSize, static_cast<uint16_t>(s.id.size()));
    StoreBE16(b, pos + kOffNameSize, static_cast<uint16_t>(s.name.size()));
    StoreBE32(b, pos + kOffDateSec, s.date_sec);
    StoreBE32(b, pos + kOffDateNsec, s.date_nsec);
    StoreBE64(b, pos + kOffVmClockNsec, s.vm_clock_nsec);
    StoreBE32(b, pos + kOffVmStateSize32,
              s.vm_state_size <= 0xffffffffu ? static_cast<uint32_t>(s.vm_state_size) : 0);
    StoreBE32(b, pos + kOffExtraDataSize, static_cast<uint32_t>(extra_size));
    pos += kSnapshotEntryFixedBytes;

    std::span<std::byte> extra = b.subspan(pos, extra_size);
    std::copy(s.extra_data.begin(), s.extra_data.end(), extra.begin());
    if (extra_size >= kExtraVmStateSize + 8) StoreBE64(extra, kExtraVmStateSize, s.vm_state_size);
    if (extra_size >= kExtraDiskSize + 8 && s.disk_size) {
      StoreBE64(extra, kExtraDiskSize, *s.disk_size);
    }
    if (extra_size >= kExtraIcount + 8 && s.icount) {
      StoreBE64(extra, kExtraIcount, static_cast<uint64_t>(*s.icount));
    }
    pos += extra_size;

    std::transform(s.id.begin(), s.id.end(), out.begin() + pos,
                   [](char c) { return static_cast<std::byte>(c); });
    pos += s.id.size();
    std::transform(s.name.begin(), s.name.end(), out.begin() + pos,
                   [](char c) { return static_cast<std::byte>(c); });
    pos += s.name.size();
  }
  assert(pos == out.size());
  return out;
}

std::optional<size_t> FindSnapshot(std::span<const Snapshot> snapshots, const SnapshotRef& ref) {
  if (!ref.id && !ref.name) return std::nullopt;
  for (size_t i = 0; i < snapshots.size(); i++) {
    if ((!ref.id || snapshots[i].id == *ref.id) && (!ref.name || snapshots[i].name == *ref.name)) {
      return i;
    }
  }
  return std::nullopt;
}

Status ValidateSnapshotL1Table(const Snapshot& snapshot, size_t index, uint64_t cluster_size,
                               uint64_t file_size) {
  auto bad = [&](std::string what) {
    return Status::Corruption(
        fmt::format("snapshot table entry {} (id '{}'): {}", index, snapshot.id, what));
  };
  const uint64_t bytes = uint64_t{snapshot.l1_size} * 8;
  if ((snapshot.l1_table_offset & (cluster_size - 1)) != 0) {
    return bad(fmt::format("L1 table offset 0x{:x} is not aligned to a cluster ({} bytes)",
                           snapshot.l1_table_offset, cluster_size));
  }
  if (bytes > kMaxSnapshotL1Bytes) {
    return bad(fmt::format("L1 table of {} entries is {} bytes (at most {})", snapshot.l1_size,
                           bytes, kMaxSnapshotL1Bytes));
  }
  if (snapshot.l1_table_offset > file_size || bytes > file_size - snapshot.l1_table_offset) {
    return bad(
        fmt::format("L1 table ({} bytes at offset 0x{:x}) lies past the end of the file "
                    "({} bytes)",
                    bytes, snapshot.l1_table_offset, file_size));
  }
  return Status::Ok();
}

bool HasIncompleteExtraData(const Snapshot& snapshot, int version) {
  return HasIncompleteExtraData(snapshot.extra_data.size(), version);
}

bool HasIncompleteExtraData(size_t extra_data_size, int version) {
  return version >= 3 && extra_data_size < kSnapshotV3MinExtraData;
}

}  // namespace uq::qcow2
