#include "uring/offload.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <coroutine>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "uring/ring.h"

namespace uq::uring {
namespace {

// Where one ring's finished work comes back (see the header).
class Inbox final : public Completion {
 public:
  explicit Inbox(Ring* ring) : ring_(ring), fd_(::eventfd(0, EFD_CLOEXEC)) {
    if (fd_ < 0) {
      std::perror("ublk-qcow2: offload: eventfd");
      std::abort();
    }
  }
  ~Inbox() { ::close(fd_); }

  // On the ring's thread, before the job is queued.
  void Expect() {
    ++outstanding_;
    if (!armed_) Arm();
  }
  // On a worker.
  void Deliver(std::coroutine_handle<> h) {
    {
      std::lock_guard lock(mu_);
      done_.push_back(h);
    }
    const uint64_t one = 1;
    while (::write(fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
  }
  void Complete(int32_t /*res*/, uint32_t /*flags*/) override {
    armed_ = false;
    std::vector<std::coroutine_handle<>> ready;
    {
      std::lock_guard lock(mu_);
      ready.swap(done_);
    }
    outstanding_ -= ready.size();
    // Re-arm first: a resumed coroutine may offload again, and a counter
    // left over from work already collected just completes the next read.
    if (outstanding_ > 0) Arm();
    for (auto h : ready) h.resume();
  }

 private:
  void Arm() {
    io_uring_sqe* sqe = ring_->GetSqe();
    io_uring_prep_read(sqe, fd_, &counter_, sizeof(counter_), 0);
    io_uring_sqe_set_data64(sqe, UserData::ForCompletion(this));
    armed_ = true;
  }

  Ring* const ring_;
  const int fd_;
  uint64_t counter_ = 0;
  bool armed_ = false;
  size_t outstanding_ = 0;  // queued or running, not yet resumed
  std::mutex mu_;
  std::vector<std::coroutine_handle<>> done_;
};

struct Job {
  std::function<void()>* work;
  std::coroutine_handle<> waiter;
  Inbox* inbox;
};

class Pool {
 public:
  Pool() {
    const unsigned n = std::max(2u, std::thread::hardware_concurrency());
    for (unsigned i = 0; i < n; i++) threads_.emplace_back([this] { Loop(); });
  }
  // At exit: workers finish their job in hand and stop.
  ~Pool() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  void Push(Job job) {
    {
      std::lock_guard lock(mu_);
      jobs_.push_back(job);
    }
    cv_.notify_one();
  }
  unsigned workers() const { return static_cast<unsigned>(threads_.size()); }

 private:
  void Loop() {
    for (;;) {
      Job job;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = jobs_.front();
        jobs_.pop_front();
      }
      (*job.work)();
      job.inbox->Deliver(job.waiter);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

Pool& ThePool() {
  static Pool pool;
  return pool;
}

// One inbox per ring this thread has offloaded from. A ring later destroyed
// leaves an idle inbox behind (nothing armed), reused if its address comes
// back.
Inbox& InboxFor(Ring* ring) {
  thread_local std::unordered_map<Ring*, std::unique_ptr<Inbox>> inboxes;
  std::unique_ptr<Inbox>& slot = inboxes[ring];
  if (!slot) slot = std::make_unique<Inbox>(ring);
  return *slot;
}

struct OffThread {
  std::function<void()>* work;
  Ring* ring;
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    Inbox& inbox = InboxFor(ring);
    inbox.Expect();
    ThePool().Push(Job{work, h, &inbox});
  }
  void await_resume() const noexcept {}
};

}  // namespace

Task<void> RunOffThread(std::function<void()> work) {
  Ring* ring = Ring::Current();
  if (ring == nullptr) {
    work();
    co_return;
  }
  co_await OffThread{&work, ring};
}

unsigned OffloadWorkers() { return ThePool().workers(); }

}  // namespace uq::uring
