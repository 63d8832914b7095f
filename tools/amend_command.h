// `ublk-qcow2 amend`: changes a qcow2 image's options in place, as
// `qemu-img amend` (QEMU 7.2) does, with its flags, messages and exit status.
//
//   ublk-qcow2 amend [-p] [-q] [-f qcow2] -o OPTIONS IMAGE
//
// OPTIONS (several -o are joined with ','): compat=0.10|v2|1.1|v3,
// lazy_refcounts=on|off, data_file_raw=on|off (off only: QEMU sets it only
// at creation), data_file=NAME (images with a data file), size=SIZE (grow or
// shrink; 0 changes nothing), refcount_bits=N (checked; changing the width is
// not supported yet), backing_file/backing_fmt (only the current values:
// `rebase` changes them). `-o help` lists them. Options only create takes
// (cluster_size, extended_l2, preallocation, compression_type, encryption)
// are refused as QEMU refuses them. Every failure is one line on stderr and
// exit 1, the image unchanged (divergence: QEMU applies some options before
// it refuses a later one; we judge them all first). Images with persistent
// bitmaps are refused (we do not maintain bitmaps yet).
//
// The work is the engine's (Qcow2Image::Amend, qcow2/qcow2_amend.cc, for its
// order of writes and crash safety).
#ifndef UBLK_QCOW2_TOOLS_AMEND_COMMAND_H_
#define UBLK_QCOW2_TOOLS_AMEND_COMMAND_H_

#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "qcow2/amend_options.h"
#include "qcow2/header.h"
#include "tools/command.h"

namespace uq::tools {

// What `amend -o LIST` asks of an image whose header is `header`: QEMU's
// option parsing and checks that need no image data, in QEMU's order, with
// its messages (prefixed by `image`: "<image>: Invalid parameter 'x'").
Result<qcow2::AmendOptions> ParseAmendOptions(std::string_view list, const qcow2::Header& header,
                                              const std::string& image);

// qemu-img amend -o help's list for qcow2.
extern const char kAmendHelp[];

std::unique_ptr<Command> MakeAmendCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_AMEND_COMMAND_H_
