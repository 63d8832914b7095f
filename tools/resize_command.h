// `ublk-qcow2 resize`: changes an image's virtual size, as `qemu-img resize`
// (QEMU 7.2) does, with its flags, messages and exit statuses.
//
//   ublk-qcow2 resize [--shrink] [--preallocation=off|metadata|falloc|full]
//                     [-f qcow2|raw] [-q] IMAGE [+|-]SIZE
//   ublk-qcow2 resize -n ID [--shrink] [-q] [+|-]SIZE
//
// SIZE takes qemu-img's suffixes (k, M, G, T, P, E); a leading + or - makes
// it relative to the current size (a negative SIZE needs no "--": like
// qemu-img, the last argument is always the size). The new size must be
// positive and a multiple of 512; shrinking needs --shrink (it deletes the
// data past the new end) and takes no preallocation. On success prints
// "Image resized." (unless -q).
//
// The work is the image's own (BlockDevice::Resize; for qcow2 see
// Qcow2Image::Resize in qcow2/qcow2_image.h for its crash safety); this verb
// opens the image writable with a writer's lock, resizes it and closes it.
//
// With -n ID it resizes a running device instead: it asks the device's
// daemon on its control socket (/run/ublk-qcow2/ID.sock) for the current
// size, applies SIZE to it as above, and has the daemon resize the image and
// the kernel's device (driver::Device::Resize; needs the kernel's
// UBLK_F_UPDATE_SIZE, Linux 6.16+). Errors: a device that does not exist,
// one without a daemon, the daemon's refusal (missing kernel feature, a
// shrink without --shrink, a size the image refuses), one line, exit 1.
#ifndef UBLK_QCOW2_TOOLS_RESIZE_COMMAND_H_
#define UBLK_QCOW2_TOOLS_RESIZE_COMMAND_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>

#include "base/status.h"
#include "tools/command.h"

namespace uq::tools {

// A parsed SIZE argument: absolute, or relative to the current size.
struct SizeChange {
  enum class Kind { kAbsolute, kGrow, kShrink } kind = Kind::kAbsolute;
  uint64_t bytes = 0;
  // The new size for an image of `current` bytes, or InvalidArgument "New
  // image size must be positive" (zero, or below zero, or past 2^63).
  Result<uint64_t> Apply(uint64_t current) const;
};

// "+1G", "-512K", "20G", "1000000". Errors: qemu's size parser's message.
Result<SizeChange> ParseSizeChange(std::string_view text);

std::unique_ptr<Command> MakeResizeCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_RESIZE_COMMAND_H_
