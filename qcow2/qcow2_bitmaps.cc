// Persistent dirty bitmaps of a Qcow2Image (see "persistent dirty bitmaps"
// in qcow2_image.h): loading, the operations of `qemu-img bitmap`, tracking
// guest writes, and storing them back. QEMU's docs/interop/qcow2.txt is the
// reference for the layout; block/qcow2-bitmap.c for what QEMU accepts, its
// messages and the default granularity.
//
// Storing (StoreBitmapsLocked) never changes a table or directory in place:
// each bitmap whose bits changed gets new data clusters and a new table, the
// directory goes to new clusters, all of it is flushed, then one header
// write names the new directory; the old clusters are freed after. A crash
// therefore leaves the old list or the new one. The one in-place write is
// MarkBitmapsInUse's (only flag words change, each inside one sector).
#include <fmt/format.h>

#include <algorithm>

#include "base/endian.h"
#include "qcow2/format.h"
#include "qcow2/qcow2_image.h"

namespace uq::qcow2 {
namespace {

uint64_t DivRoundUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

}  // namespace

std::vector<BitmapSummary> Qcow2Image::bitmaps() const {
  std::vector<BitmapSummary> out;
  for (const TrackedBitmap& b : bitmaps_) {
    out.push_back({b.entry.name, b.entry.granularity(), b.entry.enabled(), b.entry.in_use()});
  }
  return out;
}

Qcow2Image::TrackedBitmap* Qcow2Image::FindBitmap(const std::string& name) {
  for (TrackedBitmap& b : bitmaps_) {
    if (b.entry.name == name) return &b;
  }
  return nullptr;
}

Task<Status> Qcow2Image::LoadBitmapDirectory() {
  CO_ASSIGN_OR_RETURN(std::vector<BitmapDirEntry> entries,
                      co_await ReadBitmapDirectory(*file_, header_));
  bitmaps_.clear();
  CO_ASSIGN_OR_RETURN(auto tables,
                      co_await ReadConsistentBitmapTables(*file_, entries, geo_.cluster_size));
  for (size_t i = 0; i < entries.size(); i++) {
    TrackedBitmap& t = bitmaps_.emplace_back(TrackedBitmap{entries[i], nullptr});
    if (writable_) t.table_at_open = std::move(tables[i]);
  }
  disk_bitmaps_ = std::move(entries);
  co_return Status::Ok();
}

Task<Result<std::vector<uint64_t>>> Qcow2Image::ReadBitmapTable(const BitmapDirEntry& e) {
  CO_ASSIGN_OR_RETURN(std::vector<uint64_t> table,
                      co_await uq::qcow2::ReadBitmapTable(*file_, e, geo_.cluster_size));
  CO_RETURN_IF_ERROR(CheckBitmapTableInFile(e, table));
  co_return table;
}

Status Qcow2Image::CheckBitmapTableInFile(const BitmapDirEntry& e,
                                          std::span<const uint64_t> table) const {
  // Before we read or free what an entry names: its cluster inside the file (QEMU would
  // read zeros past the end; check calls such an entry an error).
  for (size_t i = 0; i < table.size(); i++) {
    const uint64_t offset = table[i] & kBitmapTableEntryOffset;
    if (offset != 0 && offset + geo_.cluster_size > std::max(file_size_, grown_end_)) {
      return Status::Corruption(fmt::format(
          "{}: bitmap '{}': bitmap table entry {} (0x{:016x}) points past the end of the file",
          path(), e.name, i, table[i]));
    }
  }
  return Status::Ok();
}

Task<Result<std::shared_ptr<DirtyBitmap>>> Qcow2Image::LoadBitmapBits(
    const BitmapDirEntry& e, const std::vector<uint64_t>* given) {
  if (e.in_use()) {
    co_return Status::InvalidArgument(
        fmt::format("Bitmap '{}' is inconsistent and cannot be used", e.name));
  }
  std::vector<uint64_t> read;
  if (given == nullptr) {
    CO_ASSIGN_OR_RETURN(read, co_await ReadBitmapTable(e));
    given = &read;
  }
  const std::vector<uint64_t>& table = *given;
  auto bits = std::make_shared<DirtyBitmap>(size(), e.granularity_bits);
  const uint64_t cs = geo_.cluster_size;
  const uint64_t total = bits->SerializedBytes();
  AlignedBuffer buf(cs);
  for (size_t i = 0; i < table.size() && i * cs < total; i++) {
    const uint64_t n = std::min(cs, total - i * cs);
    const uint64_t offset = table[i] & kBitmapTableEntryOffset;
    if (offset == 0) {
      if (table[i] & kBitmapTableEntryAllOnes) bits->SetSerializedOnes(i * cs, n);
      continue;
    }
    CO_RETURN_IF_ERROR(co_await file_->ReadZeroPadded(offset, buf.span()));
    bits->Deserialize(i * cs, buf.span().first(n));
  }
  co_return bits;
}

void Qcow2Image::RebuildTracking() {
  std::vector<std::shared_ptr<DirtyBitmap>> tracking;
  for (const TrackedBitmap& b : bitmaps_) {
    if (b.bits && b.entry.enabled() && !b.entry.in_use()) tracking.push_back(b.bits);
  }
  tracking_ = std::move(tracking);
}

Task<Status> Qcow2Image::OpenBitmapsForWriting() {
  const uint64_t cs = geo_.cluster_size;
  auto protect = [&](uint64_t offset, uint64_t bytes) {
    for (uint64_t c = offset / cs; bytes > 0 && c <= (offset + bytes - 1) / cs; c++)
      metadata_clusters_.insert(c);
  };
  if (const BitmapsExtension* ext = ActiveBitmapsExtension(header_)) {
    protect(ext->directory_offset, ext->directory_size);
  }
  for (TrackedBitmap& b : bitmaps_) {
    protect(b.entry.table_offset, uint64_t{b.entry.table_size} * 8);
    // Each table read once: the open read the consistent ones already.
    std::vector<uint64_t> table;
    if (b.table_at_open) {
      table = std::move(*b.table_at_open);
      b.table_at_open.reset();
      CO_RETURN_IF_ERROR(CheckBitmapTableInFile(b.entry, table));
    } else {
      CO_ASSIGN_OR_RETURN(table, co_await ReadBitmapTable(b.entry));
    }
    for (uint64_t t : table) {
      if (t & kBitmapTableEntryOffset)
        metadata_clusters_.insert((t & kBitmapTableEntryOffset) / cs);
    }
    // Enabled, consistent bitmaps follow every write from now on.
    if (b.entry.enabled() && !b.entry.in_use()) {
      CO_ASSIGN_OR_RETURN(b.bits, co_await LoadBitmapBits(b.entry, &table));
    }
  }
  RebuildTracking();
  co_return Status::Ok();
}

Task<Status> Qcow2Image::MarkBitmapsDirty(uint64_t offset, uint64_t length) {
  if (!bitmaps_marked_in_use_.load(std::memory_order_acquire)) {
    auto lock = co_await bitmap_mark_mutex_.Acquire();
    if (!bitmaps_marked_in_use_.load(std::memory_order_acquire)) {
      CO_RETURN_IF_ERROR(co_await MarkBitmapsInUse());
      bitmaps_marked_in_use_.store(true, std::memory_order_release);
    }
  }
  for (const auto& b : tracking_) b->Set(offset, length);
  co_return Status::Ok();
}

Task<Status> Qcow2Image::MarkBitmapsInUse(bool every) {
  const BitmapsExtension* ext = ActiveBitmapsExtension(header_);
  if (ext == nullptr) co_return Status::Ok();
  // The directory as it is on disk, with the bitmaps the writes change
  // marked: those we track that are stored there. The others (disabled, or
  // added since the last store) stay as they are, consistent.
  std::vector<BitmapDirEntry> entries = disk_bitmaps_;
  bool changed = false;
  for (BitmapDirEntry& e : entries) {
    for (const auto& t : bitmaps_) {
      const bool tracked = t.bits && t.entry.enabled() && !t.entry.in_use();
      if (t.entry.name == e.name && (tracked || every) && !t.entry_is_new && !e.in_use()) {
        e.flags |= kBitmapInUse;
        changed = true;
      }
    }
  }
  if (!changed) co_return Status::Ok();
  std::vector<std::byte> dir = SerializeBitmapDirectory(entries);
  if (dir.size() != ext->directory_size) {
    co_return Status::Corruption(fmt::format("{}: the bitmap directory is {} bytes, its entries {}",
                                             path(), ext->directory_size, dir.size()));
  }
  // Whole sectors (O_DIRECT): the directory's cluster holds the rounded-up
  // tail, which may lie past the end of the file (QEMU writes the directory's
  // bytes only). Only flag words change, each inside one sector: a torn
  // write leaves some bitmaps marked, which is safe before any data changes.
  AlignedBuffer buf(DivRoundUp(dir.size(), kSectorSize) * kSectorSize);
  CO_RETURN_IF_ERROR(co_await file_->ReadZeroPadded(ext->directory_offset, buf.span()));
  std::copy(dir.begin(), dir.end(), buf.span().begin());
  CO_RETURN_IF_ERROR(co_await file_->Write(ext->directory_offset, buf.span()));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  bitmaps_in_use_on_disk_ = true;
  co_return Status::Ok();
}

// --- resize ---

Task<Status> Qcow2Image::PrepareBitmapsForResize(uint64_t new_size) {
  if (bitmaps_.empty()) co_return Status::Ok();
  const uint64_t cs = geo_.cluster_size;
  for (const TrackedBitmap& b : bitmaps_) {
    if (b.entry.in_use() && !b.entry_is_new) {
      // QEMU refuses to open the image for writing at all then.
      co_return Status::InvalidArgument(
          fmt::format("{}: Bitmap '{}' is inconsistent and cannot be used", path(), b.entry.name));
    }
    const uint64_t bits = DivRoundUp(new_size, b.entry.granularity());
    if (DivRoundUp(DivRoundUp(bits, 8), cs) * cs > kMaxBitmapBytes) {
      co_return Status::InvalidArgument(
          fmt::format("{}: can't resize: bitmap '{}' would pass the limit of {} MiB of bits",
                      path(), b.entry.name, kMaxBitmapBytes >> 20));
    }
  }
  std::vector<std::string> names;
  for (const TrackedBitmap& b : bitmaps_) names.push_back(b.entry.name);
  for (const std::string& name : names) CO_RETURN_IF_ERROR((co_await UsableBitmap(name)).status());
  CO_RETURN_IF_ERROR(co_await MarkBitmapsInUse(true));
  bitmaps_marked_in_use_.store(true, std::memory_order_release);
  co_return Status::Ok();
}

Task<void> Qcow2Image::ResizeBitmaps(uint64_t new_size) {
  if (bitmaps_.empty()) co_return;
  // No write may set bits on another thread while the bitmaps are replaced.
  co_await RevokeShared(SharedMap::After::kPublish);
  for (TrackedBitmap& b : bitmaps_) {
    auto resized = std::make_shared<DirtyBitmap>(new_size, b.entry.granularity_bits);
    for (const auto& e : b.bits->DirtyExtents()) resized->Set(e.offset, e.length);
    b.bits = std::move(resized);
    b.changed = true;
  }
  bitmaps_list_changed_ = true;
  RebuildTracking();
}

// --- the operations of qemu-img bitmap ---

Status Qcow2Image::AddBitmap(const std::string& name, std::optional<uint64_t> granularity,
                             bool enabled) {
  if (FindBitmap(name) != nullptr) {
    return Status::InvalidArgument(fmt::format("Bitmap already exists: {}", name));
  }
  // QEMU's default (bdrv_get_default_bitmap_granularity): the cluster size
  // within 4 KiB..64 KiB.
  const uint64_t g = granularity.value_or(std::clamp<uint64_t>(geo_.cluster_size, 4096, 65536));
  if (g < 512 || (g & (g - 1)) != 0 || g > (uint64_t{1} << kMaxBitmapGranularityBits)) {
    return Status::InvalidArgument("Granularity must be power of 2 and at least 512");
  }
  auto refuse = [&](std::string_view why) {
    return Status::InvalidArgument(
        fmt::format("Can't make bitmap '{}' persistent in '{}': {}", name, path(), why));
  };
  if (header_.version < 3) return refuse("Cannot store dirty bitmaps in qcow2 v2 files");
  if (bitmaps_.size() >= kMaxBitmaps) {
    return refuse("Maximum number of persistent bitmaps is already reached");
  }
  if (name.size() > kMaxBitmapNameSize) {
    return refuse(fmt::format("Name length exceeds maximum ({} characters)", kMaxBitmapNameSize));
  }
  uint64_t dir_bytes = 0;
  for (const TrackedBitmap& b : bitmaps_) {
    dir_bytes += (kBitmapEntryFixedBytes + b.entry.name.size() + 7) & ~uint64_t{7};
  }
  if (dir_bytes + ((kBitmapEntryFixedBytes + name.size() + 7) & ~uint64_t{7}) >
      kMaxBitmapDirectorySize) {
    return refuse("Not enough space in the bitmap directory");
  }
  const uint8_t bits = static_cast<uint8_t>(__builtin_ctzll(g));
  auto data = std::make_shared<DirtyBitmap>(size(), bits);
  if (DivRoundUp(data->SerializedBytes(), geo_.cluster_size) * geo_.cluster_size >
      kMaxBitmapBytes) {
    return refuse("Too large bitmap");
  }
  TrackedBitmap b;
  b.entry.name = name;
  b.entry.granularity_bits = bits;
  b.entry.flags = enabled ? kBitmapAuto : 0;
  b.bits = std::move(data);
  b.changed = true;
  b.entry_is_new = true;
  bitmaps_.push_back(std::move(b));
  bitmaps_list_changed_ = true;
  RebuildTracking();
  return Status::Ok();
}

Status Qcow2Image::RemoveBitmap(const std::string& name) {
  TrackedBitmap* b = FindBitmap(name);
  if (b == nullptr)
    return Status::InvalidArgument(fmt::format("Dirty bitmap '{}' not found", name));
  bitmaps_.erase(bitmaps_.begin() + (b - bitmaps_.data()));
  bitmaps_list_changed_ = true;
  RebuildTracking();
  return Status::Ok();
}

Task<Result<Qcow2Image::TrackedBitmap*>> Qcow2Image::UsableBitmap(const std::string& name) {
  TrackedBitmap* b = FindBitmap(name);
  if (b == nullptr)
    co_return Status::InvalidArgument(fmt::format("Dirty bitmap '{}' not found", name));
  if (b->entry.in_use() && !b->entry_is_new) {
    co_return Status::InvalidArgument(
        fmt::format("Bitmap '{}' is inconsistent and cannot be used", name));
  }
  if (!b->bits) {
    const std::string wanted = name;
    CO_ASSIGN_OR_RETURN(std::shared_ptr<DirtyBitmap> bits, co_await LoadBitmapBits(b->entry));
    b = FindBitmap(wanted);  // the list may not change meanwhile, but be safe
    if (b == nullptr)
      co_return Status::InvalidArgument(fmt::format("Dirty bitmap '{}' not found", name));
    b->bits = std::move(bits);
  }
  co_return b;
}

Task<Status> Qcow2Image::ClearBitmap(const std::string& name) {
  CO_ASSIGN_OR_RETURN(TrackedBitmap * b, co_await UsableBitmap(name));
  b->bits->Clear();
  b->changed = true;
  bitmaps_list_changed_ = true;
  co_return Status::Ok();
}

Task<Status> Qcow2Image::EnableBitmap(const std::string& name, bool enabled) {
  CO_ASSIGN_OR_RETURN(TrackedBitmap * b, co_await UsableBitmap(name));
  b->entry.flags = enabled ? (b->entry.flags | kBitmapAuto) : (b->entry.flags & ~kBitmapAuto);
  bitmaps_list_changed_ = true;
  RebuildTracking();
  co_return Status::Ok();
}

Task<Status> Qcow2Image::MergeBitmap(const std::string& name, const DirtyBitmap& source) {
  CO_ASSIGN_OR_RETURN(TrackedBitmap * b, co_await UsableBitmap(name));
  b->bits->Merge(source);
  b->changed = true;
  bitmaps_list_changed_ = true;
  co_return Status::Ok();
}

Task<Result<std::shared_ptr<const DirtyBitmap>>> Qcow2Image::BitmapContents(
    const std::string& name) {
  CO_ASSIGN_OR_RETURN(TrackedBitmap * b, co_await UsableBitmap(name));
  co_return std::shared_ptr<const DirtyBitmap>(b->bits);
}

// --- storing ---

Task<Result<uint64_t>> Qcow2Image::WriteBitmapData(const DirtyBitmap& bits,
                                                   std::vector<uint64_t>* written) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t total = bits.SerializedBytes();
  const uint64_t entries = std::max<uint64_t>(1, DivRoundUp(total, cs));
  std::vector<std::byte> table(entries * 8);
  std::vector<std::byte> chunk(cs);
  for (uint64_t i = 0; i < entries && i * cs < total; i++) {
    const uint64_t n = std::min(cs, total - i * cs);
    std::fill(chunk.begin(), chunk.end(), std::byte{0});
    bits.Serialize(i * cs, std::span(chunk).first(n));
    // All-zero clusters are not written: entry 0 reads as zeros (QEMU's way).
    if (std::all_of(chunk.begin(), chunk.end(), [](std::byte b) { return b == std::byte{0}; })) {
      continue;
    }
    CO_ASSIGN_OR_RETURN(const uint64_t at, co_await WriteTableClusters(chunk));
    written->push_back(at);
    StoreBE64(table, i * 8, at);
  }
  CO_ASSIGN_OR_RETURN(const uint64_t at, co_await WriteTableClusters(table));
  written->push_back(at);
  co_return at;
}

