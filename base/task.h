// Task<T>: the coroutine type of every asynchronous operation in ublk-qcow2.
//
// A Task is lazy: calling a coroutine that returns Task<T> allocates its frame
// and runs nothing until the Task is co_awaited. Awaiting starts it and, when it
// finishes, resumes the awaiter by symmetric transfer (no stack growth across
// long chains of synchronous completions). Tasks are move-only and own their
// frame; destroying an unfinished, never-started Task frees it.
//
// Top level code starts a Task with Spawn() (fire and forget; the frame frees
// itself when done) or runs one to completion with BlockOn(), which drives an
// EventLoop until the task finishes.
//
// Errors are values (Status/Result<T>); an exception escaping a coroutine
// terminates the process, on purpose: the I/O path does not throw.
//
// Thread model: a Task runs on whichever thread resumes it. Everything in the
// engine resumes on the thread that owns the image's event loop.
#ifndef UBLK_QCOW2_BASE_TASK_H_
#define UBLK_QCOW2_BASE_TASK_H_

#include <coroutine>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <utility>

namespace uq {

template <class T>
class Task;

namespace internal {

struct TaskPromiseBase {
  std::coroutine_handle<> continuation = std::noop_coroutine();

  std::suspend_always initial_suspend() noexcept { return {}; }
  struct FinalAwaiter {
    bool await_ready() noexcept { return false; }
    template <class Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> h) noexcept {
      return h.promise().continuation;
    }
    void await_resume() noexcept {}
  };
  FinalAwaiter final_suspend() noexcept { return {}; }
  void unhandled_exception() noexcept {
    std::fputs("ublk-qcow2: exception escaped a coroutine\n", stderr);
    std::abort();
  }
};

template <class T>
struct TaskPromise : TaskPromiseBase {
  std::optional<T> value;
  Task<T> get_return_object() noexcept;
  template <class U>
  void return_value(U&& v) {
    value.emplace(std::forward<U>(v));
  }
  T take() { return std::move(*value); }
};

template <>
struct TaskPromise<void> : TaskPromiseBase {
  Task<void> get_return_object() noexcept;
  void return_void() noexcept {}
  void take() {}
};

}  // namespace internal

template <class T = void>
class [[nodiscard]] Task {
 public:
  using promise_type = internal::TaskPromise<T>;
  using Handle = std::coroutine_handle<promise_type>;

  Task() = default;
  explicit Task(Handle h) : handle_(h) {}
  Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      Reset();
      handle_ = std::exchange(other.handle_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() { Reset(); }

  bool valid() const { return static_cast<bool>(handle_); }

  auto operator co_await() && noexcept {
    struct Awaiter {
      Handle handle;
      bool await_ready() noexcept { return false; }
      std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiting) noexcept {
        handle.promise().continuation = awaiting;
        return handle;
      }
      T await_resume() { return handle.promise().take(); }
    };
    return Awaiter{handle_};
  }

 private:
  void Reset() {
    if (handle_) handle_.destroy();
    handle_ = {};
  }
  Handle handle_;
};

namespace internal {
template <class T>
Task<T> TaskPromise<T>::get_return_object() noexcept {
  return Task<T>(std::coroutine_handle<TaskPromise<T>>::from_promise(*this));
}
inline Task<void> TaskPromise<void>::get_return_object() noexcept {
  return Task<void>(std::coroutine_handle<TaskPromise<void>>::from_promise(*this));
}

// A coroutine that starts at once and frees its own frame when it ends.
struct DetachedTask {
  struct promise_type {
    DetachedTask get_return_object() noexcept { return {}; }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::abort(); }
  };
};
}  // namespace internal

// Starts `task` now; it runs until its first suspension and continues from
// whatever resumes it. Its frame is freed when it finishes.
inline void Spawn(Task<void> task) {
  [](Task<void> t) -> internal::DetachedTask { co_await std::move(t); }(std::move(task));
}

// Something that makes progress on pending asynchronous work (an io_uring
// completion loop, for instance). BlockOn() calls Poll() until its task ends.
class EventLoop {
 public:
  virtual ~EventLoop() = default;
  // Waits for at least one pending operation to complete and resumes its
  // waiter. Returns false when nothing is pending (the caller would hang).
  virtual bool Poll() = 0;
};

// Runs `task` to completion on this thread. With loop == nullptr every
// operation the task awaits must complete synchronously; a task that suspends
// on nothing pending aborts with a message instead of hanging.
template <class T>
T BlockOn(Task<T> task, EventLoop* loop = nullptr) {
  std::optional<std::conditional_t<std::is_void_v<T>, bool, T>> out;
  bool done = false;
  Spawn([](Task<T> t, decltype(out)* o, bool* d) -> Task<void> {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(t);
      o->emplace(true);
    } else {
      o->emplace(co_await std::move(t));
    }
    *d = true;
  }(std::move(task), &out, &done));
  while (!done) {
    if (loop == nullptr || !loop->Poll()) {
      std::fputs("ublk-qcow2: BlockOn: task waits on nothing pending\n", stderr);
      std::abort();
    }
  }
  if constexpr (!std::is_void_v<T>) return std::move(*out);
}

}  // namespace uq

#endif  // UBLK_QCOW2_BASE_TASK_H_
