// Counting references (QEMU's calculate_refcounts): every structure that
// owns host clusters adds one to each of them in the in-memory refcount
// array, and the L1, L2 and refcount table entries met on the way are
// checked (reserved bits, alignment, subcluster bitmaps, the end of file).
#include <algorithm>
#include <cerrno>
#include <cstdint>

#include "base/endian.h"
#include "qcow2/check/check_pass.h"
#include "qcow2/check/check_util.h"
#include "qcow2/format.h"
#include "qcow2/l2_entry.h"

namespace uq::qcow2::check_internal {

namespace {

// Masks QEMU applies to table entries (block/qcow2.h).
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feull;
constexpr uint64_t kReftableReservedMask = 0x1ffull;
constexpr uint64_t kL2BitmapAllAlloc = 0x00000000ffffffffull;
constexpr uint64_t kL2BitmapAllZeroes = 0xffffffff00000000ull;

}  // namespace

Status CheckPass::Inc(uint64_t offset, uint64_t size) {
  if (size == 0) return Status::Ok();
  // The last cluster may be partly past the end of the file; anything
  // further is corrupt (and not counted, so memory stays bounded).
  if (static_cast<int64_t>(offset + size - file_size_) >= static_cast<int64_t>(cs())) {
    Msg("ERROR: counting reference for region exceeding the end of the file by one cluster or "
        "more: offset {:#x} size {:#x}",
        offset, size);
    res_.corruptions++;
    return Status::Ok();
  }
  const uint64_t start = offset & ~(cs() - 1);
  const uint64_t last = (offset + size - 1) & ~(cs() - 1);
  for (uint64_t c = start; c <= last; c += cs()) {
    const uint64_t k = c >> cb();
    if (k >= imrt_->size()) {
      Status s = imrt_->Resize(k + 1);
      if (!s.ok()) {
        res_.check_errors++;
        return s;
      }
    }
    const uint64_t r = imrt_->Get(k);
    if (r == imrt_->max()) {
      Msg("ERROR: overflow cluster offset={:#x}", c);
      Msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create "
          "a clean copy if the image cannot be opened for writing");
      res_.corruptions++;
      continue;
    }
    imrt_->Set(k, r + 1);
  }
  return Status::Ok();
}

Task<Status> CheckPass::CalculateRefcounts(int fix, bool* rebuild) {
  // The header.
  CO_RETURN_IF_ERROR(Inc(0, cs()));
  // The active L1 table.
  CO_RETURN_IF_ERROR(co_await CheckL1(h_.l1_table_offset, h_.l1_size, kFragInfo, fix, true));
  // Snapshots.
  if (has_data_file() && !snapshots_.empty()) {
    Msg("ERROR {} snapshots in image with data file", snapshots_.size());
    res_.corruptions++;
  }
  for (size_t i = 0; i < snapshots_.size(); i++) {
    const uint64_t l1_offset = snapshots_.l1_table_offset(i);
    const uint32_t l1_size = snapshots_.l1_size(i);
    if (l1_offset & (cs() - 1)) {
      Msg("ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot "
          "table entry corrupted",
          snapshots_.id(i), snapshots_.name(i), l1_offset);
      res_.corruptions++;
      continue;
    }
    if (uint64_t{l1_size} * 8 > kMaxL1Bytes) {
      Msg("ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry "
          "corrupted",
          snapshots_.id(i), snapshots_.name(i), l1_size);
      res_.corruptions++;
      continue;
    }
    // An empty L1 table counts nothing (CheckL1 returns at once), but the
    // call would still allocate a coroutine frame: with 65536 snapshots of
    // zeros, that was most of a pass's allocations.
    if (l1_size == 0) continue;
    CO_RETURN_IF_ERROR(co_await CheckL1(l1_offset, l1_size, 0, fix, false));
  }
  CO_RETURN_IF_ERROR(Inc(h_.snapshots_offset, snapshots_.empty() ? 0 : snapshots_size_));
  // The refcount table.
  CO_RETURN_IF_ERROR(Inc(h_.refcount_table_offset, stored_->table().size() * 8));
  // The encryption header.
  if (h_.crypto && h_.crypto->length) {
    CO_RETURN_IF_ERROR(Inc(h_.crypto->offset, h_.crypto->length));
  }
  // Bitmaps.
  CO_RETURN_IF_ERROR(co_await CheckBitmaps());
  // Refcount blocks.
  co_return co_await CheckRefblocks(fix, rebuild);
}

