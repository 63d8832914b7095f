// `ublk-qcow2 map`: which guest ranges hold data, zeros or nothing, in which
// layer of the backing chain and where in which host file, printed exactly as
// `qemu-img map` (QEMU 7.2) prints it.
//
//   ublk-qcow2 map [--output=human|json] [--start-offset=N] [--max-length=N]
//                  [-f qcow2|raw] [-U] IMAGE
//
// Each layer answers BlockDevice::BlockStatus for itself; this module walks
// the chain as QEMU's block layer does: a range one layer leaves unallocated
// is asked of the layer below (depth counts the layers passed), and reads as
// zeros, not present, where there is no layer below or the range lies past
// its end. Neighbouring ranges merge when depth, present, zero, data and file
// agree and their host offsets (if any) run on. JSON lists every range; the
// human form lists the data ranges with a host offset only, and fails, as
// qemu-img does, on data without one (compressed clusters).
//
// `map --bitmap NAME` (our extension; qemu-img has none, QEMU serves bitmaps
// only over NBD as qemu:dirty-bitmap:NAME) prints persistent bitmap NAME's
// extents instead, so that a backup tool can copy only what changed: human,
// the dirty ranges only, "Offset          Length" then one line each (hex as
// qemu-img map's columns); JSON, every range in order, dirty or clean:
//   [{ "start": 0, "length": 131072, "dirty": true},
//   { "start": 131072, "length": 1073610752, "dirty": false}]
// Ranges are whole granules, the last one cut at the disk's end; within
// --start-offset/--max-length. A missing or inconsistent (in use) bitmap is
// one error line (QEMU's message), exit 1.
//
// Reads only metadata, through SyncEnv; takes a reader's lock on each image
// unless -U.
#ifndef UBLK_QCOW2_TOOLS_MAP_COMMAND_H_
#define UBLK_QCOW2_TOOLS_MAP_COMMAND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/block_device.h"
#include "tools/command.h"

namespace uq::tools {

// One line of qemu-img map's output (QEMU's MapEntry).
struct MapEntry {
  uint64_t start = 0;
  uint64_t length = 0;
  uint64_t depth = 0;
  bool present = false;
  bool zero = false;
  bool data = false;
  bool has_offset = false;
  uint64_t offset = 0;
  const std::string* file = nullptr;  // set with has_offset
};

// The entry for the longest run from `offset` (at most `length` bytes) that
// one walk down `top`'s chain describes. REQUIRES: 0 < length and
// offset + length <= top.size(). Errors: those of BlockStatus.
Task<Result<MapEntry>> MapEntryAt(qcow2::BlockDevice& top, uint64_t offset, uint64_t length);

// Whether `next` continues `curr` as one line (qemu-img's rule).
bool Mergeable(const MapEntry& curr, const MapEntry& next);

std::unique_ptr<Command> MakeMapCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_MAP_COMMAND_H_
