// Device: one image served as /dev/ublkbN, from creation to deletion.
//
// Create() runs the whole setup, in this order, and undoes what it did if a
// step fails (nothing is left behind: no device, no thread):
//   1. open /dev/ublk-control (ControlDevice) and read the kernel's features;
//   2. start queue 0's thread and open the image there (OpenImage through a
//      UringEnv, so the engine's host I/O goes on queue 0's ring);
//   3. ADD_DEV (creates /dev/ublkcN), SET_PARAMS (driver/params.h);
//   4. open /dev/ublkcN (retrying briefly while devtmpfs/udev create it);
//   5. start the other queues' threads; each QueueWorker maps its
//      descriptors and buffers and fetches every tag;
//   6. START_DEV with this process's pid (the kernel then adds the disk and
//      reads its partition table through the queues);
//   7. wait until /dev/ublkbN exists as a block device;
//   8. listen on the control socket /run/ublk-qcow2/<id>.sock
//      (driver/control_socket.h), which Serve() answers: "info" (the size)
//      and "resize" (Resize() below), the snapshot verbs
//      (device_snapshot.cc), the bitmap verbs (device_bitmap.cc) and
//      "upgrade" (device_upgrade.cc: Serve() then ends in a handover, the
//      image closed cleanly and the device left waiting for a new daemon).
//
// Serve() then blocks until the device is stopped, by STOP_DEV from another
// process (`ublk-qcow2 del`), by SIGTERM/SIGINT/SIGHUP (with
// handle_signals; Serve issues STOP_DEV itself), or by a queue failing.
// Teardown: close the control socket, STOP_DEV (the kernel completes in-flight requests, then
// aborts the pending fetches), wait for every queue to drain, Flush + Close the image on its thread
// (left clean), end the threads, unmap, close /dev/ublkcN, DEL_DEV.
//
// The device record (driver/state_file.h) is written after ADD_DEV, before
// START_DEV: a device that went live always has one.
//
// If the process dies instead (SIGKILL), the kernel cancels the queues'
// commands when their rings go away. Without user recovery (recovery kOff)
// it fails I/O with EIO and removes /dev/ublkbN by itself; /dev/ublkcN stays
// until someone sends DEL_DEV. With it (the default where the kernel offers
// it), /dev/ublkbN stays and its I/O waits (kReissue) or fails (kFailIo)
// until a new daemon recovers the device: Create() with `recover`, which
// replaces steps 3 and 6 by START_USER_RECOVERY (after the image is open) and
// END_USER_RECOVERY, takes queues, depth and buffer size from the device, and
// leaves the device waiting again (abandoning its threads: the caller exits)
// if anything fails after START_USER_RECOVERY. In recovery mode the image is
// opened with stable metadata (qcow2/qcow2_image.h), so that nothing
// acknowledged is lost with the daemon.
//
// Thread model: create, serve and destroy on one thread (the control
// thread), which must not be a LoopThread. With handle_signals, Create()
// blocks SIGTERM, SIGINT and SIGHUP in the calling thread before starting
// any other, so every thread inherits the mask and only Serve() sees them.
#ifndef UBLK_QCOW2_DRIVER_DEVICE_H_
#define UBLK_QCOW2_DRIVER_DEVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/status.h"
#include "driver/control.h"
#include "driver/control_socket.h"
#include "driver/image_host.h"
#include "driver/loop_thread.h"
#include "driver/queue.h"
#include "qcow2/block_device.h"
#include "qcow2/crypto/secret.h"

namespace uq::qcow2 {
class Qcow2Image;
}  // namespace uq::qcow2

