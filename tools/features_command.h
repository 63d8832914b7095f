// `ublk-qcow2 features`: what this kernel's ublk driver offers, and which of
// it `add` uses.
//
//   ublk-qcow2 features [--output=human|json]
//
// Asks /dev/ublk-control for its features (UBLK_U_CMD_GET_FEATURES, Linux
// 6.5+) and prints one line per UBLK_F_* flag the kernel offers, named as in
// <linux/ublk_cmd.h> without the prefix; bits newer than this program are
// shown as "bit N". The USED BY ADD column says which of them `add` asks for
// (driver::AddFlags, the default --recovery and --zero-copy):
//
//   FEATURE                 BIT  USED BY ADD
//   SUPPORT_ZERO_COPY       0    no
//   CMD_IOCTL_ENCODE        6    yes
//   bit 40                  40   no
//
// A kernel whose ublk predates GET_FEATURES offers no optional feature; that
// is said in one line instead of the table. JSON: an object
//   {"get-features": true, "mask": 1019, "features": ["SUPPORT_ZERO_COPY", ...],
//    "unknown": [40], "used-by-add": ["CMD_IOCTL_ENCODE"]}
// "mask" is the raw 64-bit answer, "features" the known names (lowest bit
// first), "unknown" the bit numbers without a name, "used-by-add" the names of
// what `add` asks for.
//
// No ublk (no /dev/ublk-control: module not loaded or not built): exit 1 with
// one line saying so.
#ifndef UBLK_QCOW2_TOOLS_FEATURES_COMMAND_H_
#define UBLK_QCOW2_TOOLS_FEATURES_COMMAND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "base/status.h"
#include "tools/command.h"

namespace uq::tools {

// The text `features` prints for a kernel that answered GET_FEATURES with
// `features` (`answered` false: it does not know the command).
std::string RenderFeatures(uint64_t features, bool answered, const std::string& output);

std::unique_ptr<Command> MakeFeaturesCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_FEATURES_COMMAND_H_
