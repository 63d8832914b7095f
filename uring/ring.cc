#include "uring/ring.h"

#include <fmt/format.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace uq::uring {
namespace {

thread_local Ring* tls_current = nullptr;

// CQEs copied out per pass; bounds the stack used by Drain().
constexpr unsigned kDrainBatch = 64;

int64_t NowNs() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return now.tv_sec * 1'000'000'000LL + now.tv_nsec;
}

// While dispatching a batch, hand the SQEs that completions queued to the
// kernel after every this many CQEs instead of at the end of the batch: at
// depth 32 completions tend to arrive in bursts of ~30, and holding the new
// requests back until the whole burst is dispatched leaves the disk idle
// meanwhile (bench 4k random reads at depth 32: 0.85x qemu-img before).
// One extra io_uring_enter per this many completions is the price.
constexpr unsigned kSubmitEvery = 8;

// The opcodes every Ring must support: the ones UringFile issues.
constexpr uint8_t kFileOpcodes[] = {IORING_OP_READ, IORING_OP_WRITE, IORING_OP_FSYNC,
                                    IORING_OP_FALLOCATE};

std::string OpcodeName(uint8_t op) {
  switch (op) {
    case IORING_OP_NOP:
      return "IORING_OP_NOP";
    case IORING_OP_FSYNC:
      return "IORING_OP_FSYNC";
    case IORING_OP_FALLOCATE:
      return "IORING_OP_FALLOCATE";
    case IORING_OP_READ:
      return "IORING_OP_READ";
    case IORING_OP_WRITE:
      return "IORING_OP_WRITE";
    case IORING_OP_ASYNC_CANCEL:
      return "IORING_OP_ASYNC_CANCEL";
    case IORING_OP_URING_CMD:
      return "IORING_OP_URING_CMD";
    default:
      return fmt::format("io_uring opcode {}", op);
  }
}

