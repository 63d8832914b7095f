// Ring: one io_uring instance and the loop that dispatches its completions.
//
// A Ring owns the io_uring (RAII: the fd and the mapped queues are released
// by the destructor). Code that wants asynchronous I/O gets an SQE with
// GetSqe(), prepares it, and tags it with a user_data built by UserData
// (uring/user_data.h). Poll() submits, waits and dispatches each CQE by kind:
// to a Completion, to the ring's CommandHandler (ublk commands), or nowhere.
//
// The ring counts operations in flight (one per SQE handed out, decremented
// on the last CQE of each operation), so Poll() returns false instead of
// blocking forever when nothing can complete; that is what lets BlockOn()
// detect a task that waits on nothing.
//
// The current ring: Ring::Current() is a thread-local pointer set only by a
// Ring::Bind scope guard, never by Create(). Rings are often created on one
// thread and driven by another (ublk wants one ring per queue thread), and an
// implicit binding would leave the creating thread pointing at a ring it does
// not drive. UringFile starts its operations on Ring::Current().
//
// Thread model: a Ring is single-threaded. Every method (and every Complete
// callback it makes) runs on the one thread that drives it, normally the
// thread that has it bound. Completions dispatched by Poll() may start new
// operations on the same ring and may even poll it recursively.
//
// Not supported: IOSQE_CQE_SKIP_SUCCESS (an operation whose CQE is skipped
// would stay counted in flight forever).
#ifndef UBLK_QCOW2_URING_RING_H_
#define UBLK_QCOW2_URING_RING_H_

#include <liburing.h>

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "uring/user_data.h"

namespace uq::uring {

struct RingOptions {
  // Submission queue entries (rounded up to a power of two by the kernel).
  uint32_t entries = 256;
  // Completion queue entries; 0 lets the kernel pick (2 × entries). Otherwise
  // IORING_SETUP_CQSIZE; must be >= entries.
  uint32_t cq_entries = 0;
  // IORING_SETUP_SQE128: 128-byte SQEs, required by ublk's IORING_OP_URING_CMD.
  bool sqe128 = false;
  // Opcodes needed beyond the file I/O ones (READ, WRITE, FSYNC, FALLOCATE),
  // which are always checked; e.g. IORING_OP_URING_CMD for ublk.
  std::vector<uint8_t> extra_opcodes = {};
  // Busy-polling: before Poll() sleeps for a completion it watches the
  // completion queue for a while, at most this many microseconds (0: never).
  // A request that completes meanwhile costs no sleep and no wake-up of this
  // thread, which is much of a fast device's latency at low queue depth; the
  // price is a core kept busy while polling. The window adapts, like QEMU's
  // adaptive polling: a wait longer than spin_us halves it (polling would not
  // have caught it), a shorter one grows it to twice that wait. So a busy
  // device is polled for, and one that is idle or slow mostly sleeps.
  // Needs IORING_SETUP_TASKRUN_FLAG (Linux 5.19+; without it, no polling).
  uint32_t spin_us = 0;
};

// Why a ring asked to busy-poll does not (spin_us() == 0), for messages.
inline constexpr char kNoBusyPolling[] = "the kernel lacks IORING_SETUP_TASKRUN_FLAG (Linux 5.19+)";

class Ring final : public EventLoop {
 private:
  struct Key {
    explicit Key() = default;
  };

 public:
  // Use Create(). (Public only so Create can use make_unique.)
  explicit Ring(Key) {}
  // Sets up the ring and checks that the kernel supports every opcode we
  // need. Fails with IoError/NoSpace (errno from io_uring_setup, e.g. EPERM
  // when io_uring is disabled, ENOMEM when the memlock limit is too low),
  // NotSupported naming each missing opcode, or InvalidArgument for
  // impossible options. The ring is not bound to any thread.
  static Result<std::unique_ptr<Ring>> Create(const RingOptions& options = {});

  // REQUIRES: not bound on any thread. Operations still in flight are
  // cancelled by the kernel; their completions are never dispatched, so
  // their waiters never resume. Drain first (Poll() until it returns false).
  ~Ring() override;
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Makes `ring` the current ring of this thread for the guard's lifetime,
  // restoring the previous one (guards nest). `ring` may be nullptr, which
  // forces blocking I/O inside the scope.
  class [[nodiscard]] Bind {
   public:
    explicit Bind(Ring* ring);
    ~Bind();
    Bind(const Bind&) = delete;
    Bind& operator=(const Bind&) = delete;

