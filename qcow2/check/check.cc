#include "qcow2/check/check.h"

#include <fmt/format.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <climits>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <utility>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/format.h"
#include "qcow2/geometry.h"
#include "qcow2/header.h"
#include "qcow2/l2_entry.h"
#include "qcow2/refcount_codec.h"
#include "qcow2/snapshot_table.h"

namespace uq::qcow2 {
namespace {

// Masks QEMU applies to table entries (block/qcow2.h).
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feull;
constexpr uint64_t kReftableReservedMask = 0x1ffull;
constexpr uint64_t kL2BitmapAllAlloc = 0x00000000ffffffffull;
constexpr uint64_t kL2BitmapAllZeroes = 0xffffffff00000000ull;
// QEMU refuses to check files of more than INT_MAX clusters.
constexpr uint64_t kMaxCheckClusters = INT_MAX;

// Bitmaps (block/qcow2-bitmap.c, block/qcow2.h).
constexpr size_t kBitmapDirEntryBytes = 24;
constexpr uint32_t kBmeMaxTableSize = 0x8000000;
constexpr uint64_t kBmeMaxPhysSize = 0x20000000;
constexpr uint32_t kBmeMaxGranularityBits = 31;
constexpr uint32_t kBmeMinGranularityBits = 9;
constexpr uint32_t kBmeReservedFlags = 0xfffffffcu;
constexpr uint32_t kBmeMaxNameSize = 1023;
constexpr uint8_t kBmeTypeDirtyTracking = 1;
constexpr uint64_t kBmeTableEntryReservedMask = 0xff000000000001feull;
constexpr uint64_t kBmeTableEntryOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kBmeTableEntryFlagAllOnes = 1;

// Header field offsets the repair rewrites.
constexpr uint64_t kOffRefcountTableOffset = 48;  // + refcount_table_clusters at 56
constexpr uint64_t kOffNbSnapshots = 60;          // + snapshots_offset at 64
constexpr uint64_t kOffIncompatibleFeatures = 72;

// QEMU's BdrvCheckMode bits.
enum FixMode : int { kNoFix = 0, kFixLeaks = 1, kFixErrors = 2 };
// Flag for CheckL1/CheckL2: count BlockFragInfo (active L1 only).
constexpr int kFragInfo = 2;

// The numeric part of a CheckResult, which QEMU saves and restores whole.
struct Counters {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
};

// A bitmap's table, from the bitmap directory.
struct BitmapTableRef {
  uint64_t offset;
  uint32_t size;  // entries
};

enum class ClusterType { kUnallocated, kZeroPlain, kZeroAlloc, kNormal, kCompressed };

// What QEMU prints for a failed operation: strerror of its errno.
std::string ErrorText(const Status& s) {
  return s.error_number() != 0 ? std::strerror(s.error_number()) : s.message();
}

// A failure that qemu-img reports as "Check failed: <strerror>".
Status Errno(int err) { return Status::IoError(std::strerror(err), err); }

uint64_t DivRoundUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }
uint64_t RoundUp(uint64_t a, uint64_t b) { return DivRoundUp(a, b) * b; }

// The in-memory refcount table: one entry per host cluster, in the image's
// refcount width, stored as whole refcount blocks (so block i is exactly the
// refcount block that describes clusters [i * entries_per_block, ...)).
class RefcountArray {
 public:
  RefcountArray(uint32_t cluster_bits, uint32_t order, uint64_t max_bytes)
      : cluster_bits_(cluster_bits),
        order_(order),
        entries_per_block_(RefcountEntriesPerBlock(cluster_bits, order)),
        max_bytes_(max_bytes) {}

  uint64_t size() const { return entries_; }
  uint64_t max() const { return MaxRefcount(order_); }

  // Bytes needed for `entries` entries.
  uint64_t BytesFor(uint64_t entries) const {
    return DivRoundUp(entries, entries_per_block_) << cluster_bits_;
  }

  // Grows (never shrinks) to `entries`, new entries zero.
  Status Resize(uint64_t entries) {
    if (entries <= entries_) return Status::Ok();
    uint64_t bytes = BytesFor(entries);
    if (entries > kMaxCheckClusters + entries_per_block_ || bytes > max_bytes_) {
      return Status::NoSpace(
          fmt::format("the in-memory refcount table for {} clusters would need {} bytes (limit {})",
                      entries, bytes, max_bytes_));
    }
    if (bytes > bytes_.size()) bytes_.resize(bytes);
    entries_ = entries;
    return Status::Ok();
  }

  void Clear() { std::fill(bytes_.begin(), bytes_.end(), std::byte{0}); }

  uint64_t Get(uint64_t i) const {
    assert(i < entries_);
    return GetRefcount(bytes_, i, order_);
  }
  void Set(uint64_t i, uint64_t v) {
    assert(i < entries_);
    SetRefcount(bytes_, i, order_, v);
  }

  // Refcount block `index`, cluster-sized. REQUIRES: it lies inside the array.
  std::span<const std::byte> Block(uint64_t index) const {
    return std::span<const std::byte>(bytes_).subspan(index << cluster_bits_,
                                                      uint64_t{1} << cluster_bits_);
  }

 private:
  const uint32_t cluster_bits_;
  const uint32_t order_;
  const uint64_t entries_per_block_;
  const uint64_t max_bytes_;
  uint64_t entries_ = 0;
  std::vector<std::byte> bytes_;  // a whole number of clusters
};

// The refcounts stored in the image: the refcount table in memory and a
// bounded cache of refcount blocks, written back whole.
class StoredRefcounts {
 public:
  StoredRefcounts(File& file, uint32_t cluster_bits, uint32_t order)
      : file_(file),
        cluster_bits_(cluster_bits),
        order_(order),
        block_bits_(cluster_bits + 3 - order),
        capacity_(std::clamp<uint64_t>((uint64_t{32} << 20) >> cluster_bits, 4, 256)) {}

  const std::vector<uint64_t>& table() const { return table_; }
  // Replaces the table. REQUIRES: no dirty blocks (Flush first).
  void SetTable(std::vector<uint64_t> table) {
    table_ = std::move(table);
    cache_.clear();
  }

  // The refcount block holding `cluster`'s entry, or nullptr if there is
  // none (the refcount is 0). IoError for an unaligned block offset (what
  // QEMU's qcow2_get_refcount returns: -EIO) or a failed read.
  Task<Result<std::byte*>> BlockFor(uint64_t cluster) {
    uint64_t offset = 0;
    std::byte* cached = nullptr;
    CO_RETURN_IF_ERROR(Lookup(cluster, &offset, &cached));
    if (offset == 0 || cached != nullptr) co_return cached;
    CO_ASSIGN_OR_RETURN(std::byte * loaded, co_await Load(offset));
    co_return loaded;
  }

  // Fast path: the refcount if it is known without I/O.
  std::optional<uint64_t> TryGet(uint64_t cluster) {
    uint64_t offset = 0;
    std::byte* cached = nullptr;
    if (!Lookup(cluster, &offset, &cached).ok()) return std::nullopt;
    if (offset == 0) return 0;
    if (cached == nullptr) return std::nullopt;
    return GetRefcount(BlockSpan(cached), IndexInBlock(cluster), order_);
  }

