// `ublk-qcow2 list`: the ublk devices, their state and what they serve.
//
//   ublk-qcow2 list [--output=human|json]
//
// One line per device the kernel has or a record names (driver/admin.h):
//
//   ID  DEVICE       STATE  QUEUES  DEPTH  PID   SIZE     IMAGE
//   0   /dev/ublkb0  live   1       128    812   1 GiB    /scratch/a.qcow2
//
// STATE is the kernel's (live, dead, quiesced) or "gone" for a record whose
// device no longer exists; PID is "-" when no daemon runs; IMAGE is "-" for
// devices ublk-qcow2 did not create. Nothing is printed when there are no
// devices (JSON: []). JSON: an array of objects with the keys id, device,
// state, queues, depth, pid, daemon_running, size, read_only, image (null
// when unknown), flags (the UBLK_F_* flags the device was created with, as the
// kernel reports them: names without the prefix, "bit N" for bits without a
// name, see `features`; null for a record whose device is gone).
#ifndef UBLK_QCOW2_TOOLS_LIST_COMMAND_H_
#define UBLK_QCOW2_TOOLS_LIST_COMMAND_H_

#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "driver/admin.h"
#include "tools/command.h"

namespace uq::tools {

struct ListOptions {
  std::string output = "human";  // "human" or "json"
};

// The text `list` prints for `devices`.
std::string RenderDeviceList(const std::vector<driver::DeviceStatus>& devices,
                             const std::string& output);

Status RunList(const ListOptions& options);

std::unique_ptr<Command> MakeListCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_LIST_COMMAND_H_
