// `ublk-qcow2 check`: consistency check and repair, like `qemu-img check`.
#ifndef UBLK_QCOW2_TOOLS_CHECK_COMMAND_H_
#define UBLK_QCOW2_TOOLS_CHECK_COMMAND_H_

#include <memory>

#include "tools/command.h"

namespace uq::tools {

std::unique_ptr<Command> MakeCheckCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_CHECK_COMMAND_H_