  Task<Result<uint64_t>> Get(uint64_t cluster) {
    if (std::optional<uint64_t> v = TryGet(cluster)) co_return *v;
    CO_ASSIGN_OR_RETURN(std::byte * block, co_await BlockFor(cluster));
    if (block == nullptr) co_return uint64_t{0};
    co_return GetRefcount(BlockSpan(block), IndexInBlock(cluster), order_);
  }

  // Sets `cluster`'s stored refcount (written back by Flush or eviction).
  // REQUIRES: a refcount block exists for it.
  Task<Status> Set(uint64_t cluster, uint64_t value) {
    CO_ASSIGN_OR_RETURN(std::byte * block, co_await BlockFor(cluster));
    if (block == nullptr) {
      co_return Status::Corruption(fmt::format("no refcount block covers cluster {}", cluster));
    }
    SetRefcount(std::span<std::byte>(block, uint64_t{1} << cluster_bits_), IndexInBlock(cluster),
                order_, value);
    MarkDirty(block);
    co_return Status::Ok();
  }

  // Marks the cached block at `block` (from BlockFor) as modified.
  void MarkDirty(const std::byte* block) {
    for (auto& [offset, e] : cache_) {
      if (e->data.data() == block) e->dirty = true;
    }
  }

  // Writes every dirty block back, whole.
  Task<Status> Flush() {
    for (auto& [offset, e] : cache_) {
      if (!e->dirty) continue;
      CO_RETURN_IF_ERROR(co_await file_.Write(e->offset, e->data.span()));
      e->dirty = false;
    }
    co_return Status::Ok();
  }

  uint64_t IndexInBlock(uint64_t cluster) const {
    return cluster & ((uint64_t{1} << block_bits_) - 1);
  }
  std::span<const std::byte> BlockSpan(const std::byte* block) const {
    return {block, uint64_t{1} << cluster_bits_};
  }

 private:
  struct Entry {
    uint64_t offset = 0;
    AlignedBuffer data;
    bool dirty = false;
    uint64_t stamp = 0;
  };

  Status Lookup(uint64_t cluster, uint64_t* offset, std::byte** cached) {
    uint64_t index = cluster >> block_bits_;
    *offset = 0;
    *cached = nullptr;
    if (index >= table_.size()) return Status::Ok();
    uint64_t off = table_[index] & kRefcountTableOffsetMask;
    if (off == 0) return Status::Ok();
    if (off & ((uint64_t{1} << cluster_bits_) - 1)) {
      return Status::IoError(
          fmt::format("Refblock offset {:#x} unaligned (reftable index: {:#x})", off, index), EIO);
    }
    *offset = off;
    auto it = cache_.find(off);
    if (it != cache_.end()) {
      it->second->stamp = ++clock_;
      *cached = it->second->data.data();
    }
    return Status::Ok();
  }

  Task<Result<std::byte*>> Load(uint64_t offset) {
    if (cache_.size() >= capacity_) {
      auto victim = std::min_element(
          cache_.begin(), cache_.end(),
          [](const auto& a, const auto& b) { return a.second->stamp < b.second->stamp; });
      if (victim->second->dirty) {
        CO_RETURN_IF_ERROR(co_await file_.Write(victim->first, victim->second->data.span()));
      }
      cache_.erase(victim);
    }
    auto e = std::make_unique<Entry>();
    e->offset = offset;
    e->data = AlignedBuffer(uint64_t{1} << cluster_bits_);
    CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(offset, e->data.span()));
    e->stamp = ++clock_;
    std::byte* p = e->data.data();
    cache_.emplace(offset, std::move(e));
    co_return p;
  }

  File& file_;
  const uint32_t cluster_bits_;
  const uint32_t order_;
  const uint32_t block_bits_;  // log2(entries per refcount block)
  const uint64_t capacity_;
  std::vector<uint64_t> table_;
  std::unordered_map<uint64_t, std::unique_ptr<Entry>> cache_;  // by block offset
  uint64_t clock_ = 0;
};

// Where the image's metadata lives, to name what a data cluster overlaps.
// Lookups are logarithmic except in the handful of fixed structures. When
// corrupt metadata itself overlaps, one of the candidates is named.
class MetadataMap {
 public:
  // A structure at clusters [first_cluster, first_cluster + clusters).
  void AddFixed(uint64_t first_cluster, uint64_t clusters, std::string label) {
    if (clusters > 0) fixed_.push_back({first_cluster, first_cluster + clusters, std::move(label)});
  }
  void AddSnapshotL1(uint64_t first_cluster, uint64_t clusters, std::string label) {
    if (clusters > 0) {
      snapshot_l1_.push_back({first_cluster, first_cluster + clusters, std::move(label)});
    }
  }
  void AddL2(uint64_t cluster) { l2_.push_back(cluster); }
  void AddRefblock(uint64_t cluster) { refblocks_.push_back(cluster); }
  // Call once everything is added, before Find.
  void Finish() {
    std::sort(snapshot_l1_.begin(), snapshot_l1_.end(),
              [](const Range& a, const Range& b) { return a.first < b.first; });
    std::sort(l2_.begin(), l2_.end());
    std::sort(refblocks_.begin(), refblocks_.end());
  }
  // The metadata at `cluster`, or nullptr.
  const std::string* Find(uint64_t cluster) const {
    for (const Range& r : fixed_) {
      if (cluster >= r.first && cluster < r.end) return &r.label;
    }
    auto after = std::upper_bound(snapshot_l1_.begin(), snapshot_l1_.end(), cluster,
                                  [](uint64_t c, const Range& r) { return c < r.first; });
    if (after != snapshot_l1_.begin() && cluster < std::prev(after)->end) {
      return &std::prev(after)->label;
    }
    if (std::binary_search(l2_.begin(), l2_.end(), cluster)) return &kL2Label;
    if (std::binary_search(refblocks_.begin(), refblocks_.end(), cluster)) return &kRefblockLabel;
    return nullptr;
  }

 private:
  struct Range {
    uint64_t first;
    uint64_t end;
    std::string label;
  };
  static inline const std::string kL2Label = "an active L2 table";
  static inline const std::string kRefblockLabel = "a refcount block";
  std::vector<Range> fixed_;
  std::vector<Range> snapshot_l1_;
  std::vector<uint64_t> l2_;
  std::vector<uint64_t> refblocks_;
};

// One run of QEMU's qcow2_co_check_locked: snapshot table, refcounts,
// COPIED flags, snapshot table repair, clean/consistent bits.
class CheckPass {
 public:
  CheckPass(File& file, const CheckOptions& options, CheckResult* out)
      : file_(file),
        options_(options),
        out_(*out),
        fix_(options.repair == RepairMode::kAll     ? (kFixLeaks | kFixErrors)
             : options.repair == RepairMode::kLeaks ? kFixLeaks
                                                    : kNoFix) {}

  // Non-OK only when there is nothing to check (see CheckImage).
  Task<Status> Run() {
    CO_RETURN_IF_ERROR(co_await Setup());
    Status s = co_await CheckAll();
    // Snapshots dropped off the table were repaired whatever followed.
    res_.corruptions_fixed += snapshot_fixed_;
    if (!s.ok()) {
      // QEMU: a negative return, "Check failed: <strerror>".
      out_.error = s.message();
    }
    CopyCounters();
    co_return Status::Ok();
  }

 private:
  // ---- messages and counters ----

