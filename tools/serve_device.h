// The end of `add` and `recover`: start the device's daemon (or, with
// --foreground, be it) and print /dev/ublkbN once the device is live.
#ifndef UBLK_QCOW2_TOOLS_SERVE_DEVICE_H_
#define UBLK_QCOW2_TOOLS_SERVE_DEVICE_H_

#include <chrono>

#include "base/status.h"
#include "driver/daemon.h"

namespace uq::tools {

// In the background (driver::StartDaemon, which waits at most `timeout` for
// the daemon's verdict) the call returns once the device is live; in the
// foreground (driver::ServeInForeground) it returns when the device stops.
// IoError "standard output: write failed" when the device's name could not
// be printed.
Status ServeAndPrintDevice(const driver::DeviceOptions& device, bool foreground,
                           std::chrono::milliseconds timeout = driver::kDefaultStartTimeout);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_SERVE_DEVICE_H_
