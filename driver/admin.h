// Managing devices from outside their daemons: what `ublk-qcow2 del` and
// `ublk-qcow2 list` do.
//
// Deleting device N:
//   1. find its daemon: the pid in its record, else the pid the kernel has
//      (GET_DEV_INFO), trusted only if the kernel names it or the process is
//      a ublk-qcow2;
//   2. unless `force`, refuse when /dev/ublkbN is in use (SafeStopFor in
//      driver/ublk_abi.h: the kernel's TRY_STOP_DEV on 7.0+, an exclusive
//      open before): Busy "ublk device N is in use ...", nothing changed.
//      Retried for a second first, since udev's probe holds a new device
//      for a moment;
//   3. STOP_DEV (or the TRY_STOP_DEV of step 2): the kernel removes /dev/ublkbN once in-flight I/O
//   is done,
//      and the daemon drains, closes the image cleanly and deletes the device
//      itself (DEL_DEV) before exiting;
//   4. wait for the daemon to exit, at most `timeout_ms`; a daemon still
//      running then is killed (SIGKILL) and the deletion reported as failed,
//      since its image may not have been closed cleanly; a daemon whose log
//      ends with an error (e.g. the image's Close failed) fails it too;
//   5. DEL_DEV if the device still exists (no daemon, or it died), and
//      remove the record.
// A device that does not exist is an error (InvalidArgument "ublk device N
// does not exist"), unless a stale record of it remains: that is removed and
// the deletion succeeds.
//
// Thread model: single-threaded.
#ifndef UBLK_QCOW2_DRIVER_ADMIN_H_
#define UBLK_QCOW2_DRIVER_ADMIN_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "driver/control.h"
#include "driver/state_file.h"

namespace uq::driver {

struct DeleteOptions {
  int timeout_ms = 30'000;
  // Stop even while /dev/ublkbN is open or mounted (its users then get I/O
  // errors, as when a disk is pulled).
  bool force = false;
};

Status DeleteDevice(ControlDevice& control, int dev_id, const DeleteOptions& options);

// Every device id the kernel or a record knows, ascending.
std::vector<int> KnownDeviceIds();

// One line of `list`.
struct DeviceStatus {
  int id = -1;
  std::string block_path;
  // "live", "dead", "quiesced", "fail-io", "gone" (stale record), or
  // "awaiting-recovery": the device outlived its daemon (user recovery; the
  // kernel's state quiesced or fail-io, no daemon): `recover -n ID`.
  std::string state;
  std::string recovery;  // RecoveryModeName of its flags; "" if unknown
  uint16_t queues = 0;
  uint16_t depth = 0;
  int pid = 0;  // the daemon's, 0 if unknown
  bool daemon_running = false;
  uint64_t size = 0;  // bytes, 0 if unknown
  bool read_only = false;
  std::string image;  // "" if the device has no record (not ours)
  // UBLK_F_* the device was created with, as the kernel reports them; none
  // for a stale record (no device to ask).
  std::optional<uint64_t> flags;
};

Result<DeviceStatus> DescribeDevice(ControlDevice& control, int dev_id);

// For `recover -n ID`: the record of device `dev_id`, once the device waits
// for a new daemon. Waits up to `timeout_ms` for the kernel to notice a
// daemon that just died (the state turns from live to quiesced or fail-io).
// Errors, one line each: no such device (InvalidArgument), no record
// (NotFound-like InvalidArgument), added without recovery, its daemon still
// running (Busy "ublk device N is live: its daemon (pid P) is running").
Result<DeviceRecord> PrepareRecover(ControlDevice& control, int dev_id, int timeout_ms);

// True if `pid` is a running process whose command is ublk-qcow2.
bool IsUblkQcow2Process(int pid);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_ADMIN_H_
