// `ublk-qcow2 rebase`: change the backing file of a qcow2 image, as
// `qemu-img rebase` (QEMU 7.2) does.
//
//   ublk-qcow2 rebase [-u] [-p] [-q] [-f FMT] [-U] -b BACKING [-F FMT] IMAGE
//
// Safe mode (the default) opens IMAGE writable with its backing chain and the
// new backing file (named relative to IMAGE's directory, as QEMU resolves
// it), copies into IMAGE every range it leaves unallocated where the two
// chains read differently (CopyChainDifferences), flushes, and then rewrites
// the header to name BACKING (Qcow2Image::SetBackingFile): the guest sees the
// same bytes before, during and after. `-b ""` removes the backing file (what
// the old chain provided is copied in first). With -u only the header
// changes; neither backing file is opened, so a moved backing file can be
// renamed.
//
// QEMU's errors, one line, exit 1: "Must specify backing file (-b) or use
// unsafe mode (-u)"; "Could not open new backing file 'X': ..."; "Could not
// change the backing file to 'X': backing format must be specified" (a new
// backing file needs -F) / "Invalid argument" (a name over 1023 bytes, a raw
// external data file) / "No space left in the file header" / "Operation not
// supported" (a raw image). Unlike qemu-img, which checks the header last,
// after copying, these are checked before anything is written, so a refused
// rebase leaves IMAGE as it was.
#ifndef UBLK_QCOW2_TOOLS_REBASE_COMMAND_H_
#define UBLK_QCOW2_TOOLS_REBASE_COMMAND_H_

#include <memory>

#include "tools/command.h"

namespace uq::tools {

std::unique_ptr<Command> MakeRebaseCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_REBASE_COMMAND_H_
