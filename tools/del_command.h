// `ublk-qcow2 del`: stop and remove ublk devices.
//
//   ublk-qcow2 del -n ID [--force] [--timeout=SECONDS]
//   ublk-qcow2 del --all [--force] [--timeout=SECONDS]
//
// Refuses a device that is in use (mounted, or open: see DeleteDevice in
// driver/admin.h) unless --force. Stops the device (its daemon then closes the image cleanly and
// exits), waits for the daemon at most --timeout seconds, deletes the device if the daemon did not,
// and removes its record (driver/admin.h). An id with no device is an error. --all removes every
// device and stale record; it carries on past failures and reports the first.
#ifndef UBLK_QCOW2_TOOLS_DEL_COMMAND_H_
#define UBLK_QCOW2_TOOLS_DEL_COMMAND_H_

#include <memory>

#include "base/status.h"
#include "tools/command.h"

namespace uq::tools {

struct DelOptions {
  int id = -1;
  bool all = false;
  bool force = false;
  int timeout_s = 30;
};

Status RunDel(const DelOptions& options);

std::unique_ptr<Command> MakeDelCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_DEL_COMMAND_H_
