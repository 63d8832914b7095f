// UringEnv: the Env whose files do their I/O through io_uring.
//
// Files it opens (UringFile) start each operation on the calling thread's
// current ring (Ring::Current(), set with a Ring::Bind guard); the operation
// completes, and its coroutine resumes, when that ring is polled. On a thread
// with no ring bound they fall back to blocking syscalls
// (qcow2::PerformBlocking) and complete before Start() returns, so the same
// File works in CLI code that never sets up a ring.
//
// What each operation does, short transfers and retries: uring/file_io.h.
// Size() and Truncate() are rare and synchronous (fstat, ftruncate).
//
// Thread model: UringEnv is stateless and thread-safe. A UringFile may be
// used from several threads at once, each with its own ring; an operation
// completes on the thread that started it.
#ifndef UBLK_QCOW2_URING_URING_ENV_H_
#define UBLK_QCOW2_URING_URING_ENV_H_

#include <memory>
#include <string>

#include "qcow2/file.h"

namespace uq::uring {

class UringEnv final : public qcow2::Env {
 public:
  // A process-wide instance.
  static UringEnv* Default();

  // Opens `path` (qcow2::OpenFd decides the open(2) flags). Fails with the
  // errno of open(2), naming the path.
  Result<std::unique_ptr<qcow2::File>> Open(const std::string& path,
                                            const qcow2::OpenOptions& options) override;
  bool Exists(const std::string& path) override;
  // uring::RunOffThread (uring/offload.h): worker threads, inline without a ring.
  Task<void> RunOffThread(std::function<void()> work) override;
  // Ring::Defer on this thread's ring; false without one.
  bool Defer(std::coroutine_handle<> h) override;
};

}  // namespace uq::uring

#endif  // UBLK_QCOW2_URING_URING_ENV_H_