namespace uq::driver {

struct DeviceOptions {
  std::string image;  // best absolute: the daemon runs from /
  // The working directory `add` ran in: a relative external data file name is
  // resolved against it, as QEMU resolves it (ImageOptions::working_dir).
  std::string working_dir;
  int dev_id = -1;  // -1: the kernel picks
  uint16_t queues = 1;
  uint16_t depth = 128;
  // Threads serving each queue (add --nthreads / --queues): above 1, each
  // fetches every Nth tag of its queue, with UBLK_F_PER_IO_DAEMON
  // (PerIoDaemonFlags). A recovered device is served with one per queue,
  // which the flag allows too.
  uint16_t threads_per_queue = 1;
  // Largest request, and the buffer each tag gets (lazily touched). 1 MiB
  // rather than 512 KiB: a 1 MiB write is one request instead of two
  // (docs/benchmarks.md, "What is left is the machine").
  uint32_t max_io_buf_bytes = 1024 * 1024;
  bool read_only = false;
  uint64_t cache_size = 32ull << 20;  // engine metadata cache, bytes per image
  // Host I/O with O_DIRECT (add --cache=none): no second copy of the data in
  // the host's page cache, writes issued inline instead of through io-wq.
  bool direct = true;
  // ImageOptions::preallocate: grow the image file ahead of allocation.
  uint64_t preallocate = 64ull << 20;
  // RingOptions::spin_us of every queue's ring (add --poll-us): the most an
  // idle queue thread busy-polls its ring before it sleeps.
  uint32_t poll_us = 0;
  bool handle_signals = true;
  // User recovery (driver/ublk_abi.h); `recovery_requested`: the user asked
  // for this mode, so a kernel without it is an error rather than kOff.
  RecoveryMode recovery = RecoveryMode::kReissue;
  bool recovery_requested = false;
  // add --no-partition-scan: ADD_DEV with UBLK_F_NO_AUTO_PART_SCAN, or
  // NotSupported naming it where the kernel lacks it (PartitionScanFlags).
  bool no_partition_scan = false;
  // add --zero-copy (ZeroCopyFlags, driver/zero_copy.h): kAuto uses it where
  // the kernel offers it; kOn fails naming the missing flag elsewhere.
  ZeroCopyMode zero_copy = ZeroCopyMode::kAuto;
  // add --batch-io (BatchIoFlags): the queues use UBLK_F_BATCH_IO's commands.
  bool batch_io = false;
  // Serve the existing device `dev_id`, waiting for recovery, instead of
  // adding one (`ublk-qcow2 recover`). queues, depth and max_io_buf_bytes
  // then come from the device.
  bool recover = false;
  // Called with the new device's id right after ADD_DEV (not on recover),
  // before any step that could wait: the daemon tells `add` which device to
  // remove should it give up waiting (driver/daemon.h).
  std::function<void(int dev_id)> on_added;
  // The passphrase of an encrypted image (ImageOptions::key), from --key-file.
  // Used only to open the image: the daemon wipes it (Clear) once the device
  // is live, keeping only the master key, locked in memory (LuksVolume).
  std::shared_ptr<qcow2::crypto::SecretBytes> key;
};

// What was created, as the kernel settled it.
struct DeviceInfo {
  int dev_id = -1;
  uint16_t queues = 0;
  uint16_t threads_per_queue = 1;  // lanes per queue (DeviceOptions::threads_per_queue)
  uint16_t depth = 0;
  uint32_t max_io_buf_bytes = 0;
  uint64_t size = 0;
  uint64_t cluster_size = 0;
  bool read_only = false;
  uint64_t features = 0;  // UBLK_F_* the kernel offers
  uint64_t flags = 0;     // UBLK_F_* in effect for this device
  std::string block_path;
  bool recovered = false;  // Create() with `recover`
  bool encrypted = false;  // an image of the chain is encrypted (LUKS)
  // Recover: what the leak repair on open found and freed, one log line for
  // the daemon to write once its log is set up ("" if none ran).
  std::string leak_repair;
};

class Device {
 private:
  struct Key {
    explicit Key() = default;
  };

 public:
  explicit Device(Key) {}
  // See the file comment. Errors name the step: the image's own error
  // (Corruption, NotSupported, IoError naming the file), "ublk device N:
  // START_DEV: ...", or NotSupported with kNoUblkMessage.
  static Result<std::unique_ptr<Device>> Create(const DeviceOptions& options);
  // Tears down whatever exists (as Serve's teardown).
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const DeviceInfo& info() const { return info_; }

