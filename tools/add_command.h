// `ublk-qcow2 add`: serve an image as a ublk block device.
//
//   ublk-qcow2 add -f IMAGE [-n ID] [-q QUEUES] [-d DEPTH] [--read-only]
//                  [--foreground] [--cache=none|writeback] [--cache-size=BYTES]
//                  [--preallocate=BYTES] [--recovery=reissue|fail-io|off]
//                  [--timeout=SECONDS] [--no-partition-scan]
//                  [--zero-copy=auto|on|off]
//
// --zero-copy: reads and writes of allocated, plain clusters move their data
// between the request's pages and the image file with io_uring fixed-buffer
// I/O, no copy through the daemon (UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY,
// Linux 6.16+; driver/zero_copy.h). auto (the default) uses it where
// GET_FEATURES offers both flags; on is an error naming the missing flag
// elsewhere; off never uses it.
//
// --no-partition-scan: the kernel reads no partition table when the device
// starts (UBLK_F_NO_AUTO_PART_SCAN, Linux 7.0+); where GET_FEATURES does not
// offer it, one error line naming the flag, exit 1, nothing created.
//
// --recovery: what the device does when its daemon dies (driver/ublk_abi.h,
// RecoveryMode): reissue (the default where the kernel offers it: I/O waits
// for `ublk-qcow2 recover -n N` and the requests in flight are re-issued),
// fail-io (Linux 6.13+: I/O fails until recover), off (I/O fails and the
// device goes). Asking for a mode the kernel lacks is an error. With
// recovery, writes that change metadata are acknowledged once the metadata
// is in the image file.
//
// --cache=none (the default, like qemu-nbd --cache=none) opens the image
// files with O_DIRECT; writeback goes through the host's page cache. Either
// way a FLUSH from the kernel reaches the disk (fdatasync). On a file system
// without O_DIRECT (ramfs) none falls back to writeback, with a warning.
// --preallocate grows the image file that far ahead of the clusters
// allocating writes take (fallocate; cut back when the device is deleted).
//
// Opens IMAGE first, in this process, to validate it (format, header, backing
// chain, writability): a bad image fails here with one line and nothing is
// created. Then, unless --foreground, forks a daemon that creates the device
// (driver/daemon.h) and prints /dev/ublkbN once the device is live; on
// failure prints the daemon's error, exit 1, and no device or daemon
// remains. A daemon that has not reported the device live within --timeout
// seconds (default 30) is killed and its device removed: one error line,
// exit 1. With --foreground the device is served by this process, which
// prints /dev/ublkbN when live and returns when the device is stopped
// (`ublk-qcow2 del`, SIGTERM, SIGINT).
#ifndef UBLK_QCOW2_TOOLS_ADD_COMMAND_H_
#define UBLK_QCOW2_TOOLS_ADD_COMMAND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "base/status.h"
#include "tools/command.h"

namespace uq::tools {

struct AddOptions {
  std::string image;
  int id = -1;  // -1: the kernel picks
  int queues = 1;
  int nthreads = 0;  // 0: one per queue; a multiple of queues (PER_IO_DAEMON above it)
  int depth = 128;
  bool read_only = false;
  bool foreground = false;
  std::string cache = "none";  // none | writeback
  uint64_t cache_size = 32ull << 20;
  uint64_t preallocate = 64ull << 20;
  uint64_t max_io = 1ull << 20;    // bytes; each tag's request buffer
  uint32_t poll_us = 0;            // busy-poll cap of each queue thread, µs
  std::string recovery;            // "" (default: reissue if offered), reissue, fail-io, off
  int timeout_s = 30;              // for the daemon's report (not with --foreground)
  bool no_partition_scan = false;  // UBLK_F_NO_AUTO_PART_SCAN (7.0+), else an error
  std::string zero_copy = "auto";  // auto | on | off (driver/zero_copy.h)
  bool batch_io = false;           // UBLK_F_BATCH_IO commands (driver/queue.h)
};

Status RunAdd(const AddOptions& options);

std::unique_ptr<Command> MakeAddCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_ADD_COMMAND_H_
