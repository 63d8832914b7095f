// Copying a BlockDevice's contents into a File with many requests in flight:
// the data path of `convert -O raw`.
#ifndef UBLK_QCOW2_TOOLS_IMAGE_COPY_H_
#define UBLK_QCOW2_TOOLS_IMAGE_COPY_H_

#include <cstdint>
#include <functional>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/block_device.h"
#include "qcow2/file.h"

namespace uq::tools {

struct CopyOptions {
  // Workers, i.e. chunks being read or written at once. Clamped to [1, 256].
  int parallel = 16;
  // Bytes per chunk: one BlockDevice::Read each. REQUIRES: > 0.
  uint64_t chunk_size = uint64_t{1} << 20;
  // Zero detection granularity: runs of all-zero blocks of this many bytes
  // are not written. REQUIRES: > 0.
  uint64_t sparse_block = 4096;
  // True if the target already reads as zeros over the whole range (a file
  // just created or truncated and then sized): zero runs are skipped and stay
  // holes. False (a block device, old contents): they go out as File::Zero.
  bool target_zeroed = true;
  // Sync the target at the end. Off for character devices and FIFOs, which
  // cannot (fdatasync fails with EINVAL).
  bool sync = true;
  // Called after each chunk with (bytes done, bytes total), on the thread
  // that drives the copy. May be empty.
  std::function<void(uint64_t, uint64_t)> on_progress;
};

struct CopyStats {
  uint64_t bytes_total = 0;    // the source's size
  uint64_t bytes_written = 0;  // written with File::Write
  uint64_t bytes_zero = 0;     // read as zeros: skipped or zeroed
  int max_in_flight = 0;       // most chunks being worked on at once
};

// Copies [0, source.size()) of `source` to the same offsets of `target`,
// then syncs `target` (unless options.sync is off). The target must already be source.size() bytes
// long (or grow on write, as regular files do).
//
// Work is spread over `parallel` coroutine workers, each taking the next
// chunk, reading it and writing its non-zero runs; with an asynchronous Env
// their reads and writes overlap. Drive the task with BlockOn(task, loop).
// The first error stops the copy: chunks already started finish, none
// starts, the task returns that error (which names the file). Both `source`
// and `target` must outlive the task.
Task<Result<CopyStats>> CopyToFile(qcow2::BlockDevice& source, qcow2::File& target,
                                   CopyOptions options);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_IMAGE_COPY_H_
