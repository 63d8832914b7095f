#include "qcow2/check/stored_refcounts.h"

#include <fmt/format.h>

#include <cerrno>
#include <utility>

#include "qcow2/format.h"
#include "qcow2/refcount_codec.h"

namespace uq::qcow2::check_internal {

Task<Result<std::byte*>> StoredRefcounts::BlockFor(uint64_t cluster) {
  uint64_t offset = 0;
  std::byte* cached = nullptr;
  CO_RETURN_IF_ERROR(Lookup(cluster, &offset, &cached));
  if (offset == 0 || cached != nullptr) co_return cached;
  CO_ASSIGN_OR_RETURN(std::byte * loaded, co_await Load(offset));
  co_return loaded;
}

std::optional<uint64_t> StoredRefcounts::TryGet(uint64_t cluster) {
  uint64_t offset = 0;
  std::byte* cached = nullptr;
  if (!Lookup(cluster, &offset, &cached).ok()) return std::nullopt;
  if (offset == 0) return 0;
  if (cached == nullptr) return std::nullopt;
  return GetRefcount(BlockSpan(cached), IndexInBlock(cluster), order_);
}

Task<Result<uint64_t>> StoredRefcounts::Get(uint64_t cluster) {
  if (std::optional<uint64_t> v = TryGet(cluster)) co_return *v;
  CO_ASSIGN_OR_RETURN(std::byte * block, co_await BlockFor(cluster));
  if (block == nullptr) co_return uint64_t{0};
  co_return GetRefcount(BlockSpan(block), IndexInBlock(cluster), order_);
}

Task<Status> StoredRefcounts::Set(uint64_t cluster, uint64_t value) {
  CO_ASSIGN_OR_RETURN(std::byte * block, co_await BlockFor(cluster));
  if (block == nullptr) {
    co_return Status::Corruption(fmt::format("no refcount block covers cluster {}", cluster));
  }
  SetRefcount(std::span<std::byte>(block, uint64_t{1} << cluster_bits_), IndexInBlock(cluster),
              order_, value);
  MarkDirty(block);
  co_return Status::Ok();
}

void StoredRefcounts::MarkDirty(const std::byte* block) {
  for (auto& [offset, e] : cache_) {
    if (e->data.data() == block) e->dirty = true;
  }
}

Task<Status> StoredRefcounts::Flush() {
  for (auto& [offset, e] : cache_) {
    if (!e->dirty) continue;
    CO_RETURN_IF_ERROR(co_await file_.Write(e->offset, e->data.span()));
    e->dirty = false;
  }
  co_return Status::Ok();
}

Status StoredRefcounts::Lookup(uint64_t cluster, uint64_t* offset, std::byte** cached) {
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

Task<Result<std::byte*>> StoredRefcounts::Load(uint64_t offset) {
  if (cache_.size() >= capacity_) {
    auto victim = std::min_element(cache_.begin(), cache_.end(), [](const auto& a, const auto& b) {
      return a.second->stamp < b.second->stamp;
    });
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

}  // namespace uq::qcow2::check_internal
