// WaitList and AsyncMutex: how coroutines on one thread wait for each other.
//
// A WaitList is a queue of suspended coroutines; NotifyAll() resumes them in
// order. The metadata caches use it so that a request that misses on a table
// already being loaded waits for that one load instead of starting another.
// AsyncMutex serialises coroutines (for example the allocator) without
// blocking the thread. Neither is thread-safe: both belong to one event loop.
#ifndef UBLK_QCOW2_BASE_WAIT_LIST_H_
#define UBLK_QCOW2_BASE_WAIT_LIST_H_

#include <coroutine>
#include <deque>
#include <utility>

namespace uq {

class WaitList {
 public:
  // co_await list.Wait(): suspends until the next NotifyAll()/NotifyOne().
  auto Wait() {
    struct Awaiter {
      WaitList* list;
      bool await_ready() noexcept { return false; }
      void await_suspend(std::coroutine_handle<> h) { list->waiters_.push_back(h); }
      void await_resume() noexcept {}
    };
    return Awaiter{this};
  }
  // Resumes every coroutine waiting now (not those that start waiting while
  // this runs).
  void NotifyAll() {
    std::deque<std::coroutine_handle<>> ready;
    ready.swap(waiters_);
    for (auto h : ready) h.resume();
  }
  // Resumes the oldest waiter, if any. Returns whether one was resumed.
  bool NotifyOne() {
    if (waiters_.empty()) return false;
    auto h = waiters_.front();
    waiters_.pop_front();
    h.resume();
    return true;
  }
  bool empty() const { return waiters_.empty(); }

 private:
  std::deque<std::coroutine_handle<>> waiters_;
};

class AsyncMutex {
 public:
  // RAII ownership of the mutex; releasing hands it to the next waiter.
  class [[nodiscard]] Lock {
   public:
    Lock() = default;
    explicit Lock(AsyncMutex* m) : m_(m) {}
    Lock(Lock&& o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
    Lock& operator=(Lock&& o) noexcept {
      Release();
      m_ = std::exchange(o.m_, nullptr);
      return *this;
    }
    ~Lock() { Release(); }
    void Release() {
      if (m_) std::exchange(m_, nullptr)->Unlock();
    }

   private:
    AsyncMutex* m_ = nullptr;
  };

  // co_await mutex.Acquire() -> Lock
  auto Acquire() {
    struct Awaiter {
      AsyncMutex* m;
      bool await_ready() noexcept {
        if (m->locked_) return false;
        m->locked_ = true;
        return true;
      }
      void await_suspend(std::coroutine_handle<> h) { m->waiters_.push_back(h); }
      Lock await_resume() noexcept { return Lock(m); }
    };
    return Awaiter{this};
  }
  bool locked() const { return locked_; }

 private:
  void Unlock() {
    if (waiters_.empty()) {
      locked_ = false;
      return;
    }
    // Ownership passes straight to the next waiter: locked_ stays true.
    auto h = waiters_.front();
    waiters_.pop_front();
    h.resume();
  }
  bool locked_ = false;
  std::deque<std::coroutine_handle<>> waiters_;
};

}  // namespace uq

#endif  // UBLK_QCOW2_BASE_WAIT_LIST_H_
