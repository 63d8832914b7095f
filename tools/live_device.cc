#include "tools/live_device.h"

#include <fmt/format.h>

#include <algorithm>
#include <string>
#include <vector>

#include "driver/control.h"
#include "driver/control_client.h"
#include "driver/state_file.h"

namespace uq::tools {

Result<nlohmann::json> CallLiveDevice(int id, const nlohmann::json& request, int timeout_ms) {
  const std::string who = fmt::format("ublk device {}", id);
  const std::string socket = driver::SocketPath(id);
  Result<nlohmann::json> answer = driver::CallControlSocket(socket, request, timeout_ms);
  if (answer.ok() || !answer.status().IsNotSupported()) return answer;
  const std::vector<int> ids = driver::KernelDeviceIds();
  if (std::find(ids.begin(), ids.end(), id) == ids.end()) {
    return Status::InvalidArgument(fmt::format("{} does not exist", who));
  }
  return Status::NotSupported(
      fmt::format("{}: no ublk-qcow2 daemon is listening on {}", who, socket));
}

}  // namespace uq::tools
