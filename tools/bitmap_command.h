// `ublk-qcow2 bitmap`: adds, removes, clears, enables, disables and merges
// persistent dirty bitmaps, as `qemu-img bitmap` (QEMU 7.2) does:
//
//   ublk-qcow2 bitmap (--add | --remove | --clear | --enable | --disable |
//                      --merge SOURCE)... [-b SRC_IMAGE [-F SRC_FMT]]
//                     [-g GRANULARITY] [-f FMT] IMAGE BITMAP
//
// The operations apply to BITMAP in the order given; `--add` makes an enabled
// bitmap (`--add --disable`: a disabled one) of granularity -g (QEMU's
// default: the cluster size within 4..64 KiB); `--merge SOURCE` ORs bitmap
// SOURCE of IMAGE (or of SRC_IMAGE with -b) into BITMAP. As qemu-img, the
// first failing operation stops the list with "Operation OP on bitmap B
// failed: WHY" (exit 1) and those before it are kept; the bitmaps are
// written when the image is closed (Qcow2Image::StoreBitmaps: new clusters,
// then one header write). Usage errors exit 1 too, with qemu-img's messages.
// The messages differ from qemu-img's only where QEMU names its block node
// ('#block165'): we name the file.
#ifndef UBLK_QCOW2_TOOLS_BITMAP_COMMAND_H_
#define UBLK_QCOW2_TOOLS_BITMAP_COMMAND_H_

#include <memory>

#include "tools/command.h"

namespace uq::tools {

std::unique_ptr<Command> MakeBitmapCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_BITMAP_COMMAND_H_
