// `ublk-qcow2 snapshot`: lists, creates, applies and deletes internal
// snapshots, as `qemu-img snapshot` (QEMU 7.2) does, with its flags,
// output, messages and exit statuses.
//
//   ublk-qcow2 snapshot -l | -c NAME | -a NAME | -d NAME [-f FMT] [-q] [-U] IMAGE
//   ublk-qcow2 snapshot -l | -c NAME | -d NAME -n ID
//
// With -n ID the running device's daemon does it between requests
// (driver/device_snapshot.cc): the snapshot holds every write acknowledged
// before the command returns and none sent after it; the device keeps
// serving. -a on a running device is refused (one line, exit 1).
//
// -l prints qemu-img's table ("Snapshot list:", then ID, TAG, VM SIZE, DATE,
// VM CLOCK, ICOUNT; nothing for an image without snapshots). -c records the
// time (seconds, microseconds), vm-state size 0, vm clock 0 and icount 0, as
// qemu-img does; the name is cut to 255 bytes and need not be unique (qemu-img
// allows duplicates). -a finds NAME as an id first, then as a name (QEMU's
// find_snapshot_by_id_or_name); -d as a name only (qemu-img 7.2's
// bdrv_snapshot_find: `-d 1` does not find id 1). Giving more than one of -l/-a/-c/-d is an error;
// none of them does nothing. Every error is one line naming the image with qemu-img's wording, exit
// 1 (usage errors too, as qemu-img's), and leaves the image unchanged: it is opened read-only and
// inspected first.
//
// Divergences: -f qcow2|raw is accepted (qemu-img 7.2's snapshot has no -f);
// -c and -d refuse images with persistent dirty bitmaps, which QEMU keeps
// up to date and we do not maintain yet (opening them writable would mark
// them in use).
//
// The work is the engine's (Qcow2Image::CreateSnapshot and friends in
// qcow2/qcow2_image.h, crash-safe by one header write each).
#ifndef UBLK_QCOW2_TOOLS_SNAPSHOT_COMMAND_H_
#define UBLK_QCOW2_TOOLS_SNAPSHOT_COMMAND_H_

#include <memory>

#include "tools/command.h"

namespace uq::tools {

std::unique_ptr<Command> MakeSnapshotCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_SNAPSHOT_COMMAND_H_
