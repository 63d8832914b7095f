// IoContext: the Env a verb opens files with and the event loop that
// completes their operations, chosen once per command.
//
// With io_uring, the context owns a Ring and binds it to the creating thread
// for its whole lifetime (UringFile starts operations on the bound ring), so
// many reads and writes really are in flight at once. Without it, files come
// from SyncEnv, every operation completes before it returns, and loop() is
// nullptr; BlockOn(task, loop()) works the same either way.
//
// Thread model: create, use and destroy an IoContext on one thread. Destroy
// it only when no operation is in flight (every task run on it finished).
#ifndef UBLK_QCOW2_TOOLS_IO_CONTEXT_H_
#define UBLK_QCOW2_TOOLS_IO_CONTEXT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "uring/ring.h"

namespace uq::tools {

enum class IoMode {
  kAuto,   // io_uring if a ring can be set up here, else synchronous
  kUring,  // io_uring or fail
  kSync,   // blocking syscalls (SyncEnv)
};

// "auto", "uring", "sync"; nullopt for anything else.
std::optional<IoMode> ParseIoMode(std::string_view name);

class IoContext {
 private:
  struct Key {
    explicit Key() = default;
  };

 public:
  // Use Create(). (Public only so Create can use make_unique.)
  explicit IoContext(Key) {}
  // `queue_depth`: submission queue entries of the ring (a hint; operations
  // beyond it are queued, not refused); `spin_us`: RingOptions::spin_us.
  // Fails only in kUring mode, with the reason the ring could not be created.
  static Result<std::unique_ptr<IoContext>> Create(IoMode mode, uint32_t queue_depth = 256,
                                                   uint32_t spin_us = 0);
  ~IoContext();
  IoContext(const IoContext&) = delete;
  IoContext& operator=(const IoContext&) = delete;

  qcow2::Env* env() const { return env_; }
  // The loop to drive tasks with; nullptr for synchronous I/O.
  EventLoop* loop() const { return ring_.get(); }
  bool uses_uring() const { return ring_ != nullptr; }
  // The ring's busy-poll cap in effect (0: off, or not supported here).
  uint32_t spin_us() const { return ring_ != nullptr ? ring_->spin_us() : 0; }

  // Runs `task` to completion on this context.
  template <class T>
  T Run(Task<T> task) {
    return BlockOn(std::move(task), loop());
  }

 private:
  qcow2::Env* env_ = nullptr;
  std::unique_ptr<uring::Ring> ring_;
  // Declared after ring_: unbinds before the ring is destroyed.
  std::optional<uring::Ring::Bind> bind_;
};

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_IO_CONTEXT_H_