Task<Status> CheckPass::CheckL1(uint64_t l1_offset, uint32_t l1_size, int flags, int fix,
                                bool active) {
  if (l1_size == 0) co_return Status::Ok();
  const uint64_t bytes = uint64_t{l1_size} * 8;
  CO_RETURN_IF_ERROR(Inc(l1_offset, bytes));
  // Entries past the end of the file read as zeros, and a zero entry names
  // no L2 table: only the entries that start inside the file are read and
  // walked. (A damaged l1_size, up to 4 Mi entries, would otherwise cost a
  // 32 MiB buffer of zeros to fill and scan.) If the size is unknown, all.
  uint64_t walked = bytes;
  if (Result<uint64_t> file_size = file_.Size(); file_size.ok()) {
    walked = l1_offset >= *file_size ? 0 : std::min(bytes, RoundUp(*file_size - l1_offset, 8));
  }
  if (walked == 0) co_return Status::Ok();
  AlignedBuffer l1(walked);
  Status s = co_await file_.ReadZeroPadded(l1_offset, l1.span());
  if (!s.ok()) {
    Msg("ERROR: I/O error in check_refcounts_l1");
    res_.check_errors++;
    co_return s;
  }
  AlignedBuffer l2(cs());
  constexpr uint32_t kBlock = 512;  // entries: a block of zeros is passed over whole
  for (uint32_t i = 0; i < walked / 8; i++) {
    if (i % kBlock == 0 &&
        AllZero(l1.span().subspan(uint64_t{i} * 8,
                                  std::min<uint64_t>(kBlock * 8, walked - uint64_t{i} * 8)))) {
      i += kBlock - 1;
      continue;
    }
    const uint64_t entry = LoadBE64(l1.span(), uint64_t{i} * 8);
    if (entry == 0) continue;
    if (entry & kL1ReservedMask) {
      Msg("ERROR found L1 entry with reserved bits set: {:x}", entry);
      res_.corruptions++;
    }
    const uint64_t l2_offset = entry & kL1OffsetMask;
    CO_RETURN_IF_ERROR(Inc(l2_offset, cs()));
    if (l2_offset & (cs() - 1)) {
      Msg("ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted", l2_offset);
      res_.corruptions++;
    }
    CO_RETURN_IF_ERROR(
        co_await CheckL2(l2_offset, l2, flags, fix, active ? int64_t{i} : int64_t{-1}));
  }
  co_return Status::Ok();
}

ClusterType CheckPass::TypeOf(uint64_t entry) const {
  if (entry & kEntryCompressed) return ClusterType::kCompressed;
  if ((entry & kEntryZero) && !g_.extended_l2) {
    return (entry & kL2OffsetMask) ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
  }
  if (!(entry & kL2OffsetMask)) {
    // Offset 0 is a valid data file offset; COPIED tells it apart.
    return (has_data_file() && (entry & kEntryCopied)) ? ClusterType::kNormal
                                                       : ClusterType::kUnallocated;
  }
  return ClusterType::kNormal;
}

