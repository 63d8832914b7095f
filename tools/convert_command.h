// `ublk-qcow2 convert`: an image's contents into a raw file.
//
//   ublk-qcow2 convert [-f qcow2|raw] [-O raw] [-p] [-m N] [--io=auto|uring|sync]
//                      IMAGE OUTPUT
//
// Opens IMAGE read-only (with its backing chain), creates or truncates OUTPUT
// and sizes it to the virtual size, then copies with N chunks of 1 MiB in
// flight, writing only the non-zero 4 KiB blocks so OUTPUT is sparse where
// the image reads as zeros. An existing block device (or other non-regular
// file) as OUTPUT is neither created nor truncated; it must be large enough,
// and zero ranges are explicitly zeroed on it. OUTPUT is synced at the end.
// I/O goes through io_uring when a ring can be set up (--io=auto), else with
// blocking syscalls. -O qcow2 is not implemented yet.
#ifndef UBLK_QCOW2_TOOLS_CONVERT_COMMAND_H_
#define UBLK_QCOW2_TOOLS_CONVERT_COMMAND_H_

#include <memory>
#include <string>

#include "base/status.h"
#include "tools/command.h"

namespace uq::tools {

struct ConvertOptions {
  std::string source;
  std::string target;
  std::string source_format;          // "", "qcow2" or "raw"
  std::string target_format = "raw";  // "raw" or "qcow2"
  bool compress = false;              // -c: compressed clusters (qcow2 output)
  std::string create_options;         // -o: qemu-img create options (qcow2 output)
  bool progress = false;              // qemu-img's -p line on stdout
  int parallel = 16;                  // chunks in flight
  std::string io = "auto";            // "auto", "uring" or "sync"
  bool force_share = false;           // -U: no locks on the source chain
  // --bitmaps: copy IMAGE's persistent bitmaps (names, granularities, enabled
  // flags, bits) into a qcow2 v3 OUTPUT, as qemu-img does; refused, before
  // OUTPUT is touched, for raw or v2 output and for a bitmap in use.
  bool bitmaps = false;
  // --skip-broken-bitmaps (with --bitmaps): a bitmap in use is left out, with
  // a warning on stderr, instead of refusing the conversion (qemu-img's).
  bool skip_broken_bitmaps = false;
};

// Does the whole conversion. Errors name the file concerned; on failure
// OUTPUT may be left partly written.
Status RunConvert(const ConvertOptions& options);

std::unique_ptr<Command> MakeConvertCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_CONVERT_COMMAND_H_