Task<Status> Qcow2Image::ReleaseBitmapClusters(const BitmapDirEntry& e) {
  CO_ASSIGN_OR_RETURN(std::vector<uint64_t> table, co_await ReadBitmapTable(e));
  for (uint64_t t : table) {
    if (t & kBitmapTableEntryOffset)
      ReleaseCluster((t & kBitmapTableEntryOffset) / geo_.cluster_size);
  }
  ReleaseRange(e.table_offset, uint64_t{e.table_size} * 8);
  co_return Status::Ok();
}

Task<Result<std::vector<std::pair<uint64_t, uint64_t>>>> Qcow2Image::BitmapRanges() {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  const BitmapsExtension* ext = ActiveBitmapsExtension(header_);
  if (ext == nullptr) co_return ranges;
  ranges.emplace_back(ext->directory_offset, ext->directory_size);
  for (const BitmapDirEntry& e : disk_bitmaps_) {
    CO_ASSIGN_OR_RETURN(std::vector<uint64_t> table, co_await ReadBitmapTable(e));
    ranges.emplace_back(e.table_offset, uint64_t{e.table_size} * 8);
    for (uint64_t t : table) {
      if (t & kBitmapTableEntryOffset)
        ranges.emplace_back(t & kBitmapTableEntryOffset, geo_.cluster_size);
    }
  }
  co_return ranges;
}

