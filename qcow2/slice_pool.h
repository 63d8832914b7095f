// SlicePool: equal-sized buffers for the metadata cache's slices, each
// aligned to its own size (a power of two from 512 to 4096: enough for
// O_DIRECT), carved out of large chunks and recycled through a free list.
// Not rounded up to a page: with 512-byte clusters the cache holds 512-byte
// slices, and a page each would be 8 times the configured cache size.
//
// Why not one aligned_alloc per slice: glibc satisfies aligned_alloc(4096,
// 4096) by carving an aligned block out of a larger chunk, and the slack
// around it is rarely reused, so a cache of 4 KiB slices cost about twice its
// configured size in resident memory (83 MiB for a 32 MiB cache, measured by
// bench/scale.sh). Chunks of many slices keep the overhead to one alignment
// per chunk.
//
// Memory goes back to the system only when the pool dies; the pool never
// holds more buffers than the cache once had live at the same time.
//
// Thread model: single event loop, like the cache.
#ifndef UBLK_QCOW2_QCOW2_SLICE_POOL_H_
#define UBLK_QCOW2_QCOW2_SLICE_POOL_H_

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

namespace uq::qcow2 {

class SlicePool {
 public:
  static constexpr size_t kAlignment = 4096;
  static constexpr size_t kChunkBytes = 256 * 1024;

  // `buffer_size`: a power of two, at least 512 (cache slices are).
  explicit SlicePool(size_t buffer_size)
      : buffer_size_(buffer_size), per_chunk_(std::max<size_t>(1, kChunkBytes / buffer_size_)) {}
  SlicePool(const SlicePool&) = delete;
  SlicePool& operator=(const SlicePool&) = delete;

  // A buffer of buffer_size bytes, contents unspecified.
  std::byte* Get() {
    if (free_.empty()) AddChunk();
    std::byte* p = free_.back();
    free_.pop_back();
    return p;
  }
  // Returns a buffer from Get() to the pool.
  void Put(std::byte* p) { free_.push_back(p); }

  size_t chunks() const { return chunks_.size(); }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  void AddChunk() {
    void* p = std::aligned_alloc(kAlignment, per_chunk_ * buffer_size_);
    if (p == nullptr) throw std::bad_alloc();
    chunks_.emplace_back(static_cast<std::byte*>(p));
    for (size_t i = per_chunk_; i-- > 0;) free_.push_back(chunks_.back().get() + i * buffer_size_);
  }

  const size_t buffer_size_;
  const size_t per_chunk_;
  std::vector<std::unique_ptr<std::byte, Free>> chunks_;
  std::vector<std::byte*> free_;
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_SLICE_POOL_H_
