// The backing file link of a qcow2 header: the rules QEMU 7.2 applies when
// `qemu-img rebase` (or anything else) renames an image's backing file.
//
// Pure: works on a parsed Header and says whether the new header still fits
// in the first cluster, so that a caller can refuse a change before it
// touches anything (Qcow2Image::SetBackingFile writes the result).
#ifndef UBLK_QCOW2_QCOW2_BACKING_LINK_H_
#define UBLK_QCOW2_QCOW2_BACKING_LINK_H_

#include <optional>
#include <string>

#include "base/status.h"
#include "qcow2/header.h"

namespace uq::qcow2 {

// `header` naming `name` as its backing file ("" for none) in `format`
// (nullopt: no backing format extension; ignored when `name` is empty, as
// QEMU drops both together). Errors carry QEMU's bare reason, for the caller
// to put after "Could not change the backing file to '...': ":
//   - InvalidArgument "Invalid argument": a name longer than 1023 bytes, or a
//     backing file for an image whose raw external data file must be
//     readable alone (data_file_raw);
//   - NoSpace "No space left in the file header": the header, its extensions
//     and the name do not fit in the first cluster.
Result<Header> WithBackingFile(const Header& header, const std::string& name,
                               const std::optional<std::string>& format);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_BACKING_LINK_H_
