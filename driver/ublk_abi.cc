#include "driver/ublk_abi.h"

#include <fmt/format.h>

#include <iterator>

namespace uq::driver {

std::string CharDevicePath(int dev_id) { return fmt::format("/dev/ublkc{}", dev_id); }
std::string BlockDevicePath(int dev_id) { return fmt::format("/dev/ublkb{}", dev_id); }

Opcodes Opcodes::For(uint64_t features) {
  if (features & UBLK_F_CMD_IOCTL_ENCODE) {
    return Opcodes{
        .get_dev_info = UBLK_U_CMD_GET_DEV_INFO,
        .add_dev = UBLK_U_CMD_ADD_DEV,
        .del_dev = UBLK_U_CMD_DEL_DEV,
        .start_dev = UBLK_U_CMD_START_DEV,
        .stop_dev = UBLK_U_CMD_STOP_DEV,
        .set_params = UBLK_U_CMD_SET_PARAMS,
        .get_params = UBLK_U_CMD_GET_PARAMS,
        .fetch_req = UBLK_U_IO_FETCH_REQ,
        .commit_and_fetch_req = UBLK_U_IO_COMMIT_AND_FETCH_REQ,
    };
  }
  return Opcodes{
      .get_dev_info = UBLK_CMD_GET_DEV_INFO,
      .add_dev = UBLK_CMD_ADD_DEV,
      .del_dev = UBLK_CMD_DEL_DEV,
      .start_dev = UBLK_CMD_START_DEV,
      .stop_dev = UBLK_CMD_STOP_DEV,
      .set_params = UBLK_CMD_SET_PARAMS,
      .get_params = UBLK_CMD_GET_PARAMS,
      .fetch_req = UBLK_IO_FETCH_REQ,
      .commit_and_fetch_req = UBLK_IO_COMMIT_AND_FETCH_REQ,
  };
}

std::string FeatureNames(uint64_t flags) {
  static constexpr struct {
    uint64_t bit;
    const char* name;
  } kNames[] = {
      {UBLK_F_SUPPORT_ZERO_COPY, "zero-copy"},
      {UBLK_F_URING_CMD_COMP_IN_TASK, "comp-in-task"},
      {UBLK_F_NEED_GET_DATA, "need-get-data"},
      {UBLK_F_USER_RECOVERY, "user-recovery"},
      {UBLK_F_USER_RECOVERY_REISSUE, "user-recovery-reissue"},
      {UBLK_F_UNPRIVILEGED_DEV, "unprivileged"},
      {UBLK_F_CMD_IOCTL_ENCODE, "ioctl-encode"},
      {UBLK_F_USER_COPY, "user-copy"},
      {UBLK_F_ZONED, "zoned"},
  };
  std::string out;
  uint64_t known = 0;
  for (const auto& n : kNames) {
    known |= n.bit;
    if ((flags & n.bit) == 0) continue;
    if (!out.empty()) out += ",";
    out += n.name;
  }
  for (int bit = 0; bit < 64; ++bit) {
    uint64_t mask = uint64_t{1} << bit;
    if ((flags & mask) == 0 || (known & mask) != 0) continue;
    if (!out.empty()) out += ",";
    out += fmt::format("bit{}", bit);
  }
  return out;
}

std::string DeviceStateName(uint16_t state) {
  switch (state) {
    case UBLK_S_DEV_DEAD:
      return "dead";
    case UBLK_S_DEV_LIVE:
      return "live";
    case UBLK_S_DEV_QUIESCED:
      return "quiesced";
    default:
      return fmt::format("state {}", state);
  }
}

uint64_t DescriptorAreaSize(uint32_t depth, uint64_t page_size) {
  uint64_t bytes = uint64_t{depth} * sizeof(ublksrv_io_desc);
  return (bytes + page_size - 1) / page_size * page_size;
}

uint64_t DescriptorAreaOffset(uint32_t queue, uint64_t page_size) {
  return UBLKSRV_CMD_BUF_OFFSET +
         uint64_t{queue} * DescriptorAreaSize(UBLK_MAX_QUEUE_DEPTH, page_size);
}

IoDescriptor DecodeDescriptor(const volatile ublksrv_io_desc& desc) {
  const uint32_t op_flags = desc.op_flags;
  IoDescriptor d;
  d.op = static_cast<uint8_t>(op_flags & 0xff);
  d.flags = op_flags & ~uint32_t{0xff};
  d.offset = uint64_t{desc.start_sector} << 9;
  d.length = uint64_t{desc.nr_sectors} << 9;
  return d;
}

std::string OpName(uint8_t op) {
  switch (op) {
    case UBLK_IO_OP_READ:
      return "read";
    case UBLK_IO_OP_WRITE:
      return "write";
    case UBLK_IO_OP_FLUSH:
      return "flush";
    case UBLK_IO_OP_DISCARD:
      return "discard";
    case UBLK_IO_OP_WRITE_ZEROES:
      return "write-zeroes";
    default:
      return fmt::format("op {}", op);
  }
}

}  // namespace uq::driver
