#include "tools/serve_device.h"

#include <cstdio>
#include <string>

namespace uq::tools {
namespace {

bool PrintLine(const std::string& line) {
  return std::fprintf(stdout, "%s\n", line.c_str()) >= 0 && std::fflush(stdout) == 0;
}

}  // namespace

Status ServeAndPrintDevice(const driver::DeviceOptions& device, bool foreground,
                           std::chrono::milliseconds timeout) {
  if (foreground) {
    bool printed = true;
    Status served = driver::ServeInForeground(
        device, [&](const driver::DeviceInfo& info) { printed = PrintLine(info.block_path); });
    if (!printed) return Status::IoError("standard output: write failed");
    return served;
  }
  ASSIGN_OR_RETURN(driver::DeviceInfo info, driver::StartDaemon(device, timeout));
  if (!PrintLine(info.block_path)) return Status::IoError("standard output: write failed");
  return Status::Ok();
}

}  // namespace uq::tools