Task<Status> Qcow2Image::DropBitmaps(const std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
  auto lock = co_await meta_mutex_.Acquire();
  bitmaps_.clear();
  disk_bitmaps_.clear();
  RebuildTracking();
  bitmaps_list_changed_ = false;
  bitmaps_in_use_on_disk_ = false;
  bitmaps_marked_in_use_.store(false, std::memory_order_release);
  for (const auto& [offset, bytes] : ranges) ReleaseRange(offset, bytes);
  // The decrements reach the file now rather than at Close.
  co_return co_await FlushLocked();
}

bool Qcow2Image::BitmapsNeedStore() const {
  return bitmaps_list_changed_ || bitmaps_in_use_on_disk_;
}

Task<Status> Qcow2Image::StoreBitmaps() {
  CO_RETURN_IF_ERROR(CheckWritable(0, 0));
  CO_RETURN_IF_ERROR(co_await Flush());
  auto lock = co_await meta_mutex_.Acquire();
  co_return co_await StoreBitmapsLocked();
}

Task<Status> Qcow2Image::ChangeBitmapsLive(std::function<Task<Status>()> change) {
  CO_RETURN_IF_ERROR(CheckWritable(0, 0));
  co_await RevokeShared(SharedMap::After::kPublish);
  Status changed = co_await change();
  Status stored = co_await StoreBitmaps();
  co_return changed.ok() ? stored : changed;
}

