// MemEnv: an Env whose files live in memory, so the qcow2 engine can be tested
// without a kernel, a disk or io_uring (LevelDB's helpers/memenv is the model).
//
// Files are byte vectors keyed by path. Two Open()s of one path are two handles
// on the same bytes; Remove() unlinks the path while open handles keep their
// bytes, as on POSIX. Every File follows the contract in qcow2/file.h:
//   Read     copies what lies below the file size; fewer bytes than asked
//            only at end of file (0 at or past it).
//   Write    extends the file when it ends past the size; a gap between the
//            old size and the offset reads as zeros.
//   Sync     succeeds and does nothing: memory is "durable". The crash model
//            lives in FaultInjectionEnv (fault_injection_env.h).
//   Discard, Zero
//            make [offset, offset+length) read as zeros, clipped to the size:
//            neither extends the file.
//   Extent, AllocatedBytes
//            memory keeps no holes, so these answer as a file system that
//            stores no all-zero 4 KiB block: such a block is a hole.
// Errors are the errnos a host file would give: ENOENT opening a missing file
// without `create`, EBADF writing through a read-only handle, EINVAL for an
// unaligned O_DIRECT transfer (`direct` handles demand 512-byte alignment of
// offset, length and buffer, so engine bugs in that mode show up here too) or
// a range that overflows, EFBIG past MemEnvOptions::max_file_size.
//
// Completion modes (MemEnvOptions::completion):
//   kSynchronous  Start() performs the operation and returns true.
//   kDeferred     Start() queues the operation and returns false; nothing
//                 happens to the bytes yet. Each Poll() completes between 1
//                 and max_completions_per_poll queued operations, picked in a
//                 random order from a generator seeded by MemEnvOptions::seed:
//                 it performs the operation then (data takes effect at
//                 completion, as with real asynchronous I/O) and resumes its
//                 waiter. One seed and one sequence of Start()/Poll() calls
//                 always give one order, on every platform. This is what
//                 exercises the engine's many-requests-in-flight logic:
//                 BlockOn(task, &env) drives the task on this MemEnv.
//                 RunOffThread() runs its work on a thread of its own, as
//                 the io_uring Env's workers do, so work that blocks until
//                 this thread's I/O completes (Qcow2Image::WaitUnpinned
//                 while TryAnyThread I/O is queued here) does not deadlock;
//                 Poll() resumes the caller once the work is done. When
//                 such work finishes, relative to the completions, is up to
//                 the threads: the one thing a seed does not fix.
//
// Thread model: every method and every File may be called from any thread;
// one mutex guards the bytes and the queue. Poll() resumes waiters on the
// thread that calls it, without holding the mutex, so deferred mode belongs to
// one thread (the one that starts operations and polls). A File's requests
// must complete before the MemEnv is destroyed; the File itself may go first.
#ifndef UBLK_QCOW2_QCOW2_TESTING_MEM_ENV_H_
#define UBLK_QCOW2_QCOW2_TESTING_MEM_ENV_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"

namespace uq::qcow2::testing {

struct MemEnvOptions {
  enum class Completion { kSynchronous, kDeferred };
  Completion completion = Completion::kSynchronous;
  // kDeferred: seeds the completion order.
  uint64_t seed = 1;
  // kDeferred: each Poll() completes a random count in [1, this] (0 acts as 1).
  size_t max_completions_per_poll = 4;
  // Writes and truncations past this size fail with EFBIG (the engine sees
  // NoSpace), so a wild offset fails a test instead of exhausting memory.
  uint64_t max_file_size = uint64_t{1} << 30;
};

class MemEnv final : public Env, public EventLoop {
 public:
  explicit MemEnv(MemEnvOptions options = {});
  ~MemEnv() override;
  MemEnv(const MemEnv&) = delete;
  MemEnv& operator=(const MemEnv&) = delete;

  // Env. `create` implies writable; `truncate` empties the file and needs a
  // writable handle (InvalidArgument otherwise); opening a missing path
  // without `create` is IoError(ENOENT) naming the path.
  Result<std::unique_ptr<File>> Open(const std::string& path, const OpenOptions& options) override;
  bool Exists(const std::string& path) override;

  // Env::Defer. Deferred mode: `h` resumes at the end of the Poll() running
  // now (after the completions it makes), or of the next one. Synchronous
  // mode: false (there is no batch to wait for).
  bool Defer(std::coroutine_handle<> h) override;
  // Env::RunOffThread. Deferred mode: `work` runs on a new thread and the
  // caller resumes in a later Poll(); synchronous mode: inline.
  Task<void> RunOffThread(std::function<void()> work) override;

  // EventLoop (deferred mode): completes some queued operations, see above,
  // then resumes the coroutines deferred so far and those whose off-thread
  // work is done. With nothing else to do it waits for off-thread work.
  // Returns false when nothing is queued, deferred or off this thread.
  bool Poll() override;
  // Operations queued and not yet completed (always 0 in synchronous mode).
  size_t pending() const;
  bool deferred() const { return options_.completion == MemEnvOptions::Completion::kDeferred; }

  // --- Test helpers. They act at once, whatever the completion mode. ---

  // The bytes of `path`; empty if there is no such file.
  std::vector<std::byte> Contents(const std::string& path) const;
  // Creates `path` or replaces its bytes; open handles see the new bytes.
  void SetContents(const std::string& path, std::span<const std::byte> bytes);
  // Unlinks `path`; returns whether it existed. Open handles keep their bytes.
  bool Remove(const std::string& path);
  // The size of `path`, or IoError(ENOENT).
  Result<uint64_t> FileSize(const std::string& path) const;
  // Every path, sorted.
  std::vector<std::string> Paths() const;

  // Copies `path_in_env` to a host file (created or truncated), e.g. to run
  // `qemu-img check` on an image built in memory. Errors name both files.
  Status ExportToHostFile(const std::string& path_in_env, const std::string& host_path) const;
  // Creates (or replaces) `path_in_env` with the bytes of a host file.
  Status ImportFromHostFile(const std::string& host_path, const std::string& path_in_env);

 private:
  class MemFile;
  struct Node;  // one file's bytes, shared by its handles
  // A request queued in deferred mode, with what performing it needs.
  struct Queued {
    IoRequest* request;
    std::shared_ptr<Node> node;
    bool writable;
    bool direct;
  };

  // Completes `request` now: sets request.result. REQUIRES: mu_ held.
  void Perform(Node& node, bool writable, bool direct, IoRequest& request) const;
  // Queues `queued` (deferred mode).
  void Enqueue(Queued queued);

  const MemEnvOptions options_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Node>> files_;  // guarded by mu_
  std::vector<Queued> queue_;                           // guarded by mu_
  std::vector<std::coroutine_handle<>> deferred_;       // guarded by mu_
  std::mt19937_64 rng_;                                 // guarded by mu_
  // RunOffThread: work running, callers whose work is done, and the threads
  // (joined on destruction).
  size_t off_thread_running_ = 0;                         // guarded by mu_
  std::vector<std::coroutine_handle<>> off_thread_done_;  // guarded by mu_
  std::condition_variable off_thread_cv_;
  std::vector<std::thread> off_threads_;  // touched by the polling thread only
};

}  // namespace uq::qcow2::testing

#endif  // UBLK_QCOW2_QCOW2_TESTING_MEM_ENV_H_
