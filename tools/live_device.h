// Talking to a running device's daemon from a verb (`resize -n ID`,
// `snapshot -n ID`): one request on its control socket
// (driver/control_socket.h), with the errors a user should see when there is
// no such device or no daemon.
#ifndef UBLK_QCOW2_TOOLS_LIVE_DEVICE_H_
#define UBLK_QCOW2_TOOLS_LIVE_DEVICE_H_

#include <nlohmann/json.hpp>

#include "base/status.h"

namespace uq::tools {

// How long a verb waits for the daemon's answer: long, since the work (a
// grow that moves the L1 table, a snapshot of a large image) syncs the image.
inline constexpr int kLiveTimeoutMs = 300'000;

// Sends `request` to device `id`'s daemon and returns its answer. Errors:
// InvalidArgument "ublk device N does not exist"; NotSupported "ublk device N:
// no ublk-qcow2 daemon is listening on PATH" (a device of another server, or
// a dead daemon); the daemon's own one-line error; IoError for a failed
// exchange, prefixed "ublk device N".
Result<nlohmann::json> CallLiveDevice(int id, const nlohmann::json& request,
                                      int timeout_ms = kLiveTimeoutMs);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_LIVE_DEVICE_H_