Task<Status> CheckPass::CheckL2(uint64_t l2_offset, AlignedBuffer& buf, int flags, int fix,
                                int64_t l1_index) {
  Status s = co_await file_.ReadZeroPadded(l2_offset, buf.span());
  if (!s.ok()) {
    Msg("ERROR: I/O error in check_refcounts_l2");
    res_.check_errors++;
    co_return s;
  }
  std::span<std::byte> table = buf.span();
  // An entry of zeros (and a zero bitmap) is unallocated with nothing to
  // check or count; a table of nothing else is skipped whole.
  if (AllZero(table)) co_return Status::Ok();
  const uint32_t esz = g_.l2_entry_bytes;
  uint64_t next_contiguous_offset = 0;
  for (uint64_t i = 0; i < g_.l2_entries; i++) {
    uint64_t entry = LoadBE64(table, i * esz);
    const uint64_t bitmap = g_.extended_l2 ? LoadBE64(table, i * esz + 8) : 0;
    if (entry == 0 && bitmap == 0) continue;
    const ClusterType type = TypeOf(entry);
    if (type != ClusterType::kCompressed && (entry & kL2StdReservedMask)) {
      Msg("ERROR found l2 entry with reserved bits set: {:x}", entry);
      res_.corruptions++;
    }
    switch (type) {
      case ClusterType::kCompressed: {
        const L2Entry e{entry, bitmap};
        if (entry & kEntryCopied) {
          Msg("ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
              e.compressed_offset(g_));
          entry &= ~kEntryCopied;
          res_.corruptions++;
        }
        if (has_data_file()) {
          Msg("ERROR compressed cluster {} with data file, entry={:#x}", i, entry);
          res_.corruptions++;
          break;
        }
        if (bitmap) {
          Msg("ERROR compressed cluster {} with non-zero subcluster allocation bitmap, "
              "entry={:#x}",
              i, entry);
          res_.corruptions++;
          break;
        }
        const uint64_t coffset = L2Entry{entry, 0}.compressed_offset(g_);
        const uint64_t csize = L2Entry{entry, 0}.compressed_length(g_);
        CO_RETURN_IF_ERROR(Inc(coffset, csize));
        NoteOverlap(coffset >> cb(), l1_index, i, "compressed");
        if ((coffset + csize - 1) >> cb() != coffset >> cb()) {
          NoteOverlap((coffset + csize - 1) >> cb(), l1_index, i, "compressed");
        }
        if (flags & kFragInfo) {
          res_.allocated_clusters++;
          res_.compressed_clusters++;
          // Compressed clusters are fragmented by nature.
          res_.fragmented_clusters++;
        }
        break;
      }
      case ClusterType::kZeroAlloc:
      case ClusterType::kNormal: {
        const uint64_t offset = entry & kL2OffsetMask;
        if ((bitmap >> 32) & bitmap) {
          res_.corruptions++;
          Msg("ERROR offset={:x}: Allocated cluster has corrupted subcluster allocation bitmap",
              offset);
        }
        if (offset & (cs() - 1)) {
          res_.corruptions++;
          const bool contains_data =
              g_.extended_l2 ? (bitmap & kL2BitmapAllAlloc) != 0 : !(entry & kEntryZero);
          if (!contains_data) {
            Msg("{} offset={:x}: Preallocated cluster is not properly aligned; L2 entry "
                "corrupted.",
                (fix & kFixErrors) ? "Repairing" : "ERROR", offset);
            if (fix & kFixErrors) {
              Status fixed = co_await FixL2EntryByZero(l2_offset, table, i);
              if (fixed.ok()) continue;  // the cluster is unused now
              // Could not fix: keep checking the rest of the table.
            }
          } else {
            Msg("ERROR offset={:x}: Data cluster is not properly aligned; L2 entry corrupted.",
                offset);
          }
        }
        if (flags & kFragInfo) {
          res_.allocated_clusters++;
          if (next_contiguous_offset && offset != next_contiguous_offset) {
            res_.fragmented_clusters++;
          }
          next_contiguous_offset = offset + cs();
        }
        if (!has_data_file()) {
          CO_RETURN_IF_ERROR(Inc(offset, cs()));
          NoteOverlap(offset >> cb(), l1_index, i, "data");
        }
        break;
      }
      case ClusterType::kZeroPlain:
        break;
      case ClusterType::kUnallocated:
        if (bitmap & kL2BitmapAllAlloc) {
          res_.corruptions++;
          Msg("ERROR: Unallocated cluster has non-zero subcluster allocation map");
        }
        break;
    }
  }
  co_return Status::Ok();
}

