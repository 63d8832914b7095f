// File I/O on a ring: turns a qcow2::IoRequest into SQEs and sees it through.
//
// This is the one place where IoRequest ops become io_uring opcodes:
//   kRead    IORING_OP_READ
//   kWrite   IORING_OP_WRITE
//   kSync    IORING_OP_FSYNC with IORING_FSYNC_DATASYNC
//   kDiscard IORING_OP_FALLOCATE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
//   kAllocate IORING_OP_FALLOCATE, mode 0 (EOPNOTSUPP, EINVAL: success)
//   kZero    IORING_OP_FALLOCATE, FALLOC_FL_ZERO_RANGE; if the file system
//            cannot (EOPNOTSUPP, EINVAL, ENODEV), zeros are written with
//            blocking pwrite on the ring's thread (rare: block devices, some
//            network file systems).
// Short transfers are continued from where they stopped (req.progress counts
// the bytes done); a read that returns 0 is end of file and completes with
// the bytes read so far; a write that returns 0 fails with EIO. EAGAIN and
// EINTR resubmit. Each transfer is at most 1 GiB (the SQE length is 32-bit
// and Linux caps one read at about 2 GiB); longer ones continue in pieces.
//
// Per operation the bookkeeping (ring, fd, request) lives in a FileIo taken
// from a thread-local free list: IoRequest is plain data with no room for the
// fd, and a pool that grows to the peak number of operations in flight and
// then stops allocating keeps the hot path allocation-free.
//
// Thread model: call on the thread that drives `ring`; the request completes
// (req.result set, req.waiter resumed) from that ring's Poll().
#ifndef UBLK_QCOW2_URING_FILE_IO_H_
#define UBLK_QCOW2_URING_FILE_IO_H_

#include "qcow2/file.h"
#include "uring/ring.h"

namespace uq::uring {

// Starts `req` on `ring` against `fd`, with File::Start's contract: returns
// true if it completed at once (zero-length transfers; req.result is set and
// req.waiter is not resumed), false if req.waiter will be resumed once
// req.result holds the bytes transferred or -errno.
// REQUIRES: fd and req.data stay valid, and req stays put, until completion;
// req.waiter is set.
bool StartFileIo(Ring& ring, int fd, qcow2::IoRequest& req);

// StartFileIo for a read that O_DIRECT would reject (offset, length or buffer
// not 512-aligned: compressed clusters, header probes): reads the enclosing
// 4 KiB-aligned span into an aligned bounce buffer on `ring`, copies the
// asked-for bytes out, then completes `req` (result: bytes copied, fewer at
// end of file). Never blocks the thread, so many such reads can be in flight.
// Same contract as StartFileIo. REQUIRES: req.op is kRead.
bool StartBouncedRead(Ring& ring, int fd, qcow2::IoRequest& req);

}  // namespace uq::uring

#endif  // UBLK_QCOW2_URING_FILE_IO_H_
