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

MetadataCache::MetadataCache(File* file, uint64_t slice_size, uint64_t capacity_bytes,
                             uint64_t table_bytes)
    : file_(file),
      slice_size_(slice_size),
      capacity_slices_(std::max<uint64_t>(capacity_bytes / slice_size, 4)),
      table_bytes_(std::max(table_bytes, slice_size)),
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

std::vector<uint64_t> MetadataCache::DirtyOffsets() const {
  std::vector<uint64_t> out;
  out.reserve(dirty_count_);
  for (const auto& [offset, s] : map_) {
    if (s->dirty) out.push_back(offset);
  }
  return out;
}

void MetadataCache::Redirty(const std::vector<DirtySlice>& slices) {
  for (const DirtySlice& d : slices) MarkDirty(d.ref);
}

// Past this much clean data between two dirty slices (possible in tables
// of large clusters) a second write is cheaper than rewriting it.
constexpr uint64_t kMaxGapBytes = 64 << 10;

bool MetadataCache::CleanAndIdle(uint64_t offset) const {
  auto it = map_.find(offset);
  if (it == map_.end()) return false;
  const Slice& s = *it->second;
  return !s.loading && !s.dirty && s.pins == 0;
}

std::vector<MetadataCache::Run> MetadataCache::MakeRuns(const std::vector<DirtySlice>& dirty) {
  std::vector<Run> runs;
  for (size_t i = 0, j; i < dirty.size(); i = j) {
    // Extend the run to the next dirty slice of the same table while every
    // slice in between may be rewritten from the cache.
    const uint64_t first = dirty[i].ref.offset();
    const uint64_t table = first / table_bytes_;
    uint64_t end = first + slice_size_;
    for (j = i + 1; j < dirty.size(); j++) {
      const uint64_t next = dirty[j].ref.offset();
      if (next / table_bytes_ != table || next - end > kMaxGapBytes) break;
      bool bridged = true;
      for (uint64_t o = end; o < next && bridged; o += slice_size_) bridged = CleanAndIdle(o);
      if (!bridged) break;
      end = next + slice_size_;
    }
    Run run{first, AlignedBuffer(end - first)};
    size_t k = i;
    for (uint64_t o = first; o < end; o += slice_size_) {
      std::byte* to = run.bytes.data() + (o - first);
      if (k < j && dirty[k].ref.offset() == o) {
        std::memcpy(to, dirty[k].copy.data(), slice_size_);
        k++;
      } else {
        std::memcpy(to, map_.at(o)->data, slice_size_);  // clean: what the file holds
      }
    }
    runs.push_back(std::move(run));
  }
  return runs;
}

MetadataCache::Batch MetadataCache::TakeBatch() {
  Batch batch;
  batch.dirty = TakeDirty();
  batch.runs = MakeRuns(batch.dirty);
  run_writes_ += batch.runs.size();
  slices_written_ += batch.dirty.size();
  return batch;
}

Task<Status> MetadataCache::WriteBatch(Batch& batch) {
  std::vector<Task<Status>> writes;
  writes.reserve(batch.runs.size());
  for (Run& r : batch.runs)
    writes.push_back([](File* f, Run* r) -> Task<Status> {
      co_return co_await f->Write(r->offset, r->bytes.span());
    }(file_, &r));
  Status st = co_await WhenAll(std::move(writes));
  if (!st.ok()) Redirty(batch.dirty);
  co_return st;
}

Task<Status> MetadataCache::WriteDirty() {
  Batch batch = TakeBatch();
  co_return co_await WriteBatch(batch);
}

}  // namespace uq::qcow2
