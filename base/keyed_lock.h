// KeyedLock: shared/exclusive locks on 64-bit keys (guest clusters, L1
// indices) for coroutines on one event loop.
//
// The write path takes a cluster's lock shared for writes into an allocated
// cluster and exclusive for anything that changes its mapping (allocation,
// copy-on-write, zeroing, discard), so two requests never allocate the same
// cluster and a cluster is never freed under a write still in flight. Waiters
// are served in arrival order; a state is freed as soon as nobody holds or
// waits for its key, so memory follows the number of busy keys, not the disk.
// Not thread-safe.
#ifndef UBLK_QCOW2_BASE_KEYED_LOCK_H_
#define UBLK_QCOW2_BASE_KEYED_LOCK_H_

#include <coroutine>
#include <cstdint>
#include <deque>
#include <unordered_map>
#include <utility>

namespace uq {

class KeyedLock {
 public:
  class [[nodiscard]] Guard {
   public:
    Guard() = default;
    Guard(KeyedLock* l, uint64_t key, bool exclusive) : l_(l), key_(key), exclusive_(exclusive) {}
    Guard(Guard&& o) noexcept
        : l_(std::exchange(o.l_, nullptr)), key_(o.key_), exclusive_(o.exclusive_) {}
    Guard& operator=(Guard&& o) noexcept {
      Release();
      l_ = std::exchange(o.l_, nullptr);
      key_ = o.key_;
      exclusive_ = o.exclusive_;
      return *this;
    }
    ~Guard() { Release(); }
    void Release() {
      if (l_) std::exchange(l_, nullptr)->Unlock(key_, exclusive_);
    }

   private:
    KeyedLock* l_ = nullptr;
    uint64_t key_ = 0;
    bool exclusive_ = false;
  };

  // co_await lock.Lock(key, exclusive) -> Guard
  auto Lock(uint64_t key, bool exclusive) {
    struct Awaiter {
      KeyedLock* l;
      uint64_t key;
      bool exclusive;
      bool await_ready() { return l->TryAcquire(key, exclusive); }
      void await_suspend(std::coroutine_handle<> h) {
        l->states_[key].waiters.push_back({h, exclusive});
      }
      Guard await_resume() { return Guard(l, key, exclusive); }
    };
    return Awaiter{this, key, exclusive};
  }

  bool busy(uint64_t key) const { return states_.count(key) != 0; }
  size_t busy_keys() const { return states_.size(); }

 private:
  struct Waiter {
    std::coroutine_handle<> h;
    bool exclusive;
  };
  struct State {
    int readers = 0;
    bool writer = false;
    std::deque<Waiter> waiters;
  };

  bool TryAcquire(uint64_t key, bool exclusive) {
    auto [it, inserted] = states_.try_emplace(key);
    State& s = it->second;
    if (!s.waiters.empty() || s.writer || (exclusive && s.readers > 0)) return false;
    if (exclusive)
      s.writer = true;
    else
      s.readers++;
    return true;
  }

  void Unlock(uint64_t key, bool exclusive) {
    auto it = states_.find(key);
    State& s = it->second;
    if (exclusive)
      s.writer = false;
    else
      s.readers--;
    // Hand the lock to the waiters at the front that can run now. Ownership is
    // granted before resuming, so a waiter never has to re-check.
    std::deque<std::coroutine_handle<>> ready;
    while (!s.waiters.empty()) {
      Waiter w = s.waiters.front();
      if (s.writer || (w.exclusive && s.readers > 0)) break;
      s.waiters.pop_front();
      if (w.exclusive)
        s.writer = true;
      else
        s.readers++;
      ready.push_back(w.h);
      if (w.exclusive) break;
    }
    if (!s.writer && s.readers == 0 && s.waiters.empty()) states_.erase(it);
    for (auto h : ready) h.resume();
  }

  std::unordered_map<uint64_t, State> states_;
};

}  // namespace uq

#endif  // UBLK_QCOW2_BASE_KEYED_LOCK_H_
