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
  MetadataCache(File* file, uint64_t slice_size, uint64_t capacity_bytes);
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
  // Writes every dirty slice (concurrently) and returns once all are written.
  Task<Status> WriteDirty();
  size_t dirty_slices() const { return dirty_count_; }
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

  File* file_;
  uint64_t slice_size_;
  uint64_t capacity_slices_;
  std::shared_ptr<SlicePool> pool_;
  std::unordered_map<uint64_t, std::shared_ptr<Slice>> map_;
  std::list<uint64_t> lru_;  // front = most recently used
  size_t dirty_count_ = 0;
  uint64_t loads_ = 0;
  uint64_t hits_ = 0;
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_METADATA_CACHE_H_
