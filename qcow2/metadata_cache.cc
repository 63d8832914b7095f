#include "qcow2/metadata_cache.h"

#include <algorithm>

namespace uq::qcow2 {

MetadataCache::SliceRef::SliceRef(std::shared_ptr<Slice> s) : slice_(std::move(s)) {
  if (slice_) slice_->pins++;
}

MetadataCache::SliceRef& MetadataCache::SliceRef::operator=(SliceRef&& o) noexcept {
  if (this != &o) {
    Release();
    slice_ = std::move(o.slice_);
  }
  return *this;
}

MetadataCache::SliceRef::~SliceRef() { Release(); }

void MetadataCache::SliceRef::Release() {
  if (!slice_) return;
  slice_->pins--;
  std::shared_ptr<Slice> s = std::move(slice_);
  // A cache over capacity shrinks as soon as slices are unpinned.
  if (s->pins == 0 && s->cache != nullptr) s->cache->EvictIfOverCapacity();
}

std::span<std::byte> MetadataCache::SliceRef::bytes() const { return slice_->data.span(); }
uint64_t MetadataCache::SliceRef::offset() const { return slice_->offset; }

MetadataCache::MetadataCache(File* file, uint64_t slice_size, uint64_t capacity_bytes)
    : file_(file),
      slice_size_(slice_size),
      capacity_slices_(std::max<uint64_t>(capacity_bytes / slice_size, 4)) {}

MetadataCache::~MetadataCache() {
  // Outstanding refs keep their slices alive; they must not call back.
  for (auto& [offset, slice] : map_) slice->cache = nullptr;
}

void MetadataCache::Touch(Slice& s) { lru_.splice(lru_.begin(), lru_, s.lru); }

MetadataCache::SliceRef MetadataCache::TryGet(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end() || it->second->loading) return SliceRef();
  hits_++;
  Touch(*it->second);
  return SliceRef(it->second);
}

Task<Result<MetadataCache::SliceRef>> MetadataCache::Get(uint64_t offset) {
  auto it = map_.find(offset);
  if (it != map_.end()) {
    std::shared_ptr<Slice> s = it->second;
    SliceRef ref(s);
    if (s->loading) co_await s->waiters.Wait();
    if (s->failed) co_return s->error;
    hits_++;
    if (map_.count(offset)) Touch(*s);
    co_return std::move(ref);
  }
  auto s = std::make_shared<Slice>();
  s->offset = offset;
  s->data = AlignedBuffer(slice_size_);
  s->cache = this;
  lru_.push_front(offset);
  s->lru = lru_.begin();
  map_.emplace(offset, s);
  SliceRef ref(s);
  loads_++;
  Status st = co_await file_->ReadExact(offset, s->data.span());
  s->loading = false;
  if (!st.ok()) {
    s->failed = true;
    s->error = st;
    lru_.erase(s->lru);
    map_.erase(offset);
    s->cache = nullptr;
    s->waiters.NotifyAll();
    co_return st;
  }
  s->waiters.NotifyAll();
  EvictIfOverCapacity();
  co_return std::move(ref);
}

void MetadataCache::EvictIfOverCapacity() {
  auto it = lru_.end();
  while (map_.size() > capacity_slices_ && it != lru_.begin()) {
    --it;
    auto found = map_.find(*it);
    Slice& s = *found->second;
    if (s.pins > 0 || s.loading) continue;
    s.cache = nullptr;
    map_.erase(found);
    it = lru_.erase(it);
  }
}

void MetadataCache::Clear() {
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto found = map_.find(*it);
    Slice& s = *found->second;
    if (s.pins > 0 || s.loading) {
      ++it;
      continue;
    }
    s.cache = nullptr;
    map_.erase(found);
    it = lru_.erase(it);
  }
}

}  // namespace uq::qcow2