  template <class... Args>
  void Msg(fmt::format_string<Args...> f, Args&&... args) {
    if (out_.messages.size() < options_.max_messages) {
      out_.messages.push_back(fmt::format(f, std::forward<Args>(args)...));
    } else {
      suppressed_++;
    }
  }

  void CopyCounters() {
    if (suppressed_ > 0) {
      out_.messages.push_back(fmt::format("({} more messages not shown)", suppressed_));
    }
    out_.corruptions = res_.corruptions;
    out_.leaks = res_.leaks;
    out_.check_errors = res_.check_errors;
    out_.corruptions_fixed = res_.corruptions_fixed;
    out_.leaks_fixed = res_.leaks_fixed;
    out_.allocated_clusters = res_.allocated_clusters;
    out_.fragmented_clusters = res_.fragmented_clusters;
    out_.compressed_clusters = res_.compressed_clusters;
  }

  uint64_t cs() const { return g_.cluster_size; }
  uint32_t cb() const { return g_.cluster_bits; }
  bool has_data_file() const { return h_.has_data_file(); }

  // ---- setup: header, sizes ----

  Task<Status> Setup() {
    CO_ASSIGN_OR_RETURN(file_size_, file_.Size());
    CO_ASSIGN_OR_RETURN(h_, co_await ReadHeaderForCheck());
    CO_RETURN_IF_ERROR(CheckHeaderForIo(h_, file_.path()));
    g_ = Geometry::From(h_);
    const uint64_t nb_clusters = DivRoundUp(file_size_, cs());
    if (nb_clusters > kMaxCheckClusters) {
      co_return Status::InvalidArgument(
          fmt::format("{}: the file has {} clusters; at most {} can be checked", file_.path(),
                      nb_clusters, kMaxCheckClusters));
    }
    imrt_.emplace(cb(), h_.refcount_order, options_.max_memory_bytes);
    Status s = imrt_->Resize(nb_clusters);
    if (!s.ok())
      co_return Status::InvalidArgument(
          fmt::format("{}: too large to check: {}", file_.path(), s.message()));
    stored_.emplace(file_, cb(), h_.refcount_order);
    // bs->total_sectors is the virtual size in whole sectors.
    out_.total_clusters = DivRoundUp(h_.size / kSectorSize * kSectorSize, cs());
    co_return Status::Ok();
  }

