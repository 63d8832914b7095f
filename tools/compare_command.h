// `ublk-qcow2 compare`: whether two images show the guest the same bytes,
// answered as `qemu-img compare` (QEMU 7.2) answers it.
//
//   ublk-qcow2 compare [-s] [-f FMT] [-F FMT] [-p] [-q] [-U] IMAGE1 IMAGE2
//
// Each image is read through its whole backing chain (the guest view). The
// walk is qemu-img's: both chains are asked for their status from the same
// offset (tools/chain_status.h); ranges both say read as zeros are skipped
// unread, ranges allocated in both are read and compared, and a range
// allocated in one only must read as zeros there. The first difference is
// reported as the offset of its 512-byte sector, counted from the start of
// the range being compared (ranges start on sector boundaries in practice).
// Images of different sizes compare over the common part, then the tail of
// the larger one must read as zeros ("Warning: Image size mismatch!").
// -s (strict) refuses different sizes and any difference of block status
// (data, zero, host offset, allocation, end of image) at the same offset,
// even over equal contents.
//
// Outcome on stdout ("Images are identical.", "Content mismatch at offset
// N!", ...; nothing with -q) and in the exit status, qemu-img's numbering:
// 0 identical, 1 different (or a bad command line, as qemu-img compare
// exits), 2 an image would not open, 3 a block status query failed, 4 a
// read failed; errors are one line on stderr naming the file. -p draws
// qemu-img's progress line on stdout. Takes a reader's lock on every file
// of both chains unless -U.
#ifndef UBLK_QCOW2_TOOLS_COMPARE_COMMAND_H_
#define UBLK_QCOW2_TOOLS_COMPARE_COMMAND_H_

#include <memory>

#include "tools/command.h"

namespace uq::tools {

std::unique_ptr<Command> MakeCompareCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_COMPARE_COMMAND_H_
