// `ublk-qcow2 create`: make a qcow2 image, like `qemu-img create -f qcow2`.
#ifndef UBLK_QCOW2_TOOLS_CREATE_COMMAND_H_
#define UBLK_QCOW2_TOOLS_CREATE_COMMAND_H_

#include <memory>

#include "tools/command.h"

namespace uq::tools {

std::unique_ptr<Command> MakeCreateCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_CREATE_COMMAND_H_