Task<Status> Qcow2Image::StoreBitmapsLocked() {
  if (!BitmapsNeedStore()) co_return Status::Ok();
  const uint64_t cs = geo_.cluster_size;
  // The new list: bitmaps whose bits changed (or that we tracked) get new
  // clusters; the others keep their tables.
  std::vector<BitmapDirEntry> entries;
  std::vector<uint64_t> written;  // new clusters, released on failure
  auto undo = [&] {
    for (uint64_t at : written) ReleaseCluster(at / cs);
  };
  for (TrackedBitmap& b : bitmaps_) {
    BitmapDirEntry e = b.entry;
    const bool tracked = b.bits && e.enabled() && !(e.in_use() && !b.entry_is_new);
    if (b.changed || b.entry_is_new || (tracked && bitmaps_in_use_on_disk_)) {
      Result<uint64_t> at = co_await WriteBitmapData(*b.bits, &written);
      if (!at.ok()) {
        undo();
        co_return at.status();
      }
      e.table_offset = *at;
      e.table_size =
          static_cast<uint32_t>(std::max<uint64_t>(1, DivRoundUp(b.bits->SerializedBytes(), cs)));
      e.flags &= ~kBitmapInUse;
    }
    entries.push_back(std::move(e));
  }
  const std::vector<std::byte> dir = SerializeBitmapDirectory(entries);
  uint64_t dir_offset = 0;
  if (!dir.empty()) {
    Result<uint64_t> at = co_await WriteTableClusters(dir);
    if (!at.ok()) {
      undo();
      co_return at.status();
    }
    dir_offset = *at;
    written.push_back(dir_offset);
  }
  // Everything the new directory names is stable before the header names it.
  Status st = co_await FlushLocked();
  Header updated = header_;
  if (entries.empty()) {
    updated.bitmaps.reset();
    updated.autoclear_features &= ~kAutoclearBitmaps;
  } else {
    updated.bitmaps =
        BitmapsExtension{static_cast<uint32_t>(entries.size()), dir.size(), dir_offset};
    updated.autoclear_features |= kAutoclearBitmaps;
  }
  if (st.ok()) st = co_await WriteHeader(*file_, updated);
  if (st.ok()) st = co_await file_->Sync();
  if (!st.ok()) {
    // Directory clusters span more than one cluster: release them all.
    if (!dir.empty()) {
      written.pop_back();
      ReleaseRange(dir_offset, dir.size());
    }
    undo();
    co_return st;
  }
  // The old directory and the tables no entry names any more are unreferenced.
  const std::vector<BitmapDirEntry> old_entries = disk_bitmaps_;
  const std::optional<BitmapsExtension> old_ext = header_.bitmaps;
  header_ = std::move(updated);
  if (old_ext) ReleaseRange(old_ext->directory_offset, old_ext->directory_size);
  for (const BitmapDirEntry& old : old_entries) {
    const bool kept = std::any_of(entries.begin(), entries.end(), [&](const BitmapDirEntry& e) {
      return e.table_offset == old.table_offset;
    });
    if (!kept) CO_RETURN_IF_ERROR(co_await ReleaseBitmapClusters(old));
  }
  for (size_t i = 0; i < bitmaps_.size(); i++) {
    bitmaps_[i].entry = entries[i];
    bitmaps_[i].changed = false;
    bitmaps_[i].entry_is_new = false;
  }
  disk_bitmaps_ = entries;
  bitmaps_list_changed_ = false;
  bitmaps_in_use_on_disk_ = false;
  bitmaps_marked_in_use_.store(false, std::memory_order_release);
  co_return co_await FlushLocked();
}

}  // namespace uq::qcow2
