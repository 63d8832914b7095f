// Offload: CPU-heavy or blocking work (inflating a compressed cluster;
// waiting until other threads' requests let go of a cluster the engine is
// about to remap, qcow2/shared_map.h) run on a small pool of worker threads,
// with the waiting coroutine resumed on its own ring's thread when the work
// is done.
//
// Why: the engine serves every request that needs it from one thread. A 64 KiB
// deflate cluster takes ~0.3 ms to inflate here; done inline, 32 compressed
// reads in flight run one after another on one core while the other sits
// idle (qemu-img inflates in a thread pool and was 1.3x faster).
//
// How the result comes back: each ring that has work out owns an eventfd
// ("inbox"). Workers push the finished coroutine onto the inbox's list and
// bump the eventfd; the ring has an IORING_OP_READ on that eventfd in flight
// exactly while work is outstanding, and its completion resumes every
// finished coroutine on the ring's thread. With nothing outstanding no read
// is armed, so an idle ring still reports "nothing in flight" (Ring::Poll
// returns false, BlockOn detects a task waiting on nothing).
//
// Without a ring bound on the calling thread the work runs inline.
//
// Thread model: RunOffThread() is called on a ring's thread; `work` runs on a
// worker and must touch only what the caller keeps alive and untouched until
// it resumes.
#ifndef UBLK_QCOW2_URING_OFFLOAD_H_
#define UBLK_QCOW2_URING_OFFLOAD_H_

#include <functional>

#include "base/task.h"

namespace uq::uring {

// Runs `work` on a worker thread (inline without a current ring); resumes the
// caller on its thread once `work` has returned.
Task<void> RunOffThread(std::function<void()> work);

// Worker threads in the pool (started on first use): the CPU count, at least 2.
unsigned OffloadWorkers();

}  // namespace uq::uring

#endif  // UBLK_QCOW2_URING_OFFLOAD_H_