  // Serves until stopped, then tears down. Returns OK if the image was
  // closed cleanly and the device deleted; otherwise the first error (a
  // queue's, the image's Close, DEL_DEV's). Control socket requests are
  // answered in between, on this thread.
  Status Serve();

  // Whether the device was handed to a new daemon (the "upgrade" control
  // verb, device_upgrade.cc): Serve() then closed the image but left the
  // device and its record for the next daemon. After Serve().
  bool handed_over() const { return handing_over_; }

  // Live resize to `new_size` bytes (device_resize.cc). Needs the kernel's
  // UBLK_F_UPDATE_SIZE (NotSupported naming it, checked before anything
  // changes). Growing: the image first (Resize + Flush on its thread, with
  // no request in the engine meanwhile), then UPDATE_SIZE, so the kernel
  // never sends a request past the image's end. Shrinking (only with
  // `allow_shrink`; InvalidArgument otherwise): UPDATE_SIZE first, then the
  // image. If the second step fails the first is undone. The device record's
  // size follows. REQUIRES: on the control thread, after Create().
  Status Resize(uint64_t new_size, bool allow_shrink);

 private:
  Status Setup(const DeviceOptions& options);
  // Recover: the device's settings, once it waits for a new daemon.
  Status AdoptDevice(const DeviceOptions& options);
  // START_USER_RECOVERY, retried while the old daemon's /dev/ublkcN is
  // still being released.
  Status StartRecovery();
  Status OpenCharDevice();
  Status WaitForBlockNode();
  ControlHandlers Handlers();
  // The live snapshot verbs (device_snapshot.cc).
  void AddSnapshotHandlers(ControlHandlers& handlers);
  // The live bitmap verbs (device_bitmap.cc).
  void AddBitmapHandlers(ControlHandlers& handlers);
  // "upgrade" (device_upgrade.cc).
  void AddUpgradeHandlers(ControlHandlers& handlers);
  // Quiesces the device and makes Serve() end in a handover (see
  // device_upgrade.cc). Errors leave the device served as before.
  Status HandOver();
  // The image, if `what` ("list", "create", "delete") may be done to it live;
  // else InvalidArgument "ublk device N: Could not WHAT snapshot 'NAME': why".
  Result<qcow2::Qcow2Image*> SnapshotImage(const std::string& what, const std::string& name);
  // Resize on the image's thread, between engine requests.
  Status ResizeImage(uint64_t new_size);
  // Waits until every started queue is finished, or `timeout_ms` passes
  // (then false). With `signals`, a signal issues STOP_DEV.
  bool WaitForQueues(int timeout_ms);
  void StopOnce();
  Status Teardown();
  void Wake();
  void OnQueueFinished();
  void OnQueueError(Status status);

  DeviceInfo info_;
  std::unique_ptr<ControlDevice> control_;
  std::vector<std::unique_ptr<LoopThread>> loops_;  // [0] hosts the image
  std::unique_ptr<qcow2::BlockDevice> image_;
  std::unique_ptr<ImageHost> host_;
  std::vector<std::unique_ptr<QueueWorker>> workers_;
  std::unique_ptr<ControlSocket> socket_;
  int char_fd_ = -1;
  int wake_fd_ = -1;
  int signal_fd_ = -1;
  bool added_ = false;     // ADD_DEV succeeded: DEL_DEV at the end
  bool recorded_ = false;  // this setup wrote the device record
  // Recover: START_USER_RECOVERY succeeded and the device is not live yet; a
  // failure now leaves it waiting for the next recover, which a teardown
  // (STOP_DEV, DEL_DEV) would not.
  bool abandon_on_failure_ = false;
  bool stop_sent_ = false;              // STOP_DEV issued
  bool handing_over_ = false;           // HandOver() succeeded
  bool quiesced_for_handover_ = false;  // ... and QUIESCE_DEV did too
  bool torn_down_ = false;

  std::atomic<size_t> finished_queues_{0};
  std::mutex error_mu_;
  Status first_error_;  // guarded by error_mu_
};

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_DEVICE_H_
