// PrepUringCmd: fills a 128-byte SQE with an IORING_OP_URING_CMD, the one
// way ublk commands (control and I/O) reach the kernel.
//
// Thread model: no state.
#ifndef UBLK_QCOW2_DRIVER_URING_CMD_H_
#define UBLK_QCOW2_DRIVER_URING_CMD_H_

#include <liburing.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace uq::driver {

// Bytes of command payload a 128-byte SQE carries (after the 48-byte head).
inline constexpr size_t kSqe128CmdBytes = 80;

// REQUIRES: `sqe` comes from a ring set up with IORING_SETUP_SQE128.
template <class Cmd>
void PrepUringCmd(io_uring_sqe* sqe, int fd, uint32_t cmd_op, const Cmd& cmd, uint64_t user_data) {
  static_assert(std::is_trivially_copyable_v<Cmd>);
  static_assert(sizeof(Cmd) <= kSqe128CmdBytes);
  std::memset(static_cast<void*>(sqe), 0, 2 * sizeof(io_uring_sqe));
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fd;
  sqe->cmd_op = cmd_op;
  std::memcpy(sqe->cmd, &cmd, sizeof(Cmd));
  sqe->user_data = user_data;
}

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_URING_CMD_H_
