// Amending a Qcow2Image's options in place (qemu-img amend): the version
// (compat), lazy refcounts, data_file_raw, the data file's name and the size.
//
// Crash safety: every step ends in one write of the header (the switch
// point), made after Flush() has made stable everything the new header names
// or relies on, and synced before the next step:
//   - upgrade: a snapshot table rewritten with v3's extra data goes to new
//     clusters, and the header names it together with version 3; the old
//     table is freed after;
//   - downgrade: zero clusters become what version 2 can hold one L2 table at
//     a time (new clusters zeroed and counted before the table naming them is
//     written; every state in between reads the same in version 3), then the
//     header says version 2;
//   - feature bits: the header alone.
// A crash therefore leaves the old or the new header over a consistent image
// (leaked clusters at worst).
//
// Known gap: where a snapshot-only table maps as a preallocated zero cluster
// one that the active L1 maps as data (QEMU never makes such an image: it
// copies a shared cluster before it clears its zero flag), the snapshot's
// entry gets a new cluster and the active entry is left without the COPIED
// flag over a refcount of 1, which `qemu-img check -r all` repairs.
#include <fmt/format.h>

#include <algorithm>
#include <set>
#include <vector>

#include "base/endian.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/format.h"
#include "qcow2/qcow2_image.h"

namespace uq::qcow2 {

Task<Status> Qcow2Image::Amend(const AmendOptions& o) {
  CO_RETURN_IF_ERROR(CheckWritable(0, 0));
  CO_RETURN_IF_ERROR(co_await CheckAmend(o));
  const uint32_t old_version = header_.version;
  const uint32_t new_version = o.version.value_or(old_version);

  // Upgrade first: what follows may need version 3.
  if (new_version > old_version) CO_RETURN_IF_ERROR(co_await UpgradeToV3());

  if (o.refcount_bits && *o.refcount_bits != header_.refcount_bits()) {
    // Whether every refcount fits the new width is found out here, after an
    // upgrade the same command asked for, as in QEMU (qcow2_amend_options).
    CO_RETURN_IF_ERROR(co_await SetRefcountBits(static_cast<int>(*o.refcount_bits)));
  }

  Header updated = header_;
  if (o.data_file_raw) {
    if (*o.data_file_raw) {
      updated.autoclear_features |= kAutoclearDataFileRaw;
    } else {
      updated.autoclear_features &= ~kAutoclearDataFileRaw;
    }
  }
  if (o.data_file) {
    updated.data_file = o.data_file->empty() ? std::nullopt : std::optional(*o.data_file);
  }
  if (o.lazy_refcounts) {
    // A dirty image had its refcounts rebuilt and the bit cleared when it was
    // opened for writing (OpenImage), so turning lazy refcounts off needs no
    // repair here; nor does this engine ever leave counts behind.
    if (*o.lazy_refcounts) {
      updated.compatible_features |= kCompatLazyRefcounts;
    } else {
      updated.compatible_features &= ~kCompatLazyRefcounts;
    }
  }
  if (updated.autoclear_features != header_.autoclear_features ||
      updated.compatible_features != header_.compatible_features ||
      updated.data_file != header_.data_file) {
    CO_RETURN_IF_ERROR(co_await RewriteHeader(std::move(updated)));
  }

  if (o.size != 0 && o.size != size()) {
    CO_RETURN_IF_ERROR(co_await Resize(o.size, Preallocation::kOff));
  }

  // Downgrade last, once nothing version 2 cannot hold is asked for.
  if (new_version < old_version) CO_RETURN_IF_ERROR(co_await DowngradeToV2());
  co_return Status::Ok();
}

Task<Status> Qcow2Image::CheckAmend(const AmendOptions& o) {
  auto refuse = [this](std::string_view why) {
    return Status::InvalidArgument(fmt::format("{}: {}", path(), why));
  };
  auto unsupported = [this](std::string_view why) {
    return Status::NotSupported(fmt::format("{}: {}", path(), why));
  };
  // In QEMU's order (qcow2_amend_options): the option checks, then those of
  // each step.
  if (luks_ && o.version && *o.version < header_.version) {
    // Expanding zero clusters writes plain zeros, which an encrypted image
    // would read as the decryption of zeros.
    co_return unsupported("downgrading an encrypted image is not supported");
  }
  if (o.data_file && !header_.has_data_file()) {
    co_return refuse("data-file can only be set for images that use an external data file");
  }
  if (o.data_file_raw && *o.data_file_raw && !header_.data_file_raw()) {
    co_return refuse("data-file-raw cannot be set on existing images");
  }
  const uint32_t new_version = o.version.value_or(header_.version);
  const uint32_t bits = o.refcount_bits.value_or(header_.refcount_bits());
  if (bits != header_.refcount_bits()) {
    if (new_version < 3 && bits != 16) {
      co_return refuse(
          "Refcount widths other than 16 bits require compatibility level 1.1 or above (use "
          "compat=1.1 or greater)");
    }
  }
  if (o.lazy_refcounts && *o.lazy_refcounts && !header_.lazy_refcounts() && new_version < 3) {
    co_return refuse(
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 "
        "or greater)");
  }
  const uint64_t new_size = o.size != 0 ? o.size : size();
  if (o.size != 0 && o.size != size()) {
    if (o.size % kSectorSize != 0) co_return refuse("The new size must be a multiple of 512");
    if (std::max(new_version, header_.version) < 3 && !snapshots_.empty()) {
      co_return unsupported("Can't resize a v2 image which has snapshots");
    }
  }
  if (new_version < header_.version) {
    if (bits != 16) co_return unsupported("compat=0.10 requires refcount_bits=16");
    if (header_.has_data_file())
      co_return unsupported("Cannot downgrade an image with a data file");
    for (const Snapshot& s : snapshots_) {
      if (s.vm_state_size > UINT32_MAX || s.disk_size.value_or(new_size) != new_size) {
        co_return unsupported("Internal snapshots prevent downgrade of image");
      }
    }
    const uint64_t incompatible =
        header_.incompatible_features & ~(kIncompatCompression | kIncompatDirty);
    if (incompatible != 0) {
      co_return unsupported(fmt::format(
          "Cannot downgrade an image with incompatible features 0x{:x} set", incompatible));
    }
    if (header_.incompatible_features & kIncompatCompression) {
      CO_ASSIGN_OR_RETURN(const bool compressed, co_await HasCompressedClusters());
      if (compressed) {
        co_return unsupported(
            "Cannot downgrade an image with zstd compression type and existing compressed "
            "clusters");
      }
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::RewriteHeader(Header updated) {
  auto lock = co_await meta_mutex_.Acquire();
  CO_RETURN_IF_ERROR(co_await FlushLocked());
  CO_RETURN_IF_ERROR(co_await WriteHeader(*file_, updated));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  header_ = std::move(updated);
  co_return Status::Ok();
}

Task<Status> Qcow2Image::UpgradeToV3() {
  const uint64_t cs = geo_.cluster_size;
  Header updated = header_;
  updated.version = 3;
  updated.header_length = kV3HeaderLengthWithCompression;
  updated.incompatible_features = 0;
  updated.compatible_features = 0;
  updated.autoclear_features = 0;
  updated.refcount_order = 4;
  updated.compression_type = kCompressionDeflate;
  updated.unknown_fields.clear();
  updated.feature_names = QemuFeatureNames(cs);

  // Version 3 wants each snapshot's 64-bit VM state size and disk size in its
  // extra data; old entries lack them. QEMU then writes every entry with all
  // the extra data it knows (24 bytes): an absent disk size as the current
  // size, an absent icount as -1, as it reads them.
  std::vector<Snapshot> snapshots = snapshots_;
  bool rewrite = false;
  for (Snapshot& s : snapshots) {
    if (s.extra_data.size() < kSnapshotV3MinExtraData) {
      rewrite = true;
    }
  }
  if (rewrite) {
    for (Snapshot& s : snapshots) {
      if (!s.disk_size) s.disk_size = size();
      if (!s.icount) s.icount = -1;
    }
  }
  auto lock = co_await meta_mutex_.Acquire();
  CO_RETURN_IF_ERROR(co_await FlushLocked());
  const uint64_t old_table = header_.snapshots_offset;
  const uint64_t old_clusters = (SnapshotTableSize(snapshots_) + cs - 1) / cs;
  uint64_t clusters = 0;
  if (rewrite) {
    CO_RETURN_IF_ERROR(ValidateSnapshotTableForWrite(snapshots));
    std::vector<std::byte> bytes = SerializeSnapshotTable(snapshots);
    clusters = (bytes.size() + cs - 1) / cs;
    CO_ASSIGN_OR_RETURN(const uint64_t table, co_await refcounts_->Allocate(clusters));
    for (uint64_t c = 0; c < clusters; c++) metadata_clusters_.insert(table / cs + c);
    file_size_ = std::max(file_size_, table + clusters * cs);
    AlignedBuffer contents(clusters * cs);
    std::copy(bytes.begin(), bytes.end(), contents.span().begin());
    Status written = co_await file_->Write(table, contents.span());
    // The new table and its refcounts are stable before the header names it.
    if (written.ok()) written = co_await FlushLocked();
    if (!written.ok()) {
      for (uint64_t c = 0; c < clusters; c++) ReleaseCluster(table / cs + c);
      co_return written;
    }
    updated.snapshots_offset = table;
  }
  CO_RETURN_IF_ERROR(co_await WriteHeader(*file_, updated));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  header_ = std::move(updated);
  if (!rewrite) co_return Status::Ok();
  snapshots_ = std::move(snapshots);
  for (uint64_t c = 0; c < old_clusters; c++) ReleaseCluster(old_table / cs + c);
  co_return co_await FlushLocked();
}

Task<Result<bool>> Qcow2Image::HasCompressedClusters() {
  const uint64_t cs = geo_.cluster_size;
  CO_RETURN_IF_ERROR(co_await Flush());
  AlignedBuffer table(cs);
  for (uint64_t l1e : l1_) {
    const uint64_t offset = l1e & kL1OffsetMask;
    if (offset == 0) continue;
    CO_RETURN_IF_ERROR(co_await file_->ReadExact(offset, table.span()));
    for (uint64_t i = 0; i < geo_.l2_entries; i++) {
      if (LoadBE64(table.span(), i * geo_.l2_entry_bytes) & kEntryCompressed) co_return true;
    }
  }
  co_return false;
}

Task<Status> Qcow2Image::DowngradeToV2() {
  const uint64_t cs = geo_.cluster_size;
  CO_RETURN_IF_ERROR(co_await Flush());
  // Every L2 table of the active L1 and of each snapshot's, once, the active
  // ones first: a table that gives up its share of a cluster (a preallocated
  // zero cluster another table maps) must never leave an active entry
  // without the COPIED flag over a refcount of 1, which qemu-img check calls
  // corrupt, and only the active tables are checked for that flag.
  std::vector<uint64_t> tables;
  std::set<uint64_t> seen;
  auto add = [&](uint64_t l1_entry) {
    const uint64_t table = l1_entry & kL1OffsetMask;
    if (table != 0 && seen.insert(table).second) tables.push_back(table);
  };
  for (uint64_t e : l1_) add(e);
  CO_ASSIGN_OR_RETURN(const uint64_t file_size, file_->Size());
  for (size_t i = 0; i < snapshots_.size(); i++) {
    const Snapshot& s = snapshots_[i];
    CO_RETURN_IF_ERROR(ValidateSnapshotL1Table(s, i, cs, file_size));
    const uint64_t bytes = uint64_t{s.l1_size} * 8;
    if (bytes == 0) continue;
    AlignedBuffer l1((bytes + 511) / 512 * 512);
    CO_RETURN_IF_ERROR(co_await file_->ReadExact(s.l1_table_offset, l1.span().first(bytes)));
    for (uint64_t j = 0; j < s.l1_size; j++) {
      add(LoadBE64(l1.span(), j * 8));
    }
  }
  // Snapshot-only tables are metadata too: no zeroing may hit one.
  for (uint64_t table : tables) metadata_clusters_.insert(table / cs);
  for (uint64_t table : tables) CO_RETURN_IF_ERROR(co_await ExpandZeroClusters(table));

  Header updated = header_;
  updated.version = 2;
  updated.header_length = kV2HeaderLength;
  updated.incompatible_features = 0;
  updated.compatible_features = 0;
  updated.autoclear_features = 0;
  updated.compression_type = kCompressionDeflate;
  updated.unknown_fields.clear();
  updated.feature_names.clear();  // QEMU writes no feature table into version 2
  // Version 2 has no autoclear bits, so it cannot hold persistent bitmaps:
  // the version-2 header names none, and their clusters are released once
  // it is stable (a crash between the two leaks them, nothing worse). QEMU
  // keeps the extension, which version 2 ignores, and leaks the clusters
  // for good: qemu-img check reports them.
  CO_ASSIGN_OR_RETURN(const auto bitmap_ranges, co_await BitmapRanges());
  updated.bitmaps.reset();
  CO_RETURN_IF_ERROR(co_await RewriteHeader(std::move(updated)));
  co_return co_await DropBitmaps(bitmap_ranges);
}

Task<Status> Qcow2Image::ExpandZeroClusters(uint64_t table) {
  const uint64_t cs = geo_.cluster_size;
  AlignedBuffer contents(cs);
  CO_RETURN_IF_ERROR(co_await file_->ReadExact(table, contents.span()));
  uint64_t l2_refcount = 0;
  {
    auto lock = co_await meta_mutex_.Acquire();
    CO_ASSIGN_OR_RETURN(l2_refcount, co_await refcounts_->Get(table / cs));
  }
  if (l2_refcount == 0) {
    co_return Status::Corruption(
        fmt::format("{}: L2 table at {:#x} has refcount 0", path(), table));
  }
  bool changed = false;
  // References the old entries held that the new ones drop, released once
  // the table is on disk.
  std::vector<uint64_t> dropped;
  for (uint64_t i = 0; i < geo_.l2_entries; i++) {
    const uint64_t e = LoadBE64(contents.span(), i * 8);
    if ((e & kEntryCompressed) || !(e & kEntryZero)) continue;
    uint64_t host = e & kL2OffsetMask;
    uint64_t entry = 0;
    // Whether the entry needs a cluster of zeros: unallocated it would read
    // the backing file; a preallocated one stays allocated, as QEMU keeps it.
    const bool needs_cluster = backing_ != nullptr || host != 0;
    if (host != 0 && !geo_.cluster_aligned(host)) {
      co_return co_await MarkCorrupt(fmt::format(
          "L2 table at {:#x}: entry {} has an unaligned host offset {:#x}", table, i, host));
    }
    if (host != 0) {
      // Zeroing it must not hit metadata (QEMU's overlap check).
      CO_RETURN_IF_ERROR(co_await CheckNoOverlap(host, cs));
      // A preallocated zero cluster: zeros written into it, the flag cleared
      // (QEMU's way), unless another table maps it too, where it may hold
      // data (QEMU 7.2 zeroes it all the same, and a snapshot loses data):
      // then it gets a new cluster.
      uint64_t refcount = 0;
      {
        auto lock = co_await meta_mutex_.Acquire();
        CO_ASSIGN_OR_RETURN(refcount, co_await refcounts_->Get(host / cs));
      }
      if (refcount == l2_refcount) {
        CO_RETURN_IF_ERROR(co_await WriteZeroBytes(*file_, host, cs));
        // An earlier table may have let go of its share: the flag follows
        // the refcount as it is now.
        entry = host | (refcount == 1 ? kEntryCopied : 0);
      } else {
        for (uint64_t k = 0; k < l2_refcount; k++) dropped.push_back(host / cs);
        host = 0;
      }
    }
    if (host == 0 && needs_cluster) {
      // A new cluster of zeros, counted once per L1 table sharing this table.
      CO_ASSIGN_OR_RETURN(host, co_await AllocateWholeCluster());
      {
        auto lock = co_await meta_mutex_.Acquire();
        for (uint64_t k = 1; k < l2_refcount; k++) {
          CO_RETURN_IF_ERROR(co_await refcounts_->Increment(host / cs));
        }
      }
      CO_RETURN_IF_ERROR(co_await WriteZeroBytes(*file_, host, cs));
      entry = host | (l2_refcount == 1 ? kEntryCopied : 0);
    }
    StoreBE64(contents.span(), i * 8, entry);
    changed = true;
  }
  if (!changed) co_return Status::Ok();
  // The zeros and the new refcounts are stable before the table names them.
  CO_RETURN_IF_ERROR(co_await Flush());
  CO_RETURN_IF_ERROR(co_await file_->Write(table, contents.span()));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  auto lock = co_await meta_mutex_.Acquire();
  l2_cache_.Invalidate(table, cs);
  if (dropped.empty()) co_return Status::Ok();
  for (uint64_t c : dropped) ReleaseCluster(c);
  co_return co_await FlushLocked();
}

}  // namespace uq::qcow2
