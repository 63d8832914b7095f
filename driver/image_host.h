// ImageHost: the image (a BlockDevice) and the one thread it lives on.
//
// The engine is single-threaded: one event loop owns an image, its caches
// and its metadata. The driver gives it queue 0's LoopThread: requests that
// need the engine run there, and its host I/O goes on queue 0's ring
// (UringFile uses the ring bound on the calling thread). A request from
// queue 0 runs at once; one from another queue crosses in queue 0's mailbox,
// and its result crosses back in the submitting queue's mailbox, whose
// thread then commits it to the kernel (ublk wants each queue's commands
// from its own thread).
//
// Reads and overwrites of clusters the engine has already mapped do not come
// here: the queue serves them on its own thread (TryServeHere). See
// driver/README.md.
//
// Work that must not overlap a request in the engine (a live resize) runs
// through Exclusive(): it waits for the requests in the engine to finish,
// and requests that arrive meanwhile wait for it.
//
// Thread model: Submit() from any LoopThread; everything else on home().
#ifndef UBLK_QCOW2_DRIVER_IMAGE_HOST_H_
#define UBLK_QCOW2_DRIVER_IMAGE_HOST_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

#include "base/keyed_lock.h"
#include "base/status.h"
#include "driver/loop_thread.h"
#include "driver/ublk_abi.h"
#include "qcow2/block_device.h"

namespace uq::driver {

class ImageHost {
 public:
  // `device` lives on `home`'s thread and outlives this object's use.
  ImageHost(LoopThread* home, qcow2::BlockDevice* device) : home_(home), device_(device) {}

  // Runs `request` on the image's thread, then calls `done(result)` on
  // `reply_to`'s thread (result as ServeRequest). `buffer` stays valid
  // until `done` runs. REQUIRES: called on `reply_to`'s thread.
  void Submit(IoDescriptor request, std::span<std::byte> buffer, LoopThread* reply_to,
              std::function<void(int32_t)> done);

  // Runs `work` on the image when no request is in the engine: it starts
  // once the requests running now have finished, and requests submitted
  // meanwhile start after it. Reads and overwrites that queues serve on their
  // own threads (TryServeHere) go on; the engine revokes a cluster before it
  // changes its mapping. REQUIRES: on home().
  Task<Status> Exclusive(std::function<Task<Status>()> work);

  LoopThread* home() const { return home_; }
  qcow2::BlockDevice* device() const { return device_; }
  // Requests running on the image now (home thread only).
  uint64_t in_flight() const { return in_flight_; }

 private:
  Task<void> Run(IoDescriptor request, std::span<std::byte> buffer, LoopThread* reply_to,
                 std::function<void(int32_t)> done);

  LoopThread* home_;
  qcow2::BlockDevice* device_;
  uint64_t in_flight_ = 0;
  // Key 0: requests hold it shared, Exclusive() exclusive.
  KeyedLock gate_;
};

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_IMAGE_HOST_H_
