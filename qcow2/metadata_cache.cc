#include "qcow2/metadata_cache.h"

#include <algorithm>
#include <cstring>

#include "base/when_all.h"

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

std::span<std::byte> MetadataCache::SliceRef::bytes() const { return slice_->span(); }
uint64_t MetadataCache::SliceRef::offset() const { return slice_->offset; }

MetadataCache::MetadataCache(File* file, uint64_t slice_size, uint64_t capacity_bytes)
    : file_(file),
      slice_size_(slice_size),
      capacity_slices_(std::max<uint64_t>(capacity_bytes / slice_size, 4)),
      pool_(std::make_shared<SlicePool>(slice_size)) {}

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
  auto s = std::make_shared<Slice>(pool_, slice_size_);
  s->offset = offset;
  s->cache = this;
  lru_.push_front(offset);
  s->lru = lru_.begin();
  map_.emplace(offset, s);
  SliceRef ref(s);
  loads_++;
  Status st = co_await file_->ReadExact(offset, s->span());
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
    if (s.pins > 0 || s.loading || s.dirty) continue;
    s.cache = nullptr;
    map_.erase(found);
    it = lru_.erase(it);
  }
}

void MetadataCache::Clear() {
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto found = map_.find(*it);
    Slice& s = *found->second;
    if (s.pins > 0 || s.loading || s.dirty) {
      ++it;
      continue;
    }
    s.cache = nullptr;
    map_.erase(found);
    it = lru_.erase(it);
  }
}

void MetadataCache::MarkDirty(const SliceRef& ref) {
  Slice& s = *ref.slice_;
  if (!s.dirty) {
    s.dirty = true;
    dirty_count_++;
  }
}

MetadataCache::SliceRef MetadataCache::InsertZeroed(uint64_t offset) {
  auto it = map_.find(offset);
  if (it != map_.end() && !it->second->loading) {
    std::shared_ptr<Slice> s = it->second;
    std::memset(s->data, 0, s->size);
    Touch(*s);
    return SliceRef(s);
  }
  if (it != map_.end()) {
    // A load is in flight for a cluster being reused: detach it so its
    // waiters still get their answer but nobody finds it again.
    lru_.erase(it->second->lru);
    it->second->cache = nullptr;
    map_.erase(it);
  }
  auto s = std::make_shared<Slice>(pool_, slice_size_);
  std::memset(s->data, 0, s->size);  // pool buffers come back dirty
  s->offset = offset;
  s->loading = false;
  s->cache = this;
  lru_.push_front(offset);
  s->lru = lru_.begin();
  map_.emplace(offset, s);
  SliceRef ref(s);
  EvictIfOverCapacity();
  return ref;
}

void MetadataCache::Invalidate(uint64_t offset, uint64_t length) {
  for (uint64_t o = offset - offset % slice_size_; o < offset + length; o += slice_size_) {
    auto it = map_.find(o);
    if (it == map_.end() || it->second->loading || it->second->dirty) continue;
    lru_.erase(it->second->lru);
    it->second->cache = nullptr;
    map_.erase(it);
  }
}

std::vector<MetadataCache::DirtySlice> MetadataCache::TakeDirty() {
  std::vector<DirtySlice> out;
  out.reserve(dirty_count_);
  for (auto& [offset, s] : map_) {
    if (!s->dirty) continue;
    s->dirty = false;
    DirtySlice d{SliceRef(s), AlignedBuffer(slice_size_)};
    std::memcpy(d.copy.data(), s->data, slice_size_);
    out.push_back(std::move(d));
  }
  dirty_count_ = 0;
  std::sort(out.begin(), out.end(), [](const DirtySlice& a, const DirtySlice& b) {
    return a.ref.offset() < b.ref.offset();
  });
  return out;
}

void MetadataCache::Redirty(const std::vector<DirtySlice>& slices) {
  for (const DirtySlice& d : slices) MarkDirty(d.ref);
}

Task<Status> MetadataCache::WriteDirty() {
  std::vector<DirtySlice> dirty = TakeDirty();
  std::vector<Task<Status>> writes;
  writes.reserve(dirty.size());
  for (DirtySlice& d : dirty)
    writes.push_back([](File* f, DirtySlice* d) -> Task<Status> {
      co_return co_await f->Write(d->ref.offset(), d->copy.span());
    }(file_, &d));
  Status st = co_await WhenAll(std::move(writes));
  if (!st.ok()) Redirty(dirty);
  co_return st;
}

}  // namespace uq::qcow2