  // ReadHeader, except that an encrypted image is parsed too: the check needs
  // no key, only where the encryption header lies (QEMU opens for check
  // without decrypting).
  Task<Result<Header>> ReadHeaderForCheck() {
    AlignedBuffer probe(kHeaderProbeBytes);
    CO_ASSIGN_OR_RETURN(size_t n, co_await file_.Read(0, probe.span()));
    if (n < kHeaderProbeBytes)
      co_return ParseHeader(probe.span().first(n), file_size_, file_.path());
    uint32_t cluster_bits = LoadBE32(probe.span(), 20);
    if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits) {
      co_return ParseHeader(probe.span(), file_size_, file_.path());
    }
    AlignedBuffer first(std::min<uint64_t>(uint64_t{1} << cluster_bits, file_size_));
    CO_ASSIGN_OR_RETURN(size_t got, co_await file_.Read(0, first.span()));
    std::span<std::byte> bytes = first.span().first(got);
    // The snapshot table is the check's to judge (ReadSnapshots, with QEMU's
    // rules), not the header parser's, which refuses what qemu-img check
    // reports or repairs.
    uint32_t nb_snapshots = 0;
    if (bytes.size() >= kOffNbSnapshots + 4) {
      nb_snapshots = LoadBE32(bytes, kOffNbSnapshots);
      StoreBE32(bytes, kOffNbSnapshots, 0);
    }
    Result<Header> h = ParseHeader(bytes, file_size_, file_.path(), /*allow_encrypted=*/true);
    if (h.ok()) h->nb_snapshots = nb_snapshots;
    co_return h;
  }

  // ---- the whole check ----

  Task<Status> CheckAll() {
    CO_RETURN_IF_ERROR(co_await ReadSnapshots());
    Status s = co_await CheckRefcounts();
    if (!s.ok()) {
      res_.corruptions += snapshot_corruptions_;
      co_return s;
    }
    CO_RETURN_IF_ERROR(co_await FixSnapshotTable());
    if (fix_ != kNoFix && res_.check_errors == 0 && res_.corruptions == 0) {
      CO_RETURN_IF_ERROR(co_await MarkCleanAndConsistent());
    }
    co_return Status::Ok();
  }

  // qcow2_check_read_snapshot_table: QEMU's table limits, then the entries.
  // With repair, entries past the limits are dropped at once (the header's
  // count is rewritten; the clusters they held leak and the refcount check
  // frees them) and extra data over the limit is cut (the table is rewritten
  // by FixSnapshotTable, which needs consistent refcounts).
  Task<Status> ReadSnapshots() {
    const bool repair = (fix_ & kFixErrors) != 0;
    const uint32_t stored_count = h_.nb_snapshots;
    uint32_t count = stored_count;
    if (count > kMaxSnapshotCount && repair) {
      Msg("Discarding {} overhanging snapshots", count - kMaxSnapshotCount);
      count = kMaxSnapshotCount;
    }
    // qcow2_validate_table.
    if (count > kMaxSnapshotCount) {
      res_.check_errors++;
      Msg("ERROR snapshot table too large");
      Msg("You can force-remove all {} overhanging snapshots with qemu-img check -r all",
          count - kMaxSnapshotCount);
      co_return Errno(EFBIG);
    }
    if (uint64_t{INT64_MAX} - uint64_t{count} * kSnapshotEntryFixedBytes < h_.snapshots_offset ||
        (h_.snapshots_offset & (cs() - 1)) != 0) {
      res_.check_errors++;
      Msg("ERROR snapshot table offset invalid");
      co_return Errno(EINVAL);
    }

    Result<SnapshotTableScan> scan =
        co_await ReadSnapshotTableForCheck(file_, h_.snapshots_offset, count);
    if (!scan.ok()) {
      res_.check_errors++;
      Msg("ERROR failed to read the snapshot table: {}", scan.status().message());
      co_return scan.status();
    }
    // Without repair, QEMU fails on the first entry it would have to change.
    if (!repair && !scan->extra_data_cut.empty()) {
      res_.check_errors++;
      Msg("ERROR failed to read the snapshot table: Too much extra metadata in snapshot table "
          "entry {}",
          scan->extra_data_cut.front().first);
      Msg("You can force-remove this extra metadata with qemu-img check -r all");
      co_return Errno(EFBIG);
    }
    if (!repair && scan->dropped > 0) {
      res_.check_errors++;
      Msg("ERROR failed to read the snapshot table: Snapshot table is too big");
      Msg("You can force-remove all {} overhanging snapshots with qemu-img check -r all",
          scan->dropped);
      co_return Errno(EFBIG);
    }
    for (const auto& [index, size] : scan->extra_data_cut) {
      Msg("Discarding too much extra metadata in snapshot table entry {} ({} > {})", index, size,
          kMaxSnapshotExtraData);
    }
    snapshot_corruptions_ += scan->extra_data_cut.size();
    if (scan->dropped > 0) {
      Msg("Discarding {} overhanging snapshots (snapshot table is too big)", scan->dropped);
      count -= scan->dropped;
    }
    if (count != stored_count) {
      // Safe before the refcount check: the dropped entries' clusters leak.
      std::byte field[4];
      StoreBE32(field, 0, count);
      Status s = co_await file_.Write(kOffNbSnapshots, field);
      if (s.ok()) s = co_await file_.Sync();
      if (!s.ok()) {
        res_.check_errors++;
        Msg("ERROR failed to update the snapshot count in the image header: {}", ErrorText(s));
        co_return s;
      }
      h_.nb_snapshots = count;
      snapshot_fixed_ += stored_count - count;
    }
    snapshots_ = std::move(scan->snapshots);
    snapshots_size_ = scan->size_on_disk;
    for (size_t i = 0; i < snapshots_.size(); i++) {
      if (HasIncompleteExtraData(snapshots_[i], static_cast<int>(h_.version))) {
        snapshot_corruptions_++;
        Msg("{} snapshot table entry {} is incomplete", repair ? "Repairing" : "ERROR", i);
      }
    }
    co_return Status::Ok();
  }

  // qcow2_check_refcounts.
  Task<Status> CheckRefcounts() {
    CO_RETURN_IF_ERROR(co_await LoadRefcountTable());
    CO_RETURN_IF_ERROR(co_await BuildMetadataMap());
    bool rebuild = false;
    CO_RETURN_IF_ERROR(co_await CalculateRefcounts(fix_, &rebuild));

    // When only fixing, the compare is repeated with fixing on; its first
    // result is thrown away (QEMU's pre_compare_res).
    Counters pre_compare = res_;
    uint64_t highest = 0;
    CO_RETURN_IF_ERROR(co_await CompareRefcounts(kNoFix, &rebuild, &highest));

    if (rebuild && (fix_ & kFixErrors)) {
      Counters old = res_;
      uint64_t fresh_leaks = 0;
      Msg("Rebuilding refcount structure");
      Status s = co_await RebuildRefcountStructure();
      if (!s.ok()) {
        res_.check_errors++;
        co_return s;
      }
      res_.corruptions = 0;
      res_.leaks = 0;
      // The old refcount table has been replaced: count again.
      rebuild = false;
      imrt_->Clear();
      res_.allocated_clusters = res_.fragmented_clusters = res_.compressed_clusters = 0;
      CO_RETURN_IF_ERROR(co_await BuildMetadataMap());
      CO_RETURN_IF_ERROR(co_await CalculateRefcounts(kNoFix, &rebuild));
      if (fix_ & kFixLeaks) {
        // The old refcount structure is now leaked; free it. Leaks that
        // cannot be fixed were made by the rebuild and are reported.
        Counters saved = res_;
        res_ = Counters{};
        CO_RETURN_IF_ERROR(co_await CompareRefcounts(kFixLeaks, &rebuild, &highest));
        if (rebuild) Msg("ERROR rebuilt refcount structure is still broken");
        fresh_leaks = res_.leaks;
        res_ = saved;
      }
      if (res_.corruptions < old.corruptions) {
        res_.corruptions_fixed += old.corruptions - res_.corruptions;
      }
      if (res_.leaks < old.leaks) res_.leaks_fixed += old.leaks - res_.leaks;
      res_.leaks += fresh_leaks;
    } else if (fix_ != kNoFix) {
      if (rebuild) {
        Msg("ERROR need to rebuild refcount structures");
        res_.check_errors++;
        co_return Status::Corruption(
            "the refcount structure must be rebuilt, which only repairing all errors does");
      }
      if (res_.leaks || res_.corruptions) {
        res_ = pre_compare;
        CO_RETURN_IF_ERROR(co_await CompareRefcounts(fix_, &rebuild, &highest));
      }
    }

    CO_RETURN_IF_ERROR(co_await CheckOflagCopied());
    out_.image_end_offset = (highest + 1) * cs();
    co_return Status::Ok();
  }

  Task<Status> LoadRefcountTable() {
    const uint64_t bytes = uint64_t{h_.refcount_table_clusters} * cs();  // <= 8 MiB (ParseHeader)
    AlignedBuffer buf(bytes);
    Status s = co_await file_.ReadZeroPadded(h_.refcount_table_offset, buf.span());
    if (!s.ok()) {
      res_.check_errors++;
      co_return s;
    }
    std::vector<uint64_t> table(bytes / 8);
    for (size_t i = 0; i < table.size(); i++) table[i] = LoadBE64(buf.span(), i * 8);
    stored_->SetTable(std::move(table));
    co_return Status::Ok();
  }

  // ---- computing the references (calculate_refcounts) ----

  // qcow2_inc_refcounts_imrt.
  Status Inc(uint64_t offset, uint64_t size) {
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

  Task<Status> CalculateRefcounts(int fix, bool* rebuild) {
    // The header.
    CO_RETURN_IF_ERROR(Inc(0, cs()));
    // The active L1 table.
    CO_RETURN_IF_ERROR(co_await CheckL1(h_.l1_table_offset, h_.l1_size, kFragInfo, fix, true));
    // Snapshots.
    if (has_data_file() && !snapshots_.empty()) {
      Msg("ERROR {} snapshots in image with data file", snapshots_.size());
      res_.corruptions++;
    }
    for (const Snapshot& sn : snapshots_) {
      if (sn.l1_table_offset & (cs() - 1)) {
        Msg("ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot "
            "table entry corrupted",
            sn.id, sn.name, sn.l1_table_offset);
        res_.corruptions++;
        continue;
      }
      if (uint64_t{sn.l1_size} * 8 > kMaxL1Bytes) {
        Msg("ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry "
            "corrupted",
            sn.id, sn.name, sn.l1_size);
        res_.corruptions++;
        continue;
      }
      CO_RETURN_IF_ERROR(co_await CheckL1(sn.l1_table_offset, sn.l1_size, 0, fix, false));
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

  // check_refcounts_l1. `active`: the L1 table is the header's.
  Task<Status> CheckL1(uint64_t l1_offset, uint32_t l1_size, int flags, int fix, bool active) {
    if (l1_size == 0) co_return Status::Ok();
    const uint64_t bytes = uint64_t{l1_size} * 8;
    CO_RETURN_IF_ERROR(Inc(l1_offset, bytes));
    AlignedBuffer l1(bytes);
    Status s = co_await file_.ReadZeroPadded(l1_offset, l1.span());
    if (!s.ok()) {
      Msg("ERROR: I/O error in check_refcounts_l1");
      res_.check_errors++;
      co_return s;
    }
    AlignedBuffer l2(cs());
    for (uint32_t i = 0; i < l1_size; i++) {
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

  ClusterType TypeOf(uint64_t entry) const {
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

  // check_refcounts_l2. `l1_index` >= 0 for the active L1 (names the guest
  // offset in overlap messages).
  Task<Status> CheckL2(uint64_t l2_offset, AlignedBuffer& buf, int flags, int fix,
                       int64_t l1_index) {
    Status s = co_await file_.ReadZeroPadded(l2_offset, buf.span());
    if (!s.ok()) {
      Msg("ERROR: I/O error in check_refcounts_l2");
      res_.check_errors++;
      co_return s;
    }
    std::span<std::byte> table = buf.span();
    const uint32_t esz = g_.l2_entry_bytes;
    uint64_t next_contiguous_offset = 0;
    for (uint64_t i = 0; i < g_.l2_entries; i++) {
      uint64_t entry = LoadBE64(table, i * esz);
      const uint64_t bitmap = g_.extended_l2 ? LoadBE64(table, i * esz + 8) : 0;
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

  // fix_l2_entry_by_zero: makes entry `i` read as zeros (all its allocated
  // subclusters, with extended L2) and writes it back.
  Task<Status> FixL2EntryByZero(uint64_t l2_offset, std::span<std::byte> table, uint64_t i) {
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

  // qcow2_check_bitmaps_refcounts. Only a valid bitmaps extension counts: QEMU
  // ignores one whose autoclear bit is clear.
  Task<Status> CheckBitmaps() {
    if (!h_.bitmaps || !(h_.autoclear_features & kAutoclearBitmaps)) co_return Status::Ok();
    const BitmapsExtension& ext = *h_.bitmaps;
    if (ext.nb_bitmaps == 0 || ext.nb_bitmaps > kMaxBitmaps ||
        (ext.directory_offset & (cs() - 1)) || ext.directory_size == 0 ||
        ext.directory_size > kMaxBitmapDirectorySize) {
      res_.corruptions++;
      co_return Status::Corruption(
          fmt::format("invalid bitmaps extension ({} bitmaps, directory at {:#x}, {} bytes)",
                      ext.nb_bitmaps, ext.directory_offset, ext.directory_size));
    }
    CO_RETURN_IF_ERROR(Inc(ext.directory_offset, ext.directory_size));
    AlignedBuffer dir(ext.directory_size);
    CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(ext.directory_offset, dir.span()));

    std::vector<BitmapTableRef> tables;
    Status parsed = ParseBitmapDirectory(dir.span(), ext.nb_bitmaps, &tables);
    if (!parsed.ok()) {
      res_.corruptions++;
      co_return parsed;
    }
    for (const BitmapTableRef& t : tables) {
      const uint64_t bytes = uint64_t{t.size} * 8;
      CO_RETURN_IF_ERROR(Inc(t.offset, bytes));
      AlignedBuffer table(bytes);
      CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(t.offset, table.span()));
      // bitmap_table_load: one bad entry fails the whole table.
      for (uint32_t i = 0; i < t.size; i++) {
        const uint64_t entry = LoadBE64(table.span(), uint64_t{i} * 8);
        const uint64_t offset = entry & kBmeTableEntryOffsetMask;
        if ((entry & kBmeTableEntryReservedMask) ||
            (offset != 0 && ((entry & kBmeTableEntryFlagAllOnes) || (offset & (cs() - 1))))) {
          res_.corruptions++;
          co_return Status::Corruption(fmt::format(
              "bitmap table at {:#x}: entry {} ({:#x}) is invalid", t.offset, i, entry));
        }
      }
      for (uint32_t i = 0; i < t.size; i++) {
        const uint64_t offset = LoadBE64(table.span(), uint64_t{i} * 8) & kBmeTableEntryOffsetMask;
        if (offset != 0) CO_RETURN_IF_ERROR(Inc(offset, cs()));
      }
    }
    co_return Status::Ok();
  }

  // bitmap_list_load and check_dir_entry.
  Status ParseBitmapDirectory(std::span<const std::byte> dir, uint32_t nb_bitmaps,
                              std::vector<BitmapTableRef>* tables) const {
    const uint64_t disk_bytes = h_.size / kSectorSize * kSectorSize;
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
      bool bad = table_size == 0 || table_offset == 0 || (table_offset & (cs() - 1)) ||
                 table_size > kBmeMaxTableSize || granularity_bits > kBmeMaxGranularityBits ||
                 granularity_bits < kBmeMinGranularityBits || (flags & kBmeReservedFlags) ||
                 name_size > kBmeMaxNameSize || type != kBmeTypeDirtyTracking;
      if (!bad) {
        const uint64_t phys_bytes = uint64_t{table_size} * cs();
        // phys_bytes * 8 <= 2^32 and granularity_bits <= 31: no overflow.
        bad = phys_bytes > kBmeMaxPhysSize || disk_bytes > ((phys_bytes * 8) << granularity_bits);
      }
      if (bad) {
        return Status::Corruption(fmt::format("bitmap '{}' doesn't satisfy the constraints", name));
      }
      tables->push_back({table_offset, table_size});
      pos += entry_size;
    }
    if (count != nb_bitmaps) {
      return Status::Corruption("fewer bitmaps found than specified in the header extension");
    }
    return Status::Ok();
  }

  // check_refblocks.
  Task<Status> CheckRefblocks(int fix, bool* rebuild) {
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

  // Grows the file so that the refcount block at `offset` lies inside it.
  Task<Status> ExtendFileToCover(uint64_t offset, uint64_t cluster) {
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

  // ---- comparing with the stored refcounts (compare_refcounts) ----

  Task<Status> CompareRefcounts(int fix, bool* rebuild, uint64_t* highest) {
    *highest = 0;
    const uint64_t n = imrt_->size();
    const uint64_t per_block = RefcountEntriesPerBlock(cb(), h_.refcount_order);
    for (uint64_t base = 0; base < n; base += per_block) {
      const uint64_t end = std::min(n, base + per_block);
      Result<std::byte*> block = co_await stored_->BlockFor(base);
      for (uint64_t i = base; i < end; i++) {
        if (!block.ok()) {
          Msg("Can't get refcount for cluster {}: {}", i, ErrorText(block.status()));
          res_.check_errors++;
          continue;
        }
        const uint64_t stored = *block == nullptr
                                    ? 0
                                    : GetRefcount(stored_->BlockSpan(*block),
                                                  stored_->IndexInBlock(i), h_.refcount_order);
        const uint64_t computed = imrt_->Get(i);
        if (stored > 0 || computed > 0) *highest = i;
        if (stored == computed) continue;

        uint64_t* num_fixed = nullptr;
        if (stored == 0) {
          *rebuild = true;
        } else if (stored > computed && (fix & kFixLeaks)) {
          num_fixed = &res_.leaks_fixed;
        } else if (stored < computed && (fix & kFixErrors)) {
          num_fixed = &res_.corruptions_fixed;
        }
        Msg("{} cluster {} refcount={} reference={}",
            num_fixed != nullptr ? "Repairing"
            : stored < computed  ? "ERROR"
                                 : "Leaked",
            i, stored, computed);
        if (num_fixed != nullptr) {
          SetRefcount(std::span<std::byte>(*block, cs()), stored_->IndexInBlock(i),
                      h_.refcount_order, computed);
          stored_->MarkDirty(*block);
          dirty_ = true;
          if (computed == 0) freed_.push_back(i);
          (*num_fixed)++;
          continue;
        }
        if (stored < computed) {
          res_.corruptions++;
        } else {
          res_.leaks++;
        }
      }
    }
    if (dirty_) {
      Status s = co_await stored_->Flush();
      if (s.ok()) s = co_await file_.Sync();
      dirty_ = false;
      if (!s.ok()) {
        Msg("ERROR writing refcount blocks: {}", s.message());
        res_.check_errors++;
        co_return s;
      }
      co_await DiscardFreed();
    }
    co_return Status::Ok();
  }

  // Like QEMU (QCOW2_DISCARD_ALWAYS), hands clusters whose refcount dropped
  // to 0 back to the host file system. Advisory: failures are ignored.
  Task<void> DiscardFreed() {
    std::sort(freed_.begin(), freed_.end());
    for (size_t i = 0; i < freed_.size();) {
      size_t j = i + 1;
      while (j < freed_.size() && freed_[j] == freed_[j - 1] + 1) j++;
      const uint64_t offset = freed_[i] << cb();
      if (offset < file_size_) {
        const uint64_t length = std::min((j - i) << cb(), file_size_ - offset);
        (void)co_await file_.Discard(offset, length);
      }
      i = j;
    }
    freed_.clear();
  }

  // ---- COPIED flags (check_oflag_copied) ----

  Task<Status> CheckOflagCopied() {
    bool repair;
    if (fix_ & kFixErrors) {
      repair = true;
    } else if (fix_ & kFixLeaks) {
      // Only safe if the refcounts are now known to be right.
      repair = !res_.check_errors && !res_.corruptions && !res_.leaks;
    } else {
      repair = false;
    }
    if (h_.l1_size == 0) co_return Status::Ok();
    // Whole sectors, so that an entry is written back with its sector.
    const uint64_t l1_bytes = RoundUp(uint64_t{h_.l1_size} * 8, kSectorSize);
    AlignedBuffer l1(l1_bytes);
    CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(h_.l1_table_offset, l1.span()));
    AlignedBuffer l2(cs());
    bool wrote = false;
    for (uint32_t i = 0; i < h_.l1_size; i++) {
      const uint64_t l1_entry = LoadBE64(l1.span(), uint64_t{i} * 8);
      const uint64_t l2_offset = l1_entry & kL1OffsetMask;
      if (l2_offset == 0) continue;
      Result<uint64_t> refcount = co_await stored_->Get(l2_offset >> cb());
      if (!refcount.ok()) continue;  // already reported by the compare
      if ((*refcount == 1) != ((l1_entry & kEntryCopied) != 0)) {
        res_.corruptions++;
        Msg("{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}",
            repair ? "Repairing" : "ERROR", i, l1_entry, *refcount);
        if (repair) {
          StoreBE64(l1.span(), uint64_t{i} * 8,
                    *refcount == 1 ? l1_entry | kEntryCopied : l1_entry & ~kEntryCopied);
          const uint64_t sector = (uint64_t{i} * 8) & ~(kSectorSize - 1);
          Status s = co_await file_.Write(h_.l1_table_offset + sector,
                                          l1.span().subspan(sector, kSectorSize));
          if (!s.ok()) {
            res_.check_errors++;
            co_return s;
          }
          wrote = true;
          res_.corruptions--;
          res_.corruptions_fixed++;
        }
      }

      Status s = co_await file_.ReadZeroPadded(l2_offset, l2.span());
      if (!s.ok()) {
        Msg("ERROR: Could not read L2 table: {}", s.message());
        res_.check_errors++;
        co_return s;
      }
      uint64_t l2_dirty = 0;
      for (uint64_t j = 0; j < g_.l2_entries; j++) {
        const uint64_t at = j * g_.l2_entry_bytes;
        const uint64_t l2_entry = LoadBE64(l2.span(), at);
        const ClusterType type = TypeOf(l2_entry);
        if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) continue;
        uint64_t data_refcount = 1;  // data file clusters always have refcount 1
        if (!has_data_file()) {
          const uint64_t cluster = (l2_entry & kL2OffsetMask) >> cb();
          std::optional<uint64_t> fast = stored_->TryGet(cluster);
          if (fast) {
            data_refcount = *fast;
          } else {
            Result<uint64_t> r = co_await stored_->Get(cluster);
            if (!r.ok()) continue;
            data_refcount = *r;
          }
        }
        if ((data_refcount == 1) != ((l2_entry & kEntryCopied) != 0)) {
          res_.corruptions++;
          Msg("{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
              repair ? "Repairing" : "ERROR", l2_entry, data_refcount);
          if (repair) {
            StoreBE64(l2.span(), at,
                      data_refcount == 1 ? l2_entry | kEntryCopied : l2_entry & ~kEntryCopied);
            l2_dirty++;
          }
        }
      }
      if (l2_dirty > 0) {
        Status w = co_await file_.Write(l2_offset, l2.span());
        if (!w.ok()) {
          Msg("ERROR: Could not write L2 table: {}", w.message());
          res_.check_errors++;
          co_return w;
        }
        wrote = true;
        res_.corruptions -= l2_dirty;
        res_.corruptions_fixed += l2_dirty;
      }
    }
    if (wrote) CO_RETURN_IF_ERROR(co_await file_.Sync());
    co_return Status::Ok();
  }

  // ---- rebuilding the refcount structure ----

  // alloc_clusters_imrt: `count` contiguous free clusters at or after
  // *first_free, growing the array past its end if need be. Returns the
  // offset; *first_free moves to the first gap seen.
  Result<uint64_t> AllocClusters(uint64_t count, uint64_t* first_free) {
    uint64_t cluster = *first_free;
    uint64_t contiguous = 0;
    bool first_gap = true;
    for (; cluster < imrt_->size() && contiguous < count; cluster++) {
      if (imrt_->Get(cluster) == 0) {
        contiguous++;
        if (first_gap) {
          *first_free = cluster;
          first_gap = false;
        }
      } else {
        contiguous = 0;
      }
    }
    if (contiguous < count) {
      Status s = imrt_->Resize(cluster + count - contiguous);
      if (!s.ok()) return s;
    }
    cluster -= contiguous;
    for (uint64_t i = 0; i < count; i++) imrt_->Set(cluster + i, 1);
    return cluster << cb();
  }

  // rebuild_refcounts_write_refblocks: writes a refcount block (a slice of
  // the in-memory array) for every block that has a non-zero entry among
  // clusters [first, end), allocating blocks that have no place yet.
  // Returns whether the refcount table had to grow.
  Task<Result<bool>> WriteRefblocks(uint64_t first, uint64_t end, std::vector<uint64_t>* table) {
    const uint32_t block_bits = cb() + 3 - h_.refcount_order;
    const uint64_t per_block = uint64_t{1} << block_bits;
    uint64_t first_free = 0;
    bool grown = false;
    for (uint64_t cluster = first; cluster < end; cluster++) {
      if (imrt_->Get(cluster) == 0) continue;
      const uint64_t index = cluster >> block_bits;
      const uint64_t start = index << block_bits;
      uint64_t block_offset;
      if (index < table->size() && (*table)[index] != 0) {
        block_offset = (*table)[index];
      } else {
        // Never place a block inside a range already written to disk.
        if (first_free < start) first_free = start;
        CO_ASSIGN_OR_RETURN(block_offset, AllocClusters(1, &first_free));
        const uint64_t block_cluster = block_offset >> cb();
        // The block that holds this block's own refcount must be written too.
        if (block_cluster >= end) end = block_cluster + 1;
        if (table->size() <= index) {
          const uint64_t entries = RoundUp((index + 1) * 8, cs()) / 8;
          if (entries * 8 > kMaxRefcountTableBytes) {
            co_return Status::NoSpace(fmt::format(
                "the rebuilt refcount table would exceed {} bytes", kMaxRefcountTableBytes));
          }
          table->resize(entries, 0);
          grown = true;
        }
        (*table)[index] = block_offset;
      }
      CO_RETURN_IF_ERROR(co_await file_.Write(block_offset, imrt_->Block(index)));
      cluster = start + per_block - 1;  // this block is done
    }
    co_return grown;
  }

  // rebuild_refcount_structure: a new refcount table and blocks, built from
  // the computed refcounts in free clusters, then switched to in the header.
  // The old structure is left behind as leaked clusters.
  Task<Status> RebuildRefcountStructure() {
    std::vector<uint64_t> table;
    CO_ASSIGN_OR_RETURN(bool grown, co_await WriteRefblocks(0, imrt_->size(), &table));
    assert(grown);
    uint64_t table_offset = 0;
    uint64_t table_clusters = 0;
    do {
      uint64_t first_free = 0;
      table_clusters = DivRoundUp(table.size() * 8, cs());
      CO_ASSIGN_OR_RETURN(table_offset, AllocClusters(table_clusters, &first_free));
      const uint64_t start = table_offset >> cb();
      CO_ASSIGN_OR_RETURN(grown, co_await WriteRefblocks(start, start + table_clusters, &table));
    } while (grown);

    std::vector<std::byte> bytes(table_clusters * cs());
    for (size_t i = 0; i < table.size(); i++) StoreBE64(bytes, i * 8, table[i]);
    CO_RETURN_IF_ERROR(co_await file_.Write(table_offset, bytes));
    CO_RETURN_IF_ERROR(co_await file_.Sync());
    std::byte header[12];
    StoreBE64(header, 0, table_offset);
    StoreBE32(header, 8, static_cast<uint32_t>(table_clusters));
    CO_RETURN_IF_ERROR(co_await file_.Write(kOffRefcountTableOffset, header));
    CO_RETURN_IF_ERROR(co_await file_.Sync());

    h_.refcount_table_offset = table_offset;
    h_.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
    stored_->SetTable(std::move(table));
    CO_ASSIGN_OR_RETURN(file_size_, file_.Size());
    co_return Status::Ok();
  }

  // ---- snapshot table repair (qcow2_check_fix_snapshot_table) ----

  // Rewrites the snapshot table with complete extra data into newly
  // allocated clusters, then frees the old table. Only attempted when the
  // refcounts are known to be right, so that the in-memory refcounts can
  // allocate.
  Task<Status> FixSnapshotTable() {
    if (snapshot_corruptions_ == 0) co_return Status::Ok();
    if (!(fix_ & kFixErrors)) {
      res_.corruptions += snapshot_corruptions_;
      co_return Status::Ok();
    }
    if (res_.corruptions || res_.leaks || res_.check_errors) {
      res_.corruptions += snapshot_corruptions_;
      res_.check_errors++;
      Msg("ERROR failed to update snapshot table: the refcounts are not consistent");
      co_return Status::Corruption("failed to update snapshot table: inconsistent refcounts");
    }
    Status s = co_await RewriteSnapshotTable();
    if (!s.ok()) {
      res_.corruptions += snapshot_corruptions_;
      res_.check_errors++;
      Msg("ERROR failed to update snapshot table: {}", s.message());
      co_return s;
    }
    res_.corruptions_fixed += snapshot_corruptions_;
    co_return Status::Ok();
  }

  Task<Status> RewriteSnapshotTable() {
    std::vector<Snapshot> snapshots = snapshots_;
    const uint64_t disk_size = h_.size / kSectorSize * kSectorSize;
    for (Snapshot& sn : snapshots) {
      if (!sn.disk_size) sn.disk_size = disk_size;
      if (!sn.icount) sn.icount = -1;
    }
    CO_RETURN_IF_ERROR(ValidateSnapshotTableForWrite(snapshots));
    std::vector<std::byte> bytes = SerializeSnapshotTable(snapshots);
    const uint64_t clusters = DivRoundUp(bytes.size(), cs());
    uint64_t first_free = 0;
    CO_ASSIGN_OR_RETURN(uint64_t offset, AllocClusters(clusters, &first_free));
    // The new clusters' refcounts on disk; their refcount blocks must exist.
    for (uint64_t c = offset >> cb(); c < (offset >> cb()) + clusters; c++) {
      CO_RETURN_IF_ERROR(co_await stored_->Set(c, 1));
    }
    CO_RETURN_IF_ERROR(co_await stored_->Flush());
    CO_RETURN_IF_ERROR(co_await file_.Sync());
    bytes.resize(clusters * cs());
    CO_RETURN_IF_ERROR(co_await file_.Write(offset, bytes));
    CO_RETURN_IF_ERROR(co_await file_.Sync());
    std::byte header[12];
    StoreBE32(header, 0, static_cast<uint32_t>(snapshots.size()));
    StoreBE64(header, 4, offset);
    CO_RETURN_IF_ERROR(co_await file_.Write(kOffNbSnapshots, header));
    CO_RETURN_IF_ERROR(co_await file_.Sync());
    // Free the old table.
    if (snapshots_size_ == 0) {
      h_.snapshots_offset = offset;
      snapshots_ = std::move(snapshots);
      snapshots_size_ = SnapshotTableSize(snapshots_);
      co_return Status::Ok();
    }
    const uint64_t old_first = h_.snapshots_offset >> cb();
    const uint64_t old_last = (h_.snapshots_offset + snapshots_size_ - 1) >> cb();
    for (uint64_t c = old_first; c <= old_last; c++) {
      CO_ASSIGN_OR_RETURN(uint64_t r, co_await stored_->Get(c));
      if (r > 0) CO_RETURN_IF_ERROR(co_await stored_->Set(c, r - 1));
      if (r == 1) freed_.push_back(c);
      if (c < imrt_->size() && imrt_->Get(c) > 0) imrt_->Set(c, imrt_->Get(c) - 1);
    }
    CO_RETURN_IF_ERROR(co_await stored_->Flush());
    CO_RETURN_IF_ERROR(co_await file_.Sync());
    co_await DiscardFreed();
    h_.snapshots_offset = offset;
    snapshots_ = std::move(snapshots);
    snapshots_size_ = SnapshotTableSize(snapshots_);
    co_return Status::Ok();
  }

  // qcow2_mark_clean + qcow2_mark_consistent.
  Task<Status> MarkCleanAndConsistent() {
    if (h_.version < 3) co_return Status::Ok();
    const uint64_t bits = kIncompatDirty | kIncompatCorrupt;
    if (!(h_.incompatible_features & bits)) co_return Status::Ok();
    CO_RETURN_IF_ERROR(co_await file_.Sync());
    std::byte field[8];
    StoreBE64(field, 0, h_.incompatible_features & ~bits);
    CO_RETURN_IF_ERROR(co_await file_.Write(kOffIncompatibleFeatures, field));
    CO_RETURN_IF_ERROR(co_await file_.Sync());
    h_.incompatible_features &= ~bits;
    co_return Status::Ok();
  }

  // ---- overlap messages ----

  Task<Status> BuildMetadataMap() {
    map_ = MetadataMap{};
    map_.AddFixed(0, 1, "the image header");
    auto clusters_of = [this](uint64_t offset, uint64_t bytes) {
      if (bytes == 0) return uint64_t{0};
      return ((offset + bytes - 1) >> cb()) - (offset >> cb()) + 1;
    };
    map_.AddFixed(h_.l1_table_offset >> cb(), clusters_of(h_.l1_table_offset, h_.l1_size * 8ull),
                  "the active L1 table");
    map_.AddFixed(h_.refcount_table_offset >> cb(),
                  clusters_of(h_.refcount_table_offset, stored_->table().size() * 8),
                  "the refcount table");
    if (!snapshots_.empty()) {
      map_.AddFixed(h_.snapshots_offset >> cb(), clusters_of(h_.snapshots_offset, snapshots_size_),
                    "the snapshot table");
    }
    for (const Snapshot& sn : snapshots_) {
      map_.AddSnapshotL1(sn.l1_table_offset >> cb(),
                         clusters_of(sn.l1_table_offset, sn.l1_size * 8ull),
                         fmt::format("the L1 table of snapshot {}", sn.id));
    }
    if (h_.crypto) {
      map_.AddFixed(h_.crypto->offset >> cb(), clusters_of(h_.crypto->offset, h_.crypto->length),
                    "the encryption header");
    }
    if (h_.bitmaps && (h_.autoclear_features & kAutoclearBitmaps)) {
      map_.AddFixed(h_.bitmaps->directory_offset >> cb(),
                    clusters_of(h_.bitmaps->directory_offset, h_.bitmaps->directory_size),
                    "the bitmap directory");
    }
    for (uint64_t e : stored_->table()) {
      if ((e & kRefcountTableOffsetMask) != 0)
        map_.AddRefblock((e & kRefcountTableOffsetMask) >> cb());
    }
    if (h_.l1_size > 0) {
      AlignedBuffer l1(uint64_t{h_.l1_size} * 8);
      CO_RETURN_IF_ERROR(co_await file_.ReadZeroPadded(h_.l1_table_offset, l1.span()));
      for (uint32_t i = 0; i < h_.l1_size; i++) {
        const uint64_t off = LoadBE64(l1.span(), uint64_t{i} * 8) & kL1OffsetMask;
        if (off != 0) map_.AddL2(off >> cb());
      }
    }
    map_.Finish();
    co_return Status::Ok();
  }

  // Names the metadata that data cluster `cluster` overlaps, if any. Not
  // counted: the refcount comparison counts the double use.
  void NoteOverlap(uint64_t cluster, int64_t l1_index, uint64_t l2_index, const char* what) {
    const std::string* label = map_.Find(cluster);
    if (label == nullptr) return;
    if (l1_index >= 0) {
      const uint64_t guest = ((static_cast<uint64_t>(l1_index) << g_.l2_bits) + l2_index) << cb();
      Msg("Overlap: guest cluster at offset {:#x} ({}) is host cluster {}, which holds {}", guest,
          what, cluster, *label);
    } else {
      Msg("Overlap: a snapshot's {} cluster (L2 index {}) is host cluster {}, which holds {}", what,
          l2_index, cluster, *label);
    }
  }

  File& file_;
  const CheckOptions& options_;
  CheckResult& out_;
  const int fix_;
  uint64_t file_size_ = 0;
  Header h_;
  Geometry g_;
  std::optional<RefcountArray> imrt_;
  std::optional<StoredRefcounts> stored_;
  std::vector<Snapshot> snapshots_;
  uint64_t snapshots_size_ = 0;
  uint64_t snapshot_corruptions_ = 0;
  uint64_t snapshot_fixed_ = 0;  // snapshots dropped from the table (repaired)
  Counters res_;
  MetadataMap map_;
  bool dirty_ = false;
  std::vector<uint64_t> freed_;  // clusters freed by the current compare
  uint64_t suppressed_ = 0;
};

}  // namespace

Task<Result<CheckResult>> CheckImage(File& file, const CheckOptions& options) {
  CheckResult first;
  {
    CheckPass pass(file, options, &first);
    CO_RETURN_IF_ERROR(co_await pass.Run());
  }
  // Like qemu-img: after repairing something, check again and report that,
  // keeping the repair counts.
  if (!first.error.empty() || (first.corruptions_fixed == 0 && first.leaks_fixed == 0)) {
    co_return first;
  }
  CheckOptions again = options;
  again.repair = RepairMode::kNone;
  again.max_messages = options.max_messages > first.messages.size()
                           ? options.max_messages - first.messages.size()
                           : 0;
  CheckResult second;
  {
    CheckPass pass(file, again, &second);
    CO_RETURN_IF_ERROR(co_await pass.Run());
  }
  second.corruptions_fixed = first.corruptions_fixed;
  second.leaks_fixed = first.leaks_fixed;
  first.messages.insert(first.messages.end(), std::make_move_iterator(second.messages.begin()),
                        std::make_move_iterator(second.messages.end()));
  second.messages = std::move(first.messages);
  co_return second;
}

int CheckExitCode(const CheckResult& result) {
  if (!result.error.empty() || result.check_errors) return 1;
  if (result.corruptions) return 2;
  if (result.leaks) return 3;
  return 0;
}

std::string FormatCheckHuman(const CheckResult& r, const std::string& /*filename*/) {
  if (!r.error.empty()) return "";
  std::string out;
  if (r.corruptions_fixed || r.leaks_fixed) {
    out += fmt::format(
        "The following inconsistencies were found and repaired:\n\n"
        "    {} leaked clusters\n"
        "    {} corruptions\n\n"
        "Double checking the fixed image now...\n",
        r.leaks_fixed, r.corruptions_fixed);
  }
  if (!(r.corruptions || r.leaks || r.check_errors)) {
    out += "No errors were found on the image.\n";
  } else {
    if (r.corruptions) {
      out += fmt::format(
          "\n{} errors were found on the image.\n"
          "Data may be corrupted, or further writes to the image may corrupt it.\n",
          r.corruptions);
    }
    if (r.leaks) {
      out += fmt::format(
          "\n{} leaked clusters were found on the image.\n"
          "This means waste of disk space, but no harm to data.\n",
          r.leaks);
    }
    if (r.check_errors) {
      out += fmt::format("\n{} internal errors have occurred during the check.\n", r.check_errors);
    }
  }
  if (r.total_clusters != 0 && r.allocated_clusters != 0) {
    out += fmt::format(
        "{}/{} = {:.2f}% allocated, {:.2f}% fragmented, {:.2f}% compressed clusters\n",
        r.allocated_clusters, r.total_clusters, r.allocated_clusters * 100.0 / r.total_clusters,
        r.fragmented_clusters * 100.0 / r.allocated_clusters,
        r.compressed_clusters * 100.0 / r.allocated_clusters);
  }
  if (r.image_end_offset) out += fmt::format("Image end offset: {}\n", r.image_end_offset);
  return out;
}

std::vector<std::pair<std::string, CheckJsonValue>> CheckJsonFields(const CheckResult& r,
                                                                    const std::string& filename) {
  std::vector<std::pair<std::string, CheckJsonValue>> out;
  auto optional = [&out](const char* key, uint64_t v) {
    if (v != 0) out.emplace_back(key, v);
  };
  // qemu-img's order (that of its QDict's hash buckets).
  optional("image-end-offset", r.image_end_offset);
  optional("compressed-clusters", r.compressed_clusters);
  optional("total-clusters", r.total_clusters);
  optional("corruptions", r.corruptions);
  optional("corruptions-fixed", r.corruptions_fixed);
  out.emplace_back("check-errors", r.check_errors);
  optional("leaks", r.leaks);
  optional("leaks-fixed", r.leaks_fixed);
  optional("allocated-clusters", r.allocated_clusters);
  out.emplace_back("filename", filename);
  out.emplace_back("format", std::string("qcow2"));
  optional("fragmented-clusters", r.fragmented_clusters);
  return out;
}

}  // namespace uq::qcow2
