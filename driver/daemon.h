// Serving a device from a daemon process: what `ublk-qcow2 add` does.
//
// StartDaemon() forks a daemon (double fork + setsid, stdin and stdout on
// /dev/null, stderr on /dev/null until the device exists and then on
// /run/ublk-qcow2/<id>.log), which creates the Device and reports back
// through a pipe, one line each: "pid <pid>" first, "added <id>" once
// ADD_DEV made the device, then "ready <id>" once /dev/ublkbN is live, or
// "error <message>" after undoing its partial setup. The caller returns only
// then, so a successful return means the device is live, and a failed one
// that nothing is left behind. The caller waits at most `timeout` for the
// verdict: a daemon that has not reported by then (START_DEV stuck in the
// kernel, an image on a hung file system) is killed (SIGKILL), and the
// device it added is removed (STOP_DEV, DEL_DEV, record), or, for `recover`,
// left waiting for recovery as it was; the error says which. A daemon that
// dies without a verdict (a crash) is cleaned up after the same way. The device record
// (driver/state_file.h) is written by Device before the device goes live; the daemon serves until
// the device is stopped (`del`, or SIGTERM/SIGINT/SIGHUP), closes the image cleanly, deletes the
// device and its record, and exits 0 (1 if the image could not be closed cleanly).
//
// ServeInForeground() does the same in the calling process: on_ready runs
// once the device is live, then "READY=1" goes to a service manager that
// asked for it ($NOTIFY_SOCKET: systemd's Type=notify, driver/service_notify.h),
// then it serves until stopped. No time limit: a service manager keeps its own.
//
// Thread model: call from a single-threaded process (fork).
#ifndef UBLK_QCOW2_DRIVER_DAEMON_H_
#define UBLK_QCOW2_DRIVER_DAEMON_H_

#include <chrono>
#include <functional>

#include "base/status.h"
#include "driver/device.h"

namespace uq::driver {

// How long `add` and `recover` wait for a new daemon's verdict by default.
inline constexpr std::chrono::milliseconds kDefaultStartTimeout = std::chrono::seconds(30);

// REQUIRES: options.image is an absolute path (the daemon runs from /).
Result<DeviceInfo> StartDaemon(const DeviceOptions& options,
                               std::chrono::milliseconds timeout = kDefaultStartTimeout);

Status ServeInForeground(const DeviceOptions& options,
                         const std::function<void(const DeviceInfo&)>& on_ready);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_DAEMON_H_
