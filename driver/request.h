// ServeRequest: one ublk request run on the image, and the result the kernel
// is told in COMMIT_AND_FETCH_REQ.
//
//   op            engine call                       result
//   READ          Read(offset, buffer[0, length))   length
//   WRITE         Write(offset, ..., fua)           length
//   FLUSH         Flush()                           0
//   DISCARD       Discard(offset, length)           0
//   WRITE_ZEROES  WriteZeroes(offset, length)       0
//   anything else                                   -EOPNOTSUPP
// Failures are -errno: the engine's (Status::ToNegativeErrno, -EIO unless
// it carries one), -EROFS for changes to a device opened read-only (-EIO
// once its image was marked corrupt while serving), -EINVAL for a
// request that does not fit the buffer, -EIO past the end of the device.
// Never a hang: every path returns.
//
// TryServeHere: the same for a request that the calling thread may serve
// itself (a read, or a write without FUA, on clusters whose mapping is
// published: BlockDevice::TryAnyThread); nullopt when it must go to
// ServeRequest on the device's thread.
//
// Thread model: ServeRequest runs on the device's (image's) thread;
// TryServeHere on any thread, its task on that thread.
#ifndef UBLK_QCOW2_DRIVER_REQUEST_H_
#define UBLK_QCOW2_DRIVER_REQUEST_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

#include "base/task.h"
#include "driver/ublk_abi.h"
#include "qcow2/block_device.h"

namespace uq::driver {

// `buffer` is the tag's buffer: the data of a write, the destination of a
// read; it must stay valid until the task completes.
Task<int32_t> ServeRequest(qcow2::BlockDevice& device, IoDescriptor request,
                           std::span<std::byte> buffer);

// The result for a request that failed with `status` (-errno), the failure
// logged to stderr (the first 100 of the process). Any thread.
int32_t FailRequest(const IoDescriptor& request, const Status& status);

std::optional<Task<int32_t>> TryServeHere(qcow2::BlockDevice& device, IoDescriptor request,
                                          std::span<std::byte> buffer);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_REQUEST_H_
