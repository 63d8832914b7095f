// Mailbox<T>: hands items from any thread to the one thread that drives a
// Ring, waking that ring through an eventfd.
//
// Post() appends under a mutex and, when the box was empty, adds 1 to the
// eventfd. The owner keeps an IORING_OP_READ armed on the eventfd (Watch());
// each time it completes the owner re-arms it and takes everything posted
// so far with TakeAll(). An item is never missed: it is either in the deque
// the next TakeAll() swaps out, or it was posted to an empty box and its
// eventfd write completes the armed read (or the next one, the counter
// persists). Items come out in the order they were posted by each thread.
//
// The eventfd is blocking (no EFD_NONBLOCK): io_uring returns -EAGAIN for
// reads on non-blocking files instead of waiting for them.
//
// Thread model: Post() from any thread; Watch() and TakeAll() on the owner
// thread (the one driving the ring passed to Watch()). The mailbox must
// outlive that ring: the armed read lands in the mailbox's own buffer.
#ifndef UBLK_QCOW2_DRIVER_MAILBOX_H_
#define UBLK_QCOW2_DRIVER_MAILBOX_H_

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "base/status.h"
#include "uring/ring.h"

namespace uq::driver {

template <class T>
class Mailbox final : private uring::Completion {
 private:
  struct Key {
    explicit Key() = default;
  };

 public:
  explicit Mailbox(Key) {}
  // Fails with the errno of eventfd(2).
  static Result<std::unique_ptr<Mailbox>> Create() {
    auto box = std::make_unique<Mailbox>(Key());
    box->fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (box->fd_ < 0) return Status::FromErrno(errno, "eventfd");
    return box;
  }
  ~Mailbox() {
    if (fd_ >= 0) ::close(fd_);
  }
  Mailbox(const Mailbox&) = delete;
  Mailbox& operator=(const Mailbox&) = delete;

  // Any thread.
  void Post(T item) {
    bool was_empty;
    {
      std::lock_guard<std::mutex> lock(mu_);
      was_empty = items_.empty();
      items_.push_back(std::move(item));
    }
    if (was_empty) Wake();
  }

  // Owner thread: every item posted so far, oldest first.
  std::vector<T> TakeAll() {
    std::vector<T> out;
    std::lock_guard<std::mutex> lock(mu_);
    out.swap(items_);
    return out;
  }

  // Owner thread: arms a read on `ring` that calls `on_wake` (on the ring's
  // thread, from Poll) each time something may have been posted. Call once.
  void Watch(uring::Ring& ring, std::function<void()> on_wake) {
    ring_ = &ring;
    on_wake_ = std::move(on_wake);
    Arm();
  }

  int fd() const { return fd_; }

 private:
  void Wake() {
    const uint64_t one = 1;
    for (;;) {
      ssize_t n = ::write(fd_, &one, sizeof(one));
      if (n == static_cast<ssize_t>(sizeof(one))) return;
      if (n < 0 && errno == EINTR) continue;
      // Only a counter overflow (never: the reader resets it) gets here.
      std::fprintf(stderr, "ublk-qcow2: mailbox eventfd write: %s\n", std::strerror(errno));
      std::abort();
    }
  }

  void Arm() {
    io_uring_sqe* sqe = ring_->GetSqe();
    io_uring_prep_read(sqe, fd_, &counter_, sizeof(counter_), 0);
    io_uring_sqe_set_data64(sqe, uring::UserData::ForCompletion(this));
  }

  void Complete(int32_t res, uint32_t) override {
    if (res < 0 && res != -EINTR && res != -EAGAIN && res != -ECANCELED) {
      std::fprintf(stderr, "ublk-qcow2: mailbox eventfd read: %s\n", std::strerror(-res));
      std::abort();
    }
    Arm();
    on_wake_();
  }

  int fd_ = -1;
  std::mutex mu_;
  std::vector<T> items_;
  uring::Ring* ring_ = nullptr;
  std::function<void()> on_wake_;
  uint64_t counter_ = 0;  // the armed read's buffer
};

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_MAILBOX_H_
