// MetadataCache: a bounded cache of fixed-size slices of on-disk tables (L2
// tables, later refcount blocks), keyed by host offset.
//
// Guarantees:
//  - one load per slice: a request that misses on a slice already being read
//    waits for that read (a WaitList) instead of issuing another or blocking
//    the thread;
//  - bounded memory: at most `capacity_bytes` of slices stay cached; slices in
//    use (pinned by a SliceRef) are never evicted, so the bound may be exceeded
//    only by what concurrent requests hold at that moment;
//  - a failed load is reported to every waiter and not cached.
// The slice size is fixed per cache (min(cluster size, 4 KiB) for L2), so a
// 2 MiB-cluster image does not pull 2 MiB into memory for one lookup.
//
// Write-back in runs: WriteDirty() writes dirty slices of one table (a
// `table_bytes`-aligned extent, one cluster) that lie close together as one
// write, passing through the clean slices between them. A clean slice that
// is resident, loaded and unpinned holds what the file holds (it was read
// from there, or written there since its last change, and every change to a
// slice's bytes happens through a SliceRef and is marked dirty before that
// ref goes), so rewriting it changes nothing on disk, also when a crash
// tears the write. A gap slice that is not resident (or loading, or pinned)
// splits the run. With O_DIRECT each write is a disk write: 32 scattered
// slices of two 64 KiB L2 tables become 2 writes instead of 32.
//
// Thread model: single event loop; not thread-safe.
#ifndef UBLK_QCOW2_QCOW2_METADATA_CACHE_H_
#define UBLK_QCOW2_QCOW2_METADATA_CACHE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/task.h"
#include "base/wait_list.h"
#include "qcow2/file.h"
#include "qcow2/slice_pool.h"

namespace uq::qcow2 {

class MetadataCache {
 private:
  struct Slice;

 public:
  // A pinned slice: its bytes stay valid and resident while the ref lives.
  class SliceRef {
   public:
    SliceRef() = default;
    explicit SliceRef(std::shared_ptr<Slice> s);
    SliceRef(SliceRef&& o) noexcept = default;
    SliceRef& operator=(SliceRef&& o) noexcept;
    SliceRef(const SliceRef&) = delete;
    SliceRef& operator=(const SliceRef&) = delete;
    ~SliceRef();

    explicit operator bool() const { return slice_ != nullptr; }
    std::span<std::byte> bytes() const;
    uint64_t offset() const;

   private:
    friend class MetadataCache;
    void Release();
    std::shared_ptr<Slice> slice_;
  };

  // `file` must outlive the cache. `slice_size` is a power of two.
  // `table_bytes` (a multiple of slice_size, power of two): the extent one
  // write-back run stays inside (a table's cluster); slice_size or less
  // writes each dirty slice on its own.
  MetadataCache(File* file, uint64_t slice_size, uint64_t capacity_bytes, uint64_t table_bytes = 0);
  ~MetadataCache();
  MetadataCache(const MetadataCache&) = delete;
  MetadataCache& operator=(const MetadataCache&) = delete;

  uint64_t slice_size() const { return slice_size_; }

  // The slice starting at host `offset` (REQUIRES: slice-aligned), without I/O:
  // empty if not resident (or still loading).
  SliceRef TryGet(uint64_t offset);
  // The slice at `offset`, loading it if needed (one load per slice).
  Task<Result<SliceRef>> Get(uint64_t offset);
  // Drops every unpinned slice (tests, and after metadata is rewritten elsewhere).
  void Clear();

  // --- Write-back -------------------------------------------------------
  // Dirty slices are never evicted; they reach the disk only through
  // TakeDirty(), which the image calls in the order its crash-safety rules
  // demand (see qcow2_image.h).

  // Marks a resident slice as modified in memory.
  void MarkDirty(const SliceRef& ref);
  // Makes the slice at `offset` resident and all zeros without reading it
  // (a freshly allocated table whose zeros the caller writes itself).
  // Replaces any stale copy.
  SliceRef InsertZeroed(uint64_t offset);
  // Forgets every slice inside [offset, offset + length) (freed clusters).
  // REQUIRES: none of them dirty or pinned.
  void Invalidate(uint64_t offset, uint64_t length);