   private:
    Ring* previous_;
  };
  // The ring bound on this thread, or nullptr.
  static Ring* Current();

  // An SQE to prepare; never nullptr. If the submission queue is full, what is
  // queued is submitted first (io_uring_enter without waiting). Counts one
  // operation in flight.
  // REQUIRES: the caller prepares the SQE completely (opcode and user_data)
  // before its next call into this ring; an SQE, once taken, is always
  // submitted. liburing's prep helpers do not set user_data (nor clear the
  // second half of a 128-byte SQE): set both yourself.
  io_uring_sqe* GetSqe();

  // Submits every prepared SQE without waiting. Transient failures (EAGAIN,
  // EBUSY) leave them queued for the next Poll().
  void SubmitPending();

  // Submits everything prepared, waits for at least one completion, then
  // dispatches every CQE available. Returns false, at once, if nothing is in
  // flight. Aborts on io_uring_enter errors that mean a bug (EBADF, EFAULT).
  bool Poll() override;

  // Submits everything prepared and dispatches the CQEs already available,
  // without blocking. Returns how many it dispatched.
  size_t PollNoWait();

  // Resumes `h` once the completions at hand have been dispatched: at the end
  // of the current (or next) Drain, before the ring next waits. A coroutine
  // uses it to let the requests that the same batch of completions starts
  // catch up with it (see Env::Defer).
  void Defer(std::coroutine_handle<> h) { deferred_.push_back(h); }

  // Operations started (SQEs taken) whose final CQE is not yet dispatched.
  size_t in_flight() const { return in_flight_; }

  // The busy-poll cap in effect (0 when off, or when the kernel lacks
  // IORING_SETUP_TASKRUN_FLAG), the current window (nanoseconds, <= the cap),
  // and what polling did: waits that a completion ended while polling, and
  // waits that slept in the kernel.
  uint32_t spin_us() const { return spin_us_; }
  int64_t spin_window_ns() const { return window_ns_; }
  uint64_t polled_waits() const { return polled_waits_; }
  uint64_t slept_waits() const { return slept_waits_; }

  // Where kCommand completions go. `handler` must outlive the commands.
  void set_command_handler(CommandHandler* handler) { command_handler_ = handler; }

  // The raw ring, for registration calls (files, buffers) and the ublk code.
  io_uring* raw() { return &ring_; }
  bool sqe128() const { return (ring_.flags & IORING_SETUP_SQE128) != 0; }

 private:
  struct Cqe {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
  };

  // Copies up to a batch of CQEs out, releases their slots, then dispatches;
  // then runs the deferred coroutines.
  size_t Drain();
  // Resumes the coroutines deferred so far (not those they defer in turn).
  void RunDeferred();
  void Dispatch(const Cqe& cqe);
  // Moves every available CQE into stashed_ without dispatching it, to give
  // the kernel room when it refuses submissions (EBUSY: CQ overflow).
  void StashCompletions();
  // Submits what is prepared, then watches the completion queue for up to
  // window_ns_, running the thread's pending task work whenever the kernel
  // asks for it (IORING_SQ_TASKRUN). True if a completion arrived.
  bool SpinForCompletion();
  // Adapts window_ns_ to a wait that polling did not end and that took
  // `waited_ns` in all.
  void AdaptWindow(int64_t waited_ns);
  // Handles a negative io_uring_enter result: retries transient errors,
  // aborts on the rest.
  void CheckEnterResult(int ret, const char* what);

  io_uring ring_{};
  bool initialized_ = false;
  size_t in_flight_ = 0;
  uint32_t spin_us_ = 0;
  int64_t window_ns_ = 0;
  uint64_t polled_waits_ = 0;
  uint64_t slept_waits_ = 0;
  CommandHandler* command_handler_ = nullptr;
  // Completions taken off the CQ but not yet dispatched (rare; see above).
  std::vector<Cqe> stashed_;
  std::vector<std::coroutine_handle<>> deferred_;
};

}  // namespace uq::uring

#endif  // UBLK_QCOW2_URING_RING_H_
