// Sizes as QEMU's command line and option lists take them (qemu_strtosz):
// "512", "64k", "1.5G", "0x1000", with binary suffixes b/k/M/G/T/P/E in any
// case. Used by `-o size=...` and by the verbs' SIZE arguments.
#ifndef UBLK_QCOW2_QCOW2_CREATE_PARSE_SIZE_H_
#define UBLK_QCOW2_QCOW2_CREATE_PARSE_SIZE_H_

#include <cstdint>
#include <string_view>

#include "base/status.h"

namespace uq::qcow2 {

// The size `text` names. Errors: InvalidArgument worded as QEMU words it,
// naming the parameter `key`: "Parameter 'size' expects a non-negative number
// below 2^64 (optional suffix k, M, G, T, P or E means ...)".
Result<uint64_t> ParseSize(std::string_view key, std::string_view text);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_CREATE_PARSE_SIZE_H_
