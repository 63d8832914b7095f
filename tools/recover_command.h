// `ublk-qcow2 recover -n ID`: a new daemon for a device whose daemon died.
//
// A device added with user recovery (add --recovery, the default where the
// kernel offers it) outlives its daemon: /dev/ublkbN stays, its I/O waits
// (reissue) or fails (fail-io). recover checks that device ID waits for a
// daemon (driver/admin.h PrepareRecover: its recorded daemon is gone and the
// kernel has quiesced it; waits a few seconds for a daemon that just died),
// then starts a daemon as `add` does, with the options of the device record:
// it opens the image (a writable open repairs what the crash left: a dirty
// lazy-refcounts image is rebuilt, leaked clusters stay leaks), sends
// START_USER_RECOVERY, fetches every tag, END_USER_RECOVERY, and reports.
// Prints /dev/ublkbN once the device is live again; the requests that waited
// are then served. With --foreground this process is the daemon, as with
// `add --foreground` (what the systemd unit runs, systemd/README.md).
// Errors (exit 1, one line, the device left as it was): no such device, no
// record, added without recovery, its daemon still running ("ublk device N
// is live: its daemon (pid P) is running"), the image.
#ifndef UBLK_QCOW2_TOOLS_RECOVER_COMMAND_H_
#define UBLK_QCOW2_TOOLS_RECOVER_COMMAND_H_

#include <memory>

#include "base/status.h"
#include "tools/command.h"

namespace uq::tools {

struct RecoverOptions {
  int id = -1;
  bool foreground = false;  // serve from this process, as add --foreground
};

Status RunRecover(const RecoverOptions& options);

std::unique_ptr<Command> MakeRecoverCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_RECOVER_COMMAND_H_
