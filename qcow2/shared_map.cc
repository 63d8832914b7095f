#include "qcow2/shared_map.h"

#include <algorithm>
#include <bit>

namespace uq::qcow2 {

SharedMap::SharedMap(size_t slots)
    : mask_(std::bit_ceil(std::max<size_t>(slots, 1)) - 1), slots_(mask_ + 1) {}

void SharedMap::Batch::Publish(uint64_t cluster, uint64_t host, bool writable) {
  if (map_->disabled_) return;
  Slot& s = map_->slots_[map_->SlotOf(cluster)];
  // A pinned slot is either in use by a request or draining after a revoke:
  // replacing it would let its unpinning count against the wrong mapping.
  if (s.pins != 0) return;
  s.key = cluster + 1;
  s.host = host | (writable ? kWritable : 0);
}

bool SharedMap::Acquire(uint64_t first, size_t count, bool write, uint64_t* hosts, Pin* pin) {
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < count; i++) {
    const Slot& s = slots_[SlotOf(first + i)];
    if (s.key != first + i + 1 || (write && !(s.host & kWritable))) return false;
  }
  pin->Release();
  pin->map_ = this;
  pin->count_ = count;
  for (size_t i = 0; i < count; i++) {
    const uint32_t index = SlotOf(first + i);
    Slot& s = slots_[index];
    ++s.pins;
    hosts[i] = s.host & ~kWritable;
    pin->slots_[i] = index;
  }
  ++acquired_;
  return true;
}

void SharedMap::Unpin(const Pin& pin) {
  bool drained = false;
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < pin.count_; i++) {
      Slot& s = slots_[pin.slots_[i]];
      if (--s.pins == 0 && s.revoked) {
        s.revoked = false;
        drained = --revoked_pinned_ == 0;
      }
    }
  }
  if (drained) unpinned_.notify_all();
}

void SharedMap::Pin::Release() {
  if (map_ != nullptr) std::exchange(map_, nullptr)->Unpin(*this);
}

bool SharedMap::Revoke(uint64_t cluster) {
  std::lock_guard lock(mu_);
  Slot& s = slots_[SlotOf(cluster)];
  if (s.key != cluster + 1) return false;
  s.key = 0;
  if (s.pins == 0) return false;
  if (!s.revoked) {
    s.revoked = true;
    ++revoked_pinned_;
  }
  return true;
}

bool SharedMap::RevokeAll(After after) {
  std::lock_guard lock(mu_);
  if (after == After::kStop) disabled_ = true;
  for (Slot& s : slots_) {
    s.key = 0;
    if (s.pins != 0 && !s.revoked) {
      s.revoked = true;
      ++revoked_pinned_;
    }
  }
  return revoked_pinned_ != 0;
}

void SharedMap::WaitUnpinned() {
  std::unique_lock lock(mu_);
  unpinned_.wait(lock, [&] { return revoked_pinned_ == 0; });
}

uint64_t SharedMap::acquired() const {
  std::lock_guard lock(mu_);
  return acquired_;
}

size_t SharedMap::published() const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (const Slot& s : slots_) n += s.key != 0;
  return n;
}

}  // namespace uq::qcow2