Task<Status> CheckPass::FixL2EntryByZero(uint64_t l2_offset, std::span<std::byte> table,
                                         uint64_t i) {
  const uint32_t esz = g_.l2_entry_bytes;
  if (g_.extended_l2) {
    uint64_t bitmap = LoadBE64(table, i * esz + 8);
    bitmap |= bitmap << 32;
    bitmap &= kL2BitmapAllZeroes;
    StoreBE64(table, i * esz, 0);
    StoreBE64(table, i * esz + 8, bitmap);
  } else {
    StoreBE64(table, i * esz, kEntryZero);
  }
  // Write the 512-byte sector holding the entry.
  const uint64_t sector = (i * esz) & ~(kSectorSize - 1);
  Status s = co_await file_.Write(l2_offset + sector, table.subspan(sector, kSectorSize));
  if (s.ok()) s = co_await file_.Sync();
  if (!s.ok()) {
    Msg("ERROR: Failed to overwrite L2 table entry: {}", s.message());
    res_.check_errors++;
    co_return s;
  }
  res_.corruptions--;
  res_.corruptions_fixed++;
  co_return Status::Ok();
}

Task<Status> CheckPass::CheckRefblocks(int fix, bool* rebuild) {
  const std::vector<uint64_t>& table = stored_->table();
  for (uint64_t i = 0; i < table.size(); i++) {
    const uint64_t offset = table[i] & kRefcountTableOffsetMask;
    const uint64_t cluster = offset >> cb();
    if (table[i] & kReftableReservedMask) {
      Msg("ERROR refcount table entry {} has reserved bits set", i);
      res_.corruptions++;
      *rebuild = true;
      continue;
    }
    if (offset & (cs() - 1)) {
      Msg("ERROR refcount block {} is not cluster aligned; refcount table entry corrupted", i);
      res_.corruptions++;
      *rebuild = true;
      continue;
    }
    if (cluster >= imrt_->size()) {
      res_.corruptions++;
      Msg("{} refcount block {} is outside image", (fix & kFixErrors) ? "Repairing" : "ERROR", i);
      if (fix & kFixErrors) {
        Status s = co_await ExtendFileToCover(offset, cluster);
        if (s.ok()) {
          res_.corruptions--;
          res_.corruptions_fixed++;
          CO_RETURN_IF_ERROR(Inc(offset, cs()));
          // Just allocated and zeroed: its refcount can only be 1.
          continue;
        }
        *rebuild = true;
        Msg("ERROR could not resize image: {}", s.message());
      }
      continue;
    }
    if (offset != 0) {
      CO_RETURN_IF_ERROR(Inc(offset, cs()));
      const uint64_t r = imrt_->Get(cluster);
      if (r != 1) {
        Msg("ERROR refcount block {} refcount={}", i, r);
        res_.corruptions++;
        *rebuild = true;
      }
    }
  }
  co_return Status::Ok();
}

Task<Status> CheckPass::ExtendFileToCover(uint64_t offset, uint64_t cluster) {
  const uint64_t new_size = offset + cs();
  if (imrt_->BytesFor(DivRoundUp(new_size, cs())) > options_.max_memory_bytes ||
      DivRoundUp(new_size, cs()) > kMaxCheckClusters) {
    co_return Status::NoSpace(
        fmt::format("growing the file to {} bytes is beyond the check's limits", new_size));
  }
  CO_RETURN_IF_ERROR(file_.Truncate(new_size));
  CO_ASSIGN_OR_RETURN(file_size_, file_.Size());
  CO_RETURN_IF_ERROR(imrt_->Resize(DivRoundUp(file_size_, cs())));
  if (cluster >= imrt_->size()) co_return Status::IoError("the file did not grow", EINVAL);
  co_return Status::Ok();
}

}  // namespace uq::qcow2::check_internal
