// Human-readable byte counts, the way qemu-img prints them.
#ifndef UBLK_QCOW2_TOOLS_SIZE_FORMAT_H_
#define UBLK_QCOW2_TOOLS_SIZE_FORMAT_H_

#include <cstdint>
#include <string>

namespace uq::tools {

// Formats `bytes` like qemu's size_to_str(): three significant digits ("%.3g")
// in the largest binary unit that keeps the number below 1000, with a space
// before the unit: "0 B", "999 B", "0.977 KiB" (1000 bytes), "196 KiB",
// "1.26 MiB", "64 MiB", "1 GiB", up to EiB.
std::string HumanSize(uint64_t bytes);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_SIZE_FORMAT_H_
