// Changing a Qcow2Image's refcount width (`qemu-img amend -o refcount_bits=N`,
// QEMU's qcow2_change_refcount_order): see SetRefcountBits in qcow2_image.h
// for the order of the writes and what a crash leaves.
//
// The new structures are laid out past everything the image uses now (the
// end of the file, less what was grown ahead of need, and the last cluster
// with a refcount), so the old structures never count them: until the
// header names them they are unreferenced bytes past the old end, which a
// check ignores (refcount 0, referenced by nothing). They count every
// cluster as the old ones do, except the old refcount table and blocks,
// which drop to 0, and themselves, at 1. Two passes over the old blocks, one
// block in memory at a time: the first checks that every refcount fits the
// new width and finds which new blocks are needed; the second writes them.
//
// What else knew the width: the Geometry (updated here), the Refcounts
// object (replaced by one loaded from the new structures); the codec is
// stateless, and check and info read the header afresh.
#include <fmt/format.h>

#include <algorithm>
#include <cassert>
#include <set>
#include <unordered_set>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/format.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/refcount_codec.h"

namespace uq::qcow2 {
namespace {

// The image's refcounts as the old (current, flushed) structures on disk
// hold them, less the one reference each old refcount table or block
// cluster holds for being one. Read one block at a time.
class OldRefcounts {
 public:
  // `table`: the old refcount table (a copy: the Refcounts object that holds
  // it is replaced before this one is done).
  OldRefcounts(File& file, const Header& h, std::vector<uint64_t> table)
      : file_(file),
        cs_(h.cluster_size()),
        order_(h.refcount_order),
        per_block_(RefcountEntriesPerBlock(h.cluster_bits, h.refcount_order)),
        table_(std::move(table)),
        block_(cs_) {
    const uint64_t first = h.refcount_table_offset / cs_;
    for (uint64_t c = first; c < first + h.refcount_table_clusters; c++) structures_.insert(c);
    for (uint64_t e : table_) {
      if (e & kRefcountTableOffsetMask) structures_.insert((e & kRefcountTableOffsetMask) / cs_);
    }
  }

  uint64_t per_block() const { return per_block_; }
  size_t blocks() const { return table_.size(); }
  bool has_block(uint64_t bi) const {
    return bi < table_.size() && (table_[bi] & kRefcountTableOffsetMask) != 0;
  }

  bool loaded(uint64_t bi) const { return bi == loaded_; }
  // Makes block `bi` the one Stored() reads. REQUIRES: has_block(bi).
  Task<Status> Load(uint64_t bi) {
    if (bi == loaded_) co_return Status::Ok();
    const uint64_t offset = table_[bi] & kRefcountTableOffsetMask;
    if (offset % cs_ != 0) {
      co_return Status::Corruption(
          fmt::format("{}: Image is corrupt (unaligned refblock offset)", file_.path()));
    }
    loaded_ = ~uint64_t{0};
    CO_RETURN_IF_ERROR(co_await file_.ReadExact(offset, block_.span()));
    loaded_ = bi;
    co_return Status::Ok();
  }

  // The stored refcount of `cluster`, as is. REQUIRES: its block is loaded,
  // or it has none.
  uint64_t Stored(uint64_t cluster) const {
    const uint64_t bi = cluster / per_block_;
    if (!has_block(bi)) return 0;
    assert(bi == loaded_);
    return GetRefcount(block_.span(), cluster % per_block_, order_);
  }

  // What the cluster's refcount is once the old structures are gone.
  uint64_t Remaining(uint64_t cluster, uint64_t stored) const {
    if (stored == 0 || structures_.count(cluster) == 0) return stored;
    return stored - 1;
  }

  const std::unordered_set<uint64_t>& structures() const { return structures_; }

