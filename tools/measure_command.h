// `ublk-qcow2 measure`: how large a file a new image would need, printed as
// `qemu-img measure` (QEMU 7.2) prints it.
//
//   ublk-qcow2 measure [--output=human|json] [-O qcow2|raw] [-o OPTIONS]
//                      [-U] (--size N | [-f qcow2|raw] [-l SNAPSHOT] IMAGE)
//
// For a new image of N bytes (--size, with qemu-img's suffixes), or for a
// copy of IMAGE (its whole backing chain, as convert copies it; with -l, the
// image as it was at an internal snapshot, at its current size): the size
// the file needs ("required size") and would reach with every cluster
// allocated ("fully allocated size"), plus, for a qcow2 v3 IMAGE measured for
// qcow2 v3, the space of its persistent bitmaps ("bitmaps size"). The output
// format is raw by default, as with qemu-img; -o takes create's options
// (cluster_size, compat, refcount_bits, extended_l2, preallocation,
// backing_file, ...), judged as qemu-img measure judges them. The sizes come
// from qcow2/create/measure.h; this verb finds the source's data by walking
// its block status down the chain (map's MapEntryAt), and reads its bitmap
// directory.
//
// Errors exit 1 with qemu-img's message on one line (qemu-img sometimes adds
// a second, e.g. "Invalid options for file format 'qcow2'"); a flag the
// verb does not know exits 2 (qemu-img 7.2 prints its help and exits 0).
// Not supported: encrypt.format=luks (refused with a message, exit 1), -o help
// (qemu-img lists the options; ours calls "help" an invalid parameter), and
// --object / --image-opts (unknown flags, exit 2).
//
// Reads only metadata, through SyncEnv; takes a reader's lock on each image
// unless -U.
#ifndef UBLK_QCOW2_TOOLS_MEASURE_COMMAND_H_
#define UBLK_QCOW2_TOOLS_MEASURE_COMMAND_H_

#include <memory>

#include "tools/command.h"

namespace uq::tools {

std::unique_ptr<Command> MakeMeasureCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_MEASURE_COMMAND_H_
