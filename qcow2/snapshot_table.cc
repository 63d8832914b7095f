#include "qcow2/snapshot_table.h"

#include <fmt/format.h>

#include <algorithm>
#include <cassert>
#include <climits>
#include <cstdint>
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
    if (pos >= start_ && pos - start_ <= window_.size() && n <= window_.size() - (pos - start_)) {
      return std::span<const std::byte>(window_.data() + (pos - start_), n);
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
    window_.clear();  // nothing of the old window is kept: resize need not copy it
    window_.resize(len);
    start_ = pos;
    // (Not a conditional expression: GCC mishandles co_await inside one.)
    Status s;
    if (zero_past_eof_) {
      s = co_await file_.ReadZeroPadded(pos, window_);
    } else {
      s = co_await file_.ReadExact(pos, window_);
    }
    if (!s.ok()) {
      window_.clear();
      co_return s;
    }
    co_return std::span<const std::byte>(window_.data(), n);
  }

 private:
  File& file_;
  const uint64_t limit_;
  const bool zero_past_eof_;
  std::vector<std::byte> window_;
  uint64_t start_ = 0;
  size_t chunk_ = kFirstReadChunk;  // the next refill's size (unless one entry needs more)
};

// An entry's fixed part: the fields it sets in a Snapshot, and the sizes of
// what follows it.
struct FixedPart {
  Snapshot snapshot;
  uint16_t id_size = 0;
  uint16_t name_size = 0;
  uint32_t extra_size = 0;
};

FixedPart ParseFixedPart(std::span<const std::byte> fixed) {
  FixedPart f;
  Snapshot& s = f.snapshot;
  s.l1_table_offset = LoadBE64(fixed, kOffL1TableOffset);
  s.l1_size = LoadBE32(fixed, kOffL1Size);
  s.date_sec = LoadBE32(fixed, kOffDateSec);
  s.date_nsec = LoadBE32(fixed, kOffDateNsec);
  s.vm_clock_nsec = LoadBE64(fixed, kOffVmClockNsec);
  s.vm_state_size = LoadBE32(fixed, kOffVmStateSize32);
  f.id_size = LoadBE16(fixed, kOffIdSize);
  f.name_size = LoadBE16(fixed, kOffNameSize);
  f.extra_size = LoadBE32(fixed, kOffExtraDataSize);
  return f;
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
    FixedPart f = ParseFixedPart(*fixed);
    Snapshot s = std::move(f.snapshot);
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
  scan.snapshots.reserve(count);
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
  // QEMU holds id and name as C strings: each ends at its first NUL.
  auto c_string = [](std::span<const std::byte> bytes) {
    std::string s(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    s.resize(std::min(s.size(), s.find('\0')));
    return s;
  };

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
    FixedPart f = ParseFixedPart(*fixed);
    pos += kSnapshotEntryFixedBytes;
    uint32_t kept_extra = f.extra_size;
    if (kept_extra > kMaxSnapshotExtraData) {
      scan.extra_data_cut.push_back({i, f.extra_size});
      kept_extra = kMaxSnapshotExtraData;
    }
    extra = reader.Peek(pos, kept_extra);
    if (!extra) {
      CO_ASSIGN_OR_RETURN(extra, co_await read(pos, kept_extra));
    }
    SetExtraData(f.snapshot, *extra);
    pos += f.extra_size;  // what was cut is skipped
    id = reader.Peek(pos, f.id_size);
    if (!id) {
      CO_ASSIGN_OR_RETURN(id, co_await read(pos, f.id_size));
    }
    f.snapshot.id = c_string(*id);
    pos += f.id_size;
    name = reader.Peek(pos, f.name_size);
    if (!name) {
      CO_ASSIGN_OR_RETURN(name, co_await read(pos, f.name_size));
    }
    f.snapshot.name = c_string(*name);
    pos += f.name_size;

    kept_length += kSnapshotEntryFixedBytes + kept_extra + f.id_size + f.name_size;
    if (kept_length > kMaxSnapshotTableBytes || pos - offset > INT_MAX) {
      scan.dropped = count - i;
      pos = previous_end;
      break;
    }
    scan.snapshots.push_back(std::move(f.snapshot));
  }
  scan.size_on_disk = pos - offset;
  co_return scan;
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
  return version >= 3 && snapshot.extra_data.size() < kSnapshotV3MinExtraData;
}

}  // namespace uq::qcow2
