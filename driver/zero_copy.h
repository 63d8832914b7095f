// Zero copy on a ublk queue: the request's own pages and the image file,
// with no copy through the daemon's memory where the engine need not see
// the bytes.
//
// A device added with UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY (ZeroCopyFlags
// in ublk_abi.h; add --zero-copy) gives the daemon no copy of a request's
// data. Instead:
//   - the kernel registers the pages of each read or write request in the
//     io_uring buffer table of the ring that fetched it, at the index that
//     FETCH_REQ / COMMIT_AND_FETCH_REQ passed in the SQE's own addr field
//     (AutoBufRegAddr: the tag; the command's ublksrv_io_cmd.addr must be 0,
//     as user copy wants), before it completes the fetch; COMMIT_AND_FETCH_REQ on the
//     same ring unregisters them. The ring needs a sparse table of `depth`
//     entries (RegisterBufferTable);
//   - with UBLK_AUTO_BUF_REG_FALLBACK, a request whose registration failed
//     arrives with UBLK_IO_F_NEED_REG_BUF set, unregistered;
//   - pread/pwrite on /dev/ublkcN at UserCopyOffset(queue, tag) copy the
//     request's data out (a write) or in (a read) (UBLK_F_USER_COPY), from
//     any thread while the daemon holds the request.
//
// So the queue serves a read, or a write without FUA, whose clusters the
// engine has published (BlockDevice::TryMapAnyThread: allocated, plain,
// uncompressed, unencrypted) by ServeFixed: one IORING_OP_READ_FIXED /
// WRITE_FIXED per host run, between the registered buffer and the image
// file, on the queue's ring. Everything else — copy-on-write, compressed
// clusters, backing reads, zero fill of unallocated ranges, encryption,
// FUA, a request that came with NEED_REG_BUF — goes to the engine as
// without zero copy, on the tag's daemon buffer: CopyFromRequest fills it
// before the engine writes, CopyToRequest hands a read's bytes to the kernel
// before the commit. The engine (qcow2/) knows nothing of this: it only
// resolves ranges to host extents.
//
// Thread model: ServeFixed on the thread that drives `ring` (the queue's,
// where the buffer is registered); the copies on any thread.
#ifndef UBLK_QCOW2_DRIVER_ZERO_COPY_H_
#define UBLK_QCOW2_DRIVER_ZERO_COPY_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "base/status.h"
#include "base/task.h"
#include "driver/ublk_abi.h"
#include "qcow2/block_device.h"
#include "uring/ring.h"

// The user-copy offsets of <linux/ublk_cmd.h> (6.5), absent from Debian 12's
// 6.1 header: values of the kernel's UAPI.
#ifndef UBLK_TAG_OFF
#define UBLKSRV_IO_BUF_OFFSET 0x80000000
#define UBLK_IO_BUF_BITS 25
#define UBLK_TAG_OFF UBLK_IO_BUF_BITS
#define UBLK_TAG_BITS 16
#define UBLK_QID_OFF (UBLK_TAG_OFF + UBLK_TAG_BITS)
#endif
// Auto buffer registration (6.16): the flag in struct ublk_auto_buf_reg and
// the descriptor flag of a request whose registration failed.
#ifndef UBLK_AUTO_BUF_REG_FALLBACK
#define UBLK_AUTO_BUF_REG_FALLBACK (1 << 0)
#endif
#ifndef UBLK_IO_F_NEED_REG_BUF
#define UBLK_IO_F_NEED_REG_BUF (1U << 17)
#endif

namespace uq::driver {

// sqe->addr (the SQE's, not the command's) of FETCH_REQ /
// COMMIT_AND_FETCH_REQ on a zero-copy device: the
// struct ublk_auto_buf_reg encoding (index in bits 0-15, flags in 16-23,
// the rest zero), asking for the fallback rather than a failed request.
constexpr uint64_t AutoBufRegAddr(uint16_t index) {
  return uint64_t{index} | (uint64_t{UBLK_AUTO_BUF_REG_FALLBACK} << 16);
}

// The /dev/ublkcN file offset of the data of (queue, tag)'s request.
constexpr uint64_t UserCopyOffset(uint16_t queue, uint16_t tag) {
  return UBLKSRV_IO_BUF_OFFSET + (uint64_t{queue} << UBLK_QID_OFF) +
         (uint64_t{tag} << UBLK_TAG_OFF);
}

// Registers a sparse buffer table of `entries` on `ring` (the index of each
// tag's auto-registered pages). IoError with the errno otherwise.
Status RegisterBufferTable(uring::Ring& ring, uint32_t entries);

// The data of a write request into `out` (its length), and `data` into a
// read request's pages, through /dev/ublkcN (`char_fd`). IoError on failure
// or a short copy.
Status CopyFromRequest(int char_fd, uint16_t queue, uint16_t tag, std::span<std::byte> out);
Status CopyToRequest(int char_fd, uint16_t queue, uint16_t tag, std::span<const std::byte> data);

// Runs a read or write request through its host mapping with fixed-buffer
// I/O on `ring`, using the pages registered at `buf_index`; a read that ends
// short (past the end of the host file) fills the rest with zeros through
// CopyToRequest. IoError naming the file and host offset on failure.
// `mapping` is held until the I/O is done.
// REQUIRES: on `ring`'s thread; request.op is READ or WRITE.
Task<Status> ServeFixed(uring::Ring& ring, qcow2::HostMapping mapping, IoDescriptor request,
                         uint16_t buf_index, int char_fd, uint16_t queue, uint16_t tag);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_ZERO_COPY_H_
