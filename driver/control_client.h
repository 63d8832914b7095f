// The client side of a daemon's control socket (driver/control_socket.h):
// one request, one answer, for verbs such as `ublk-qcow2 resize -n ID`.
//
// Thread model: plain blocking calls.
#ifndef UBLK_QCOW2_DRIVER_CONTROL_CLIENT_H_
#define UBLK_QCOW2_DRIVER_CONTROL_CLIENT_H_

#include <nlohmann/json.hpp>
#include <string>

#include "base/status.h"

namespace uq::driver {

// Sends `request` (a JSON object with "verb") as one line on the socket at
// `path` and waits at most `timeout_ms` for the answer line. Returns the
// answer object (with "ok":true) on success. Errors:
//   - NotSupported "no daemon is listening on PATH" when the socket file is
//     missing or refuses connections (the daemon is gone);
//   - the daemon's "error" message as IoError when it refused the request;
//   - IoError naming the path when the connection fails, the daemon closes
//     it without an answer, the answer is not JSON, or the time runs out.
Result<nlohmann::json> CallControlSocket(const std::string& path, const nlohmann::json& request,
                                         int timeout_ms);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_CONTROL_CLIENT_H_
