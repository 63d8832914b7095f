// Image locking compatible with QEMU's, so that QEMU (qemu-img, qemu-io,
// qemu-system) and ublk-qcow2 refuse to write an image the other has open.
//
// QEMU expresses permissions as byte-range OFD locks on the image file:
// holding a (shared) lock on byte 100+i says "I use permission i", holding
// one on 200+i says "I do not let others have permission i". Permissions:
// 0 consistent read, 1 write, 2 write-unchanged, 3 resize. A writer holds
// 100, 101, 103, 201 and 203; a reader holds 100, 201 and 203. Before taking
// its locks each side tests the bytes that would conflict.
//
// The locks belong to the open file description and vanish when it is closed.
#ifndef UBLK_QCOW2_QCOW2_IMAGE_LOCK_H_
#define UBLK_QCOW2_QCOW2_IMAGE_LOCK_H_

#include <string>

#include "base/status.h"

namespace uq::qcow2 {

// Takes QEMU's locks for a reader or a writer of the image open on `fd`.
// Busy, naming `path`, if another process's locks conflict.
Status LockImage(int fd, const std::string& path, bool writable);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_IMAGE_LOCK_H_
