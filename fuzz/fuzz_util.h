// Helpers shared by the libFuzzer targets in fuzz/: viewing the input as
// bytes, failing loudly on a broken promise, and running the engine on a
// thread with a large stack.
//
// Why the stack: with the in-memory Env every I/O completes inline, and an
// ASan build at -O1 does not always turn the coroutines' symmetric transfer
// into a tail call, so a long walk (check over thousands of L2 entries) can
// nest a frame per completed request. An 8 MiB main-thread stack would then
// report a stack overflow that the optimised build never has (the same
// reason qcow2/mutation_test.cc runs on a big stack).
#ifndef UBLK_QCOW2_FUZZ_FUZZ_UTIL_H_
#define UBLK_QCOW2_FUZZ_FUZZ_UTIL_H_

#include <pthread.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <span>
#include <string>

namespace uq::fuzz {

inline std::span<const std::byte> Bytes(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const std::byte*>(data), size};
}

// A promise of the code under test that does not hold: abort, so libFuzzer
// keeps the input as a crash.
[[noreturn]] inline void Broken(const std::string& what) {
  std::fprintf(stderr, "fuzz: broken promise: %s\n", what.c_str());
  std::abort();
}

#define FUZZ_REQUIRE(cond, what)                                       \
  do {                                                                 \
    if (!(cond)) ::uq::fuzz::Broken(std::string(#cond ": ") + (what)); \
  } while (0)

// Runs `fn` to completion on a worker thread with a 256 MiB stack (reserved,
// touched only as used), and waits for it. The worker is made once and kept
// (a thread per input would cost ASan a shadow clean-up of the whole stack
// each time); inline if no thread can be made.
inline void OnBigStack(std::function<void()> fn) {
  struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    std::function<void()>* job = nullptr;  // guarded by mu
    bool done = false;                     // guarded by mu
    bool started = false;
  };
  static Worker* const worker = [] {
    auto* w = new Worker;  // never destroyed: the process ends with it running
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, size_t{256} << 20);
    pthread_t thread;
    auto body = [](void* arg) -> void* {
      auto* w = static_cast<Worker*>(arg);
      for (;;) {
        std::unique_lock lock(w->mu);
        w->cv.wait(lock, [&] { return w->job != nullptr; });
        (*w->job)();
        w->job = nullptr;
        w->done = true;
        w->cv.notify_all();
      }
      return nullptr;
    };
    w->started = pthread_create(&thread, &attr, body, w) == 0;
    pthread_attr_destroy(&attr);
    if (w->started) pthread_detach(thread);
    return w;
  }();
  if (!worker->started) {
    fn();
    return;
  }
  std::unique_lock lock(worker->mu);
  worker->done = false;
  worker->job = &fn;
  worker->cv.notify_all();
  worker->cv.wait(lock, [&] { return worker->done; });
}

// FUZZ_VERBOSE=1 in the environment: targets say what became of each input
// (to see what the seeds reach).
inline bool Verbose() {
  static const bool verbose = std::getenv("FUZZ_VERBOSE") != nullptr;
  return verbose;
}

// Big-endian loads from the input, zero past its end (so a short input is
// still a valid one).
inline uint64_t LoadBE(std::span<const std::byte> in, size_t at, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; i++) {
    v = (v << 8) | (at + i < in.size() ? static_cast<uint8_t>(in[at + i]) : 0);
  }
  return v;
}

}  // namespace uq::fuzz

#endif  // UBLK_QCOW2_FUZZ_FUZZ_UTIL_H_
