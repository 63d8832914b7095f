// LoopThread: a thread that owns one io_uring Ring, keeps it bound
// (Ring::Bind) for its whole life, and runs the closures other threads post
// to it between completions.
//
// Every ublk queue runs on one (the kernel wants each queue's commands from
// one task), and the image engine lives on queue 0's: closures are how work
// crosses threads. The loop is
//
//   while (!quit) ring.Poll();   // completions and posted closures
//
// with a mailbox read always armed, so Poll() sleeps in io_uring_enter until
// an I/O completes or something is posted.
//
// Thread model: Post/Call/RunTask/Quit from any thread (Call and RunTask
// block, so never on the loop thread itself); ring() and Current() on the
// loop thread. The destructor quits and joins; operations still in flight
// on the ring then are cancelled by the kernel and never completed.
#ifndef UBLK_QCOW2_DRIVER_LOOP_THREAD_H_
#define UBLK_QCOW2_DRIVER_LOOP_THREAD_H_

#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

#include "base/status.h"
#include "base/task.h"
#include "driver/mailbox.h"
#include "uring/ring.h"

namespace uq::driver {

class LoopThread {
 private:
  struct Key {
    explicit Key() = default;
  };

 public:
  explicit LoopThread(Key) {}
  // Starts the thread (named `name`, at most 15 characters) and creates its
  // ring there. Fails with the ring's error.
  static Result<std::unique_ptr<LoopThread>> Start(std::string name,
                                                   const uring::RingOptions& options);
  ~LoopThread();
  LoopThread(const LoopThread&) = delete;
  LoopThread& operator=(const LoopThread&) = delete;

  // Runs `fn` on the loop thread soon, after what was posted before it.
  void Post(std::function<void()> fn) { mailbox_->Post(std::move(fn)); }

  // Runs `fn` on the loop thread and returns its result.
  // REQUIRES: not on the loop thread; `fn` does not block on the loop.
  template <class F>
  auto Call(F fn) -> std::invoke_result_t<F> {
    using R = std::invoke_result_t<F>;
    std::promise<R> promise;
    std::future<R> future = promise.get_future();
    Post([&promise, &fn] {
      if constexpr (std::is_void_v<R>) {
        fn();
        promise.set_value();
      } else {
        promise.set_value(fn());
      }
    });
    return future.get();
  }

  // Starts `make()`'s task on the loop thread and waits until it finishes.
  // REQUIRES: not on the loop thread.
  template <class T>
  T RunTask(std::function<Task<T>()> make) {
    std::promise<T> promise;
    std::future<T> future = promise.get_future();
    Post([&promise, make = std::move(make)] {
      Spawn([](Task<T> task, std::promise<T>* p) -> Task<void> {
        p->set_value(co_await std::move(task));
      }(make(), &promise));
    });
    return future.get();
  }

  // Ends the loop after the closures already posted have run.
  void Quit();

  // REQUIRES: on the loop thread.
  uring::Ring& ring() { return *ring_; }
  // True on the loop thread.
  bool IsCurrent() const { return std::this_thread::get_id() == thread_.get_id(); }

 private:
  void Main(std::string name, uring::RingOptions options, std::promise<Status> started);

  std::unique_ptr<Mailbox<std::function<void()>>> mailbox_;
  std::unique_ptr<uring::Ring> ring_;
  bool quit_ = false;  // loop thread only
  bool joined_ = false;
  std::thread thread_;
};

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_LOOP_THREAD_H_
