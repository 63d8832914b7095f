// CommitImage: the whole of `commit` on any Env (the CLI uses SyncEnv; the
// crash test a FaultInjectionEnv). See commit_command.h for the behaviour:
// IMAGE opened writable without its chain, the images down to the base each
// on their own, the base writable with its chain; CommitAbove; the base
// flushed; then, unless `keep`, IMAGE emptied (Qcow2Image::Unallocate) and
// flushed; every image closed.
//
// Crash safety: IMAGE is not written until the base is flushed, and reads
// as before at every point: before that flush the base holds old or committed
// data in each sector under IMAGE's own clusters; after it, dropping IMAGE's
// clusters one by one exposes base data that equals them.
#ifndef UBLK_QCOW2_TOOLS_COMMIT_IMAGE_H_
#define UBLK_QCOW2_TOOLS_COMMIT_IMAGE_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"

namespace uq::tools {

struct CommitRequest {
  qcow2::Env* env = nullptr;  // required
  std::string image;
  std::string format;               // IMAGE's: "", "qcow2" or "raw"
  std::optional<std::string> base;  // -b: a backing file further down
  bool keep = false;                // -d: do not empty IMAGE
  bool lock = true;                 // QEMU-compatible image locks
  std::function<void(uint64_t done, uint64_t total)> on_progress;  // may be empty
};

// Errors name the file: "IMAGE: Image does not have a backing file",
// "IMAGE: Did not find 'BASE' in the backing chain of 'IMAGE'", those of
// opening, reading and writing the images.
Task<Status> CommitImage(const CommitRequest& request);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_COMMIT_IMAGE_H_
