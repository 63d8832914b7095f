// RebaseImage: the whole of `rebase` on any Env (the CLI uses SyncEnv; the
// crash test a FaultInjectionEnv). See rebase_command.h for the behaviour.
//
// Crash safety: the copies a safe rebase writes read exactly what the old
// chain reads there, so until the header changes the image reads as before;
// SetBackingFile makes them stable before it rewrites the header (one write
// of the header's sectors, then a sync, as QEMU does), after which the new
// chain shows through where nothing was copied, equal to the old one there.
#ifndef UBLK_QCOW2_TOOLS_REBASE_IMAGE_H_
#define UBLK_QCOW2_TOOLS_REBASE_IMAGE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"

namespace uq::tools {

struct RebaseRequest {
  qcow2::Env* env = nullptr;  // required
  std::string image;
  std::string format;          // IMAGE's: "", "qcow2" or "raw"
  std::string backing;         // the new backing file, "" for none
  std::string backing_format;  // -F: "", "qcow2" or "raw"
  bool unsafe = false;         // -u: change the header only
  bool lock_new_backing = true;
  std::function<void(uint64_t done, uint64_t total)> on_progress;  // may be empty
};

// Errors name IMAGE and carry qemu-img's words (rebase_command.h).
Task<Status> RebaseImage(const RebaseRequest& request);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_REBASE_IMAGE_H_
