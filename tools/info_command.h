// `ublk-qcow2 info`: what qemu-img info shows, as text or JSON.
//
//   ublk-qcow2 info [--output=human|json] [--backing-chain] [-f qcow2|raw] [-U] IMAGE
//
// Reads only metadata, through SyncEnv, holding a reader's lock on each image
// as qemu-img info does: an image a VM (or our daemon) writes is refused
// unless -U/--force-share, which takes no locks. -f raw describes IMAGE as a plain raw
// image whatever it holds (like qemu-img); -f qcow2 fails on anything else;
// without -f the format is probed. --backing-chain describes every image of
// the chain, top first (JSON: an array).
#ifndef UBLK_QCOW2_TOOLS_INFO_COMMAND_H_
#define UBLK_QCOW2_TOOLS_INFO_COMMAND_H_

#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "qcow2/image_info.h"
#include "tools/command.h"

namespace uq::tools {

struct InfoOptions {
  std::string image;
  std::string output = "human";  // "human" or "json"
  std::string format;            // "", "qcow2" or "raw"
  bool backing_chain = false;
  bool force_share = false;  // -U: take no image locks
};

// The ImageInfo entries `info` reports for `options` (one, or the chain).
Task<Result<std::vector<qcow2::ImageInfo>>> CollectImageInfo(qcow2::Env* env, InfoOptions options);

// The text `info` prints for `infos` in options.output's form.
std::string RenderImageInfo(const std::vector<qcow2::ImageInfo>& infos, const InfoOptions& options);

std::unique_ptr<Command> MakeInfoCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_INFO_COMMAND_H_