  struct DirtySlice {
    SliceRef ref;
    AlignedBuffer copy;  // the bytes as they were when taken
  };
  // Copies every dirty slice and marks it clean. The copies are what must be
  // written; a slice modified afterwards is dirty again. On a failed write the
  // caller hands the slices back with Redirty().
  std::vector<DirtySlice> TakeDirty();
  void Redirty(const std::vector<DirtySlice>& slices);
  // Writes every dirty slice (runs of them as one write each, see the file
  // comment; the runs concurrently) and returns once all are written. On
  // failure the slices taken are dirty again. REQUIRES: no Batch of this
  // cache being written (two writes of one slice in flight could land in
  // either order).
  Task<Status> WriteDirty();
  // WriteDirty in two halves, for an owner that takes the slices under its
  // lock and writes them after releasing it. The slices taken stay pinned
  // (never evicted, so never reloaded from the file) until written.
  struct Run {
    uint64_t offset;
    AlignedBuffer bytes;
  };
  struct Batch {
    std::vector<DirtySlice> dirty;
    std::vector<Run> runs;
  };
  // Takes every dirty slice, marks it clean and makes the runs (no I/O).
  Batch TakeBatch();
  // Writes the runs; on failure the batch's slices are dirty again.
  // REQUIRES: no other Batch taken since `batch` was, until this returns.
  Task<Status> WriteBatch(Batch& batch);
  // The writes WriteDirty() issued, and the dirty slices they carried.
  uint64_t run_writes() const { return run_writes_; }
  uint64_t slices_written() const { return slices_written_; }
  size_t dirty_slices() const { return dirty_count_; }
  // The offsets of the dirty slices, in no order (no I/O, nothing changed).
  std::vector<uint64_t> DirtyOffsets() const;
  // True once dirty slices fill half the capacity. Dirty slices cannot be
  // evicted, so past this point the owner should write them back (in its
  // crash-safe order) or the cache outgrows its bound and every insertion
  // walks the dirty ones looking for something to evict.
  bool mostly_dirty() const { return dirty_count_ * 2 >= capacity_slices_; }

  size_t resident_slices() const { return map_.size(); }
  uint64_t loads() const { return loads_; }
  uint64_t hits() const { return hits_; }

 private:
  struct Slice {
    // Takes a buffer from `pool` (shared: a pinned slice may outlive the
    // cache that evicted it) and gives it back when the slice dies.
    Slice(std::shared_ptr<SlicePool> pool, size_t size)
        : pool(std::move(pool)), data(this->pool->Get()), size(size) {}
    ~Slice() { pool->Put(data); }
    Slice(const Slice&) = delete;
    Slice& operator=(const Slice&) = delete;
    std::span<std::byte> span() const { return {data, size}; }

    std::shared_ptr<SlicePool> pool;
    std::byte* data;
    size_t size;
    uint64_t offset = 0;
    bool loading = true;
    bool failed = false;
    bool dirty = false;
    Status error;
    int pins = 0;
    WaitList waiters;
    std::list<uint64_t>::iterator lru;  // valid while in map_
    MetadataCache* cache = nullptr;
  };
  void Touch(Slice& s);
  void EvictIfOverCapacity();
  // Groups `dirty` (sorted by offset) into runs, copying clean gap slices'
  // bytes now, before any suspension can change them.
  std::vector<Run> MakeRuns(const std::vector<DirtySlice>& dirty);
  // Whether the slice at `offset` may be rewritten from the cache as a gap.
  bool CleanAndIdle(uint64_t offset) const;

  File* file_;
  uint64_t slice_size_;
  uint64_t capacity_slices_;
  uint64_t table_bytes_;
  std::shared_ptr<SlicePool> pool_;
  std::unordered_map<uint64_t, std::shared_ptr<Slice>> map_;
  std::list<uint64_t> lru_;  // front = most recently used
  size_t dirty_count_ = 0;
  uint64_t loads_ = 0;
  uint64_t hits_ = 0;
  uint64_t run_writes_ = 0;
  uint64_t slices_written_ = 0;
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_METADATA_CACHE_H_
