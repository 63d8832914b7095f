// ControlDevice: the ublk control node (/dev/ublk-control) and the commands
// that create, start, stop, describe and delete ublk devices.
//
// Each command is one IORING_OP_URING_CMD carrying a struct ublksrv_ctrl_cmd
// in a 128-byte SQE, submitted on the control device's own small ring and
// waited for before the call returns. Open() asks the kernel for its
// features first (GET_FEATURES, Linux 6.5+; an older kernel refuses it and
// is treated as offering none) and from then on speaks the opcode encoding
// those features call for (driver/ublk_abi.h).
//
// Some commands block in the kernel: START_DEV until every queue of the
// device has fetched all its tags (and then while the kernel reads the
// partition table through those queues), DEL_DEV until /dev/ublkcN is closed
// by whoever holds it. Call them from a thread that serves nothing.
//
// Errors: IoError with the kernel's errno, the message naming the command
// and the device ("ublk device 3: START_DEV: Invalid argument").
//
// Thread model: one thread at a time (it owns a Ring).
#ifndef UBLK_QCOW2_DRIVER_CONTROL_H_
#define UBLK_QCOW2_DRIVER_CONTROL_H_

#include <linux/ublk_cmd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "driver/ublk_abi.h"
#include "uring/ring.h"

namespace uq::driver {

// What ADD_DEV asks for; the kernel may lower it (queues to the CPU count,
// buffer size to a page multiple) and says so in the returned info.
struct AddRequest {
  int dev_id = -1;  // -1: the kernel picks the lowest free id
  uint16_t queues = 1;
  uint16_t depth = 128;
  uint32_t max_io_buf_bytes = 1024 * 1024;
  uint64_t flags = 0;  // UBLK_F_* beyond AddFlags(features()), which are always added
};

class ControlDevice {
 private:
  struct Key {
    explicit Key() = default;
  };

 public:
  explicit ControlDevice(Key) {}
  // Opens /dev/ublk-control and reads the kernel's features. Fails with
  // NotSupported when the node is missing (no ublk driver), IoError for
  // anything else (EACCES: not root).
  static Result<std::unique_ptr<ControlDevice>> Open();
  ~ControlDevice();
  ControlDevice(const ControlDevice&) = delete;
  ControlDevice& operator=(const ControlDevice&) = delete;

  // UBLK_F_* the kernel offers (0 on a kernel without GET_FEATURES).
  uint64_t features() const { return features_; }
  // False on a kernel without GET_FEATURES (before 6.5).
  bool features_known() const { return features_known_; }
  const Opcodes& opcodes() const { return ops_; }

  // Creates /dev/ublkcN. Returns the device info as the kernel settled it
  // (dev_id, nr_hw_queues, queue_depth, max_io_buf_bytes, flags).
  Result<ublksrv_ctrl_dev_info> AddDevice(const AddRequest& request);
  Status SetParams(int dev_id, const ublk_params& params);
  // Creates /dev/ublkbN, recording `daemon_pid` as the serving process.
  // Blocks until every queue has fetched all its tags.
  Status StartDevice(int dev_id, int daemon_pid);
  // Removes /dev/ublkbN after in-flight requests complete, then completes
  // every queue's pending fetches with UBLK_IO_RES_ABORT. Harmless on a
  // device that is not started.
  Status StopDevice(int dev_id);
  // STOP_DEV unless /dev/ublkbN is open: fails with IoError(EBUSY) then,
  // changing nothing. REQUIRES: features() has UBLK_F_SAFE_STOP_DEV.
  Status TryStopDevice(int dev_id);
  // Removes /dev/ublkcN and frees the id. Stops the device first if needed.
  // Blocks until no process holds /dev/ublkcN open.
  Status DeleteDevice(int dev_id);
  // Removes /dev/ublkcN without waiting for the id to be freed: the kernel
  // frees it when the last reference goes (a file system still mounted on a
  // force-stopped device keeps one until it is unmounted). DEL_DEV_ASYNC
  // (6.9+, ioctl-encoded kernels); a kernel that does not know it gets
  // DeleteDevice. Either way the device can no longer be found by a new
  // ADD_DEV of the same id until it is freed.
  Status DeleteDeviceNoWait(int dev_id);
  // Sets a started device's size to `sectors` (512 bytes each): the kernel
  // changes the disk's capacity and announces it (a uevent with RESIZE=1).
  // REQUIRES: features() has UBLK_F_UPDATE_SIZE (Linux 6.16+; older kernels
  // refuse the command). IoError(ENODEV) when the device is not started.
  Status UpdateSize(int dev_id, uint64_t sectors);
  // User recovery (device created with UBLK_F_USER_RECOVERY). START: the old
  // daemon is gone and has released /dev/ublkcN, the device waits
  // (AwaitsRecovery); IoError(EBUSY) while either is not so yet. Then the new
  // daemon opens /dev/ublkcN and fetches every tag, and END (blocking until
  // every queue has fetched them all, as START_DEV does) records
  // `daemon_pid`, makes the device live and re-issues the queued requests.
  Status StartUserRecovery(int dev_id);
  Status EndUserRecovery(int dev_id, int daemon_pid);
  // QUIESCE_DEV (see driver/ublk_abi.h): the kernel stops handing requests
  // to the daemon and aborts its idle fetches; waits at most `timeout_ms`
  // (IoError(EBUSY) then, with new requests already held back). Sent by the
  // daemon itself, which finishes the requests it holds and exits (upgrade).
  // REQUIRES: the device was added with UBLK_F_QUIESCE (EOPNOTSUPP if not).
  Status QuiesceDevice(int dev_id, uint32_t timeout_ms);
  // Fails with IoError(ENODEV) for an id with no device.
  Result<ublksrv_ctrl_dev_info> GetInfo(int dev_id);
  Result<ublk_params> GetParams(int dev_id);

 private:
  // Runs one command; returns the CQE result (>= 0) or an error naming it.
  Result<int> Run(const char* name, uint32_t op, const ublksrv_ctrl_cmd& cmd);
  static ublksrv_ctrl_cmd Header(int dev_id);

  int fd_ = -1;
  std::unique_ptr<uring::Ring> ring_;
  uint64_t features_ = 0;
  bool features_known_ = false;
  Opcodes ops_ = Opcodes::For(0);
};

// Ids of the ublk devices the kernel has (/sys/class/ublk-char-device/
// ublkcN), ascending; empty if none or no ublk.
std::vector<int> KernelDeviceIds();

// The message for a missing /dev/ublk-control.
inline constexpr const char* kNoUblkMessage =
    "the kernel has no ublk driver: modprobe ublk_drv (Linux 6.0+ with CONFIG_BLK_DEV_UBLK)";

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_CONTROL_H_