 private:
  File& file_;
  const uint64_t cs_;
  const uint32_t order_;
  const uint64_t per_block_;
  const std::vector<uint64_t> table_;
  std::unordered_set<uint64_t> structures_;  // old refcount table and block clusters
  AlignedBuffer block_;
  uint64_t loaded_ = ~uint64_t{0};  // block index held in block_
};

// Where the new structures go: `blocks` refcount blocks from cluster `start`,
// one for each range in `ranges` (ascending), then the table of
// `table_clusters` clusters.
struct Layout {
  uint64_t start = 0;
  std::vector<uint64_t> ranges;
  uint64_t table_clusters = 0;
  uint64_t blocks() const { return ranges.size(); }
  uint64_t end() const { return start + blocks() + table_clusters; }
  bool holds(uint64_t cluster) const { return cluster >= start && cluster < end(); }
};

// The smallest layout from `start` whose blocks cover `used` (new ranges
// with a cluster in use) and the layout's own clusters. Adding the layout's
// clusters can only add ranges, and more ranges only more clusters, so the
// iteration grows monotonically to its fixed point (QEMU iterates its walk
// until no new allocation happens, for the same reason).
Layout PlanLayout(uint64_t start, const std::set<uint64_t>& used, uint64_t per_block, uint64_t cs) {
  Layout layout{.start = start};
  for (;;) {
    std::set<uint64_t> ranges = used;
    if (layout.end() > start) {
      for (uint64_t r = start / per_block; r <= (layout.end() - 1) / per_block; r++) {
        ranges.insert(r);
      }
    }
    const uint64_t entries = ranges.empty() ? 1 : *ranges.rbegin() + 1;
    const uint64_t table_clusters = std::max<uint64_t>(1, (entries * 8 + cs - 1) / cs);
    if (ranges.size() == layout.blocks() && table_clusters == layout.table_clusters) break;
    layout.ranges.assign(ranges.begin(), ranges.end());
    layout.table_clusters = table_clusters;
  }
  return layout;
}

}  // namespace

Task<Status> Qcow2Image::SetRefcountBits(int bits) {
  CO_RETURN_IF_ERROR(CheckWritable(0, 0));
  if (bits < 1 || bits > 64 || (bits & (bits - 1)) != 0) {
    co_return Status::InvalidArgument(fmt::format(
        "{}: Refcount width must be a power of two and may not exceed 64 bits", path()));
  }
  uint32_t order = 0;
  while ((1 << order) < bits) order++;
  if (order == header_.refcount_order) co_return Status::Ok();
  if (header_.version < 3) {
    co_return Status::InvalidArgument(
        fmt::format("{}: Different refcount widths than 16 bits require compatibility level 1.1 "
                    "or above (use compat=1.1 or greater)",
                    path()));
  }
  if (header_.dirty()) {
    // OpenImage rebuilds a dirty image's refcounts; they are authoritative here.
    co_return Status::Corruption(
        fmt::format("{}: image is dirty (refcounts may be stale)", path()));
  }
  // The refcounts on disk become the whole truth: no dirty block, no
  // deferred decrement.
  CO_RETURN_IF_ERROR(co_await Flush());
  auto lock = co_await meta_mutex_.Acquire();

  const uint64_t cs = geo_.cluster_size;
  const uint64_t new_per_block = RefcountEntriesPerBlock(header_.cluster_bits, order);
  OldRefcounts old(*file_, header_, refcounts_->table());

  // Pass 1: every refcount fits the new width (QEMU reports the first
  // cluster that does not, with its stored refcount); which new ranges hold a
  // cluster in use; where the image's last used cluster is.
  std::set<uint64_t> used;
  uint64_t used_end = 0;  // one past the last cluster in use
  for (uint64_t bi = 0; bi < old.blocks(); bi++) {
    if (!old.has_block(bi)) continue;
    CO_RETURN_IF_ERROR(co_await old.Load(bi));
    for (uint64_t i = 0; i < old.per_block(); i++) {
      const uint64_t cluster = bi * old.per_block() + i;
      const uint64_t stored = old.Stored(cluster);
      if (bits < 64 && (stored >> bits) != 0) {
        co_return Status::InvalidArgument(
            fmt::format("{}: Cannot decrease refcount entry width to {} bits: Cluster at offset "
                        "{:#x} has a refcount of {}",
                        path(), bits, cluster * cs, stored));
      }
      if (old.Remaining(cluster, stored) == 0) continue;
      used.insert(cluster / new_per_block);
      used_end = cluster + 1;
    }
  }
  // Past every cluster the image has used (file_size_; what the file was
  // grown ahead of need holds nothing, see ImageOptions::preallocate).
  CO_ASSIGN_OR_RETURN(const uint64_t old_file_size, file_->Size());
  const uint64_t start = std::max((file_size_ + cs - 1) / cs, used_end);
  const Layout layout = PlanLayout(start, used, new_per_block, cs);
  if (layout.table_clusters * cs > kMaxRefcountTableBytes) {
    co_return Status::NoSpace(
        fmt::format("{}: This operation would make the refcount table grow beyond the maximum "
                    "size supported by QEMU, aborting",
                    path()));
  }

  // Pass 2: the new blocks, then the new table, past the old end; then
  // stable before the header names them.
  auto write_new = [&]() -> Task<Status> {
    AlignedBuffer block(cs);
    for (uint64_t j = 0; j < layout.blocks(); j++) {
      const uint64_t first = layout.ranges[j] * new_per_block;
      std::fill(block.span().begin(), block.span().end(), std::byte{0});
      for (uint64_t i = 0; i < new_per_block; i++) {
        const uint64_t cluster = first + i;
        uint64_t refcount = 0;
        if (layout.holds(cluster)) {
          refcount = 1;
        } else if (cluster < start) {
          const uint64_t bi = cluster / old.per_block();
          if (old.has_block(bi) && !old.loaded(bi)) CO_RETURN_IF_ERROR(co_await old.Load(bi));
          refcount = old.Remaining(cluster, old.Stored(cluster));
        }
        if (refcount != 0) SetRefcount(block.span(), i, order, refcount);
      }
      CO_RETURN_IF_ERROR(co_await file_->Write((layout.start + j) * cs, block.span()));
    }
    AlignedBuffer table(layout.table_clusters * cs);
    for (uint64_t j = 0; j < layout.blocks(); j++) {
      StoreBE64(table.span(), layout.ranges[j] * 8, (layout.start + j) * cs);
    }
    CO_RETURN_IF_ERROR(co_await file_->Write((layout.start + layout.blocks()) * cs, table.span()));
    co_return co_await file_->Sync();
  };
  Status written = co_await write_new();
  if (!written.ok()) {
    // Nothing names the new clusters: give the space back (a failure here
    // leaves unreferenced bytes past the old end, which cost only space).
    CO_ASSIGN_OR_RETURN(const uint64_t size, file_->Size());
    if (size > old_file_size) (void)file_->Truncate(old_file_size);
    co_return written;
  }

  // The switch: width, table offset and table size all lie in the header's
  // first sector, so one write changes them together.
  Header updated = header_;
  updated.refcount_order = order;
  updated.refcount_table_offset = (layout.start + layout.blocks()) * cs;
  updated.refcount_table_clusters = static_cast<uint32_t>(layout.table_clusters);
  Status switched = co_await WriteHeader(*file_, updated);
  if (switched.ok()) switched = co_await file_->Sync();
  if (!switched.ok()) {
    // Which header the disk holds is unknown: neither refcount structure may
    // be written through any more.
    writable_ = false;
    co_return switched;
  }
  header_ = std::move(updated);
  geo_.refcount_order = order;
  file_size_ = std::max(file_size_, layout.end() * cs);

  auto fresh = std::make_unique<Refcounts>(file_.get(), &header_, std::max<uint64_t>(cs, 1 << 20));
  Status loaded = co_await fresh->Load();
  if (!loaded.ok()) {
    writable_ = false;  // the old refcounts no longer describe the image
    co_return loaded;
  }
  fresh->set_in_use([this](uint64_t c) { return metadata_clusters_.count(c) != 0; });
  // The fresh object's used_end() starts over: keep what the old one saw.
  zero_from_ = std::max(zero_from_, refcounts_->used_end());
  refcounts_ = std::move(fresh);

  // The old structures are free now; give their space back to the host (a
  // failure only costs space), and cut what follows the last used cluster.
  for (uint64_t c : old.structures()) {
    CO_ASSIGN_OR_RETURN(const uint64_t refcount, co_await refcounts_->Get(c));
    if (refcount == 0) (void)co_await file_->Discard(c * cs, cs);
  }
  co_return co_await TruncateAfterLastCluster();
}

}  // namespace uq::qcow2