// NotSupported naming every opcode in `needed` the kernel lacks.
Status CheckOpcodes(io_uring* ring, const std::vector<uint8_t>& needed) {
  // io_uring_get_probe_ring() needs IORING_REGISTER_PROBE (Linux 5.6).
  std::unique_ptr<io_uring_probe, void (*)(io_uring_probe*)> probe(io_uring_get_probe_ring(ring),
                                                                   io_uring_free_probe);
  if (probe == nullptr) {
    return Status::NotSupported(
        "io_uring: the kernel cannot report its opcodes (needs Linux 5.6+)");
  }
  std::string missing;
  for (uint8_t op : needed) {
    if (io_uring_opcode_supported(probe.get(), op)) continue;
    if (!missing.empty()) missing += ", ";
    missing += OpcodeName(op);
  }
  if (!missing.empty()) return Status::NotSupported("io_uring: the kernel lacks " + missing);
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<Ring>> Ring::Create(const RingOptions& options) {
  if (options.entries == 0 || options.entries > 32768) {
    return Status::InvalidArgument(
        fmt::format("io_uring: {} submission entries (want 1..32768)", options.entries));
  }
  if (options.cq_entries != 0 && options.cq_entries < options.entries) {
    return Status::InvalidArgument(
        fmt::format("io_uring: {} completion entries, fewer than {} submission entries",
                    options.cq_entries, options.entries));
  }
  io_uring_params params{};
  if (options.sqe128) params.flags |= IORING_SETUP_SQE128;
  if (options.cq_entries != 0) {
    params.flags |= IORING_SETUP_CQSIZE;
    params.cq_entries = options.cq_entries;
  }

  auto ring = std::make_unique<Ring>(Key{});
  // COOP_TASKRUN (Linux 5.19+): completions that need this thread's task
  // work (ublk commands among them) wait for its next entry into the kernel
  // instead of interrupting it; the loop enters the kernel whenever it waits
  // anyway. Older kernels reject the flag: retry without it.
  // TASKRUN_FLAG (same kernels) makes the kernel flag pending task work in
  // the SQ ring, which a busy-polling thread must notice: it never enters
  // the kernel on its own while it spins.
  io_uring_params with_coop = params;
  with_coop.flags |= IORING_SETUP_COOP_TASKRUN;
  if (options.spin_us > 0) with_coop.flags |= IORING_SETUP_TASKRUN_FLAG;
  int ret = io_uring_queue_init_params(options.entries, &ring->ring_, &with_coop);
  if (ret == -EINVAL) {
    ret = io_uring_queue_init_params(options.entries, &ring->ring_, &params);
  } else {
    params = with_coop;
  }
  if (ret < 0) {
    std::string what =
        fmt::format("io_uring_setup ({} entries{}{})", options.entries,
                    options.sqe128 ? ", SQE128" : "", options.cq_entries ? ", CQSIZE" : "");
    // An old kernel rejects flags it does not know with EINVAL.
    if (ret == -EINVAL && options.sqe128) what += " (SQE128 needs Linux 5.19+)";
    return Status::FromErrno(-ret, what);
  }
  ring->initialized_ = true;
  if (params.flags & IORING_SETUP_TASKRUN_FLAG) {
    ring->spin_us_ = options.spin_us;
    ring->window_ns_ = int64_t{options.spin_us} * 1000;
  }

  // Without NODROP a CQ overflow loses completions, and with them waiters
  // and the in-flight count.
  if ((params.features & IORING_FEAT_NODROP) == 0) {
    return Status::NotSupported("io_uring: the kernel lacks IORING_FEAT_NODROP (needs Linux 5.5+)");
  }
  std::vector<uint8_t> needed(std::begin(kFileOpcodes), std::end(kFileOpcodes));
  needed.insert(needed.end(), options.extra_opcodes.begin(), options.extra_opcodes.end());
  RETURN_IF_ERROR(CheckOpcodes(&ring->ring_, needed));
  return ring;
}

Ring::~Ring() {
  // A ring destroyed while bound is a bug in the caller; do not leave the
  // thread pointing at freed memory.
  if (tls_current == this) tls_current = nullptr;
  if (initialized_) io_uring_queue_exit(&ring_);
}

Ring::Bind::Bind(Ring* ring) : previous_(tls_current) { tls_current = ring; }
Ring::Bind::~Bind() { tls_current = previous_; }
Ring* Ring::Current() { return tls_current; }

io_uring_sqe* Ring::GetSqe() {
  for (;;) {
    if (io_uring_sqe* sqe = io_uring_get_sqe(&ring_)) {
      ++in_flight_;
      return sqe;
    }
    // The SQ is full: hand what is queued to the kernel. Without SQPOLL the
    // kernel consumes SQEs inside io_uring_enter, so this frees slots unless
    // it fails outright.
    int ret = io_uring_submit(&ring_);
    if (ret >= 0) continue;
    CheckEnterResult(ret, "io_uring_submit");
    // EBUSY: older kernels refuse submissions while completions overflow.
    // Reaping without dispatching (we may be deep inside someone's Start())
    // makes room; Poll() dispatches the stash later.
    if (ret == -EBUSY) StashCompletions();
    if (ret == -EAGAIN) sched_yield();  // kernel short of memory
  }
}

void Ring::SubmitPending() {
  for (;;) {
    int ret = io_uring_submit(&ring_);
    if (ret >= 0) return;
    CheckEnterResult(ret, "io_uring_submit");
    if (ret != -EINTR) return;  // EAGAIN/EBUSY: Poll() retries
  }
}

bool Ring::Poll() {
  if (!deferred_.empty()) {
    // Nothing waits for them but this thread: run them rather than block.
    RunDeferred();
    return true;
  }
  if (in_flight_ == 0) return false;
  if (!stashed_.empty()) {
    // Completions are already waiting: do not block.
    SubmitPending();
    Drain();
    return true;
  }
  int64_t wait_start = 0;
  if (spin_us_ > 0) {
    wait_start = NowNs();
    if (SpinForCompletion()) {
      ++polled_waits_;
      if (Drain() > 0) return true;
    }
  }
  ++slept_waits_;
  for (;;) {
    int ret = io_uring_submit_and_wait(&ring_, 1);
    if (ret < 0) CheckEnterResult(ret, "io_uring_submit_and_wait");
    if (spin_us_ > 0 && io_uring_cq_ready(&ring_) > 0) AdaptWindow(NowNs() - wait_start);
    // EINTR, or a wake-up with no CQE yet: wait again. EBUSY: there are CQEs
    // to reap, which Drain() does.
    if (Drain() > 0) return true;
    if (in_flight_ == 0) return false;
  }
}

void Ring::AdaptWindow(int64_t waited_ns) {
  const int64_t cap_ns = int64_t{spin_us_} * 1000;
  if (waited_ns > cap_ns) {
    window_ns_ /= 2;
    if (window_ns_ < 1000) window_ns_ = 0;  // under 1 µs: not worth a look
  } else {
    window_ns_ = std::min(cap_ns, std::max(window_ns_, 2 * waited_ns));
  }
}

bool Ring::SpinForCompletion() {
  SubmitPending();
  if (window_ns_ == 0) return io_uring_cq_ready(&ring_) > 0;
  const int64_t deadline = NowNs() + window_ns_;
  for (unsigned round = 0;; ++round) {
    if (io_uring_cq_ready(&ring_) > 0) return true;
    if (IO_URING_READ_ONCE(*ring_.sq.kflags) & IORING_SQ_TASKRUN) {
      // Completions wait in this thread's task work: a zero-wait enter runs
      // it and posts them.
      int ret = io_uring_get_events(&ring_);
      if (ret < 0) CheckEnterResult(ret, "io_uring_get_events");
      if (io_uring_cq_ready(&ring_) > 0) return true;
    }
    // Reading the clock costs more than a look at the ring.
    if (round % 16 == 15 && NowNs() >= deadline) return false;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

size_t Ring::PollNoWait() {
  SubmitPending();
  return Drain();
}

size_t Ring::Drain() {
  size_t total = 0;
  if (!stashed_.empty()) {
    std::vector<Cqe> stash;
    stash.swap(stashed_);
    for (const Cqe& cqe : stash) Dispatch(cqe);
    total += stash.size();
  }
  for (;;) {
    // Copy the CQEs out and release their slots before dispatching: a
    // completion may start new operations, or poll this ring recursively,
    // and must never see (or re-dispatch) a CQE this pass still holds.
    std::array<Cqe, kDrainBatch> batch;
    unsigned n = 0;
    unsigned head;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      batch[n++] = Cqe{cqe->user_data, cqe->res, cqe->flags};
      if (n == kDrainBatch) break;
    }
    if (n == 0) break;
    io_uring_cq_advance(&ring_, n);
    for (unsigned i = 0; i < n; ++i) {
      Dispatch(batch[i]);
      if ((i + 1) % kSubmitEvery == 0 && i + 1 < n && io_uring_sq_ready(&ring_) > 0) {
        SubmitPending();
      }
    }
    total += n;
    // A partial batch emptied the CQ; what arrived since waits for the
    // next poll, which keeps one Poll() bounded.
    if (n < kDrainBatch) break;
  }
  RunDeferred();
  return total;
}

void Ring::RunDeferred() {
  if (deferred_.empty()) return;
  std::vector<std::coroutine_handle<>> now;
  now.swap(deferred_);
  for (std::coroutine_handle<> h : now) h.resume();
}

void Ring::Dispatch(const Cqe& cqe) {
  // Multishot operations post several CQEs; only the last (no F_MORE) ends
  // the operation.
  if ((cqe.flags & IORING_CQE_F_MORE) == 0) {
    if (in_flight_ == 0) {
      std::fprintf(stderr, "ublk-qcow2: io_uring: completion (user_data %#llx) for no operation\n",
                   static_cast<unsigned long long>(cqe.user_data));
      std::abort();
    }
    --in_flight_;
  }
  switch (UserData::KindOf(cqe.user_data)) {
    case UserData::Kind::kIgnore:
      return;
    case UserData::Kind::kCompletion:
      UserData::CompletionOf(cqe.user_data)->Complete(cqe.res, cqe.flags);
      return;
    case UserData::Kind::kCommand:
      if (command_handler_ == nullptr) {
        std::fputs("ublk-qcow2: io_uring: command completion but no command handler\n", stderr);
        std::abort();
      }
      command_handler_->OnCommandComplete(UserData::PayloadOf(cqe.user_data), cqe.res, cqe.flags);
      return;
  }
  std::fprintf(stderr, "ublk-qcow2: io_uring: user_data %#llx has an unknown kind\n",
               static_cast<unsigned long long>(cqe.user_data));
  std::abort();
}

void Ring::StashCompletions() {
  unsigned n = 0;
  unsigned head;
  io_uring_cqe* cqe;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    stashed_.push_back(Cqe{cqe->user_data, cqe->res, cqe->flags});
    ++n;
  }
  io_uring_cq_advance(&ring_, n);
}

void Ring::CheckEnterResult(int ret, const char* what) {
  switch (-ret) {
    case EINTR:   // a signal; retry
    case EAGAIN:  // the kernel is short of memory; retry
    case EBUSY:   // CQ overflow on older kernels; reap, then retry
    case ETIME:
      return;
    default:
      // EBADF, EFAULT, EINVAL, EOPNOTSUPP: the ring or our use of it is
      // broken. Poll() has no error channel, and continuing would hang.
      std::fprintf(stderr, "ublk-qcow2: %s: %s\n", what, std::strerror(-ret));
      std::abort();
  }
}

}  // namespace uq::uring
