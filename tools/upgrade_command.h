// `ublk-qcow2 upgrade -n ID`: hands a live device to a new daemon, the
// ublk-qcow2 now installed (this process's own binary), without failing any
// I/O: the way to put a new version in place under a mounted file system.
//
// Needs the kernel's UBLK_F_QUIESCE (GET_FEATURES; Linux 6.16+) and a device
// added with user recovery (add --recovery=reissue, the default, or fail-io)
// and with UBLK_F_QUIESCE (add asks for it where offered). Checked first,
// nothing changed on refusal (one line, exit 1): no such device, the kernel
// lacks UBLK_F_QUIESCE, --recovery=off, no record, no running daemon (then
// `recover` is what is needed), an encrypted image without --key-file.
//
// Then:
//   1. the old daemon is asked, on its control socket, to hand over
//      (driver/device_upgrade.cc): QUIESCE_DEV, the requests it holds
//      finished, the image flushed and closed cleanly (no leaks, not dirty),
//      /dev/ublkcN released: the device waits for a daemon, its new requests
//      held back by the kernel (with fail-io they fail meanwhile);
//   2. this process waits for the old daemon to exit (at most
//      kOldDaemonExitMs; one that does not is killed, the handover then is a
//      crash recovery, which loses nothing acknowledged either);
//   3. the new daemon starts as `recover -n ID` starts it
//      (tools/recover_command.h): START_USER_RECOVERY, fetch,
//      END_USER_RECOVERY, and the held-back requests reach it;
//   4. /dev/ublkbN is printed once the device is live again.
#ifndef UBLK_QCOW2_TOOLS_UPGRADE_COMMAND_H_
#define UBLK_QCOW2_TOOLS_UPGRADE_COMMAND_H_

#include <memory>

#include "base/status.h"
#include "tools/command.h"

namespace uq::tools {

struct UpgradeOptions {
  int id = -1;
};

Status RunUpgrade(const UpgradeOptions& options);

std::unique_ptr<Command> MakeUpgradeCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_UPGRADE_COMMAND_H_
