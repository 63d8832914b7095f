// Serving a device from a daemon process: what `ublk-qcow2 add` does.
//
// StartDaemon() forks a daemon (double fork + setsid, stdin and stdout on
// /dev/null, stderr on /dev/null until the device exists and then on
// /run/ublk-qcow2/<id>.log), which creates the Device and reports back
// through a pipe: "ready <id>" once /dev/ublkbN exists, or "error <message>"
// after undoing its partial setup. The caller returns only then, so a
// successful return means the device is live, and a failed one that nothing
// is left behind. The device record (driver/state_file.h) is written by
// Device before the device goes live; the daemon serves until the device is stopped (`del`, or
// SIGTERM/SIGINT/SIGHUP), closes the image cleanly, deletes the device and its record, and exits 0
// (1 if the image could not be closed cleanly).
//
// ServeInForeground() does the same in the calling process: on_ready runs
// once the device is live, then it serves until stopped.
//
// Thread model: call from a single-threaded process (fork).
#ifndef UBLK_QCOW2_DRIVER_DAEMON_H_
#define UBLK_QCOW2_DRIVER_DAEMON_H_

#include <functional>

#include "base/status.h"
#include "driver/device.h"

namespace uq::driver {

// REQUIRES: options.image is an absolute path (the daemon runs from /).
Result<DeviceInfo> StartDaemon(const DeviceOptions& options);

Status ServeInForeground(const DeviceOptions& options,
                         const std::function<void(const DeviceInfo&)>& on_ready);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_DAEMON_H_
