// `ublk-qcow2 commit`: write an overlay's changes into its backing file, as
// `qemu-img commit` (QEMU 7.2) does.
//
//   ublk-qcow2 commit [-b BASE] [-d] [-p] [-q] [-f FMT] IMAGE
//
// Opens IMAGE writable and each image below it on its own (without its
// backing chain) down to the base: IMAGE's backing file, or BASE further down
// (found as QEMU finds it: the name taken relative to the directory of the
// image that names it, compared by real path). The base (raw or qcow2) opens
// writable, with its own chain. A raw base shorter than IMAGE grows to its
// size first, as QEMU's commit job truncates it. CommitAbove then writes what
// IMAGE and the images between decide into the base; the base is flushed;
// and only then, unless -d (or -b, which implies -d as in QEMU), IMAGE is
// emptied: every cluster unallocated (Qcow2Image::Unallocate, QEMU's
// make_empty), so it reads the base through. No backing link is rewritten:
// after -b the images between IMAGE and BASE no longer read as before, as
// QEMU warns. Prints "Image committed." (not with -q).
//
// Crash safety: until the base is flushed IMAGE is untouched and still shows
// its data over whatever reached the base; IMAGE's clusters are dropped only
// after the base holds their data durably, so at any point IMAGE reads as
// before and the base holds old or committed data in each cluster.
//
// Errors (exit 1, qemu-img's words): "Image does not have a backing file";
// "Did not find 'BASE' in the backing chain of 'IMAGE'". A qcow2 base shorter
// than IMAGE is refused (growing a qcow2 image is not implemented here).
#ifndef UBLK_QCOW2_TOOLS_COMMIT_COMMAND_H_
#define UBLK_QCOW2_TOOLS_COMMIT_COMMAND_H_

#include <memory>

#include "tools/command.h"

namespace uq::tools {

std::unique_ptr<Command> MakeCommitCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_COMMIT_COMMAND_H_
