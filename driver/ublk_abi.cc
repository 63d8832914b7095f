#include "driver/ublk_abi.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

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
        .start_user_recovery = UBLK_U_CMD_START_USER_RECOVERY,
        .end_user_recovery = UBLK_U_CMD_END_USER_RECOVERY,
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
      .start_user_recovery = UBLK_CMD_START_USER_RECOVERY,
      .end_user_recovery = UBLK_CMD_END_USER_RECOVERY,
  };
}

namespace {

// Every flag of Linux 7.3's <linux/ublk_cmd.h>, by bit.
constexpr struct {
  uint64_t bit;
  const char* name;
} kFlagNames[] = {
    {UBLK_F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"},
    {UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"},
    {UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"},
    {UBLK_F_USER_RECOVERY, "USER_RECOVERY"},
    {UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"},
    {UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"},
    {UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"},
    {UBLK_F_USER_COPY, "USER_COPY"},
    {UBLK_F_ZONED, "ZONED"},
    {UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"},
    {UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"},
    {UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"},
    {UBLK_F_QUIESCE, "QUIESCE"},
    {UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"},
    {UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"},
    {UBLK_F_BATCH_IO, "BATCH_IO"},
    {UBLK_F_INTEGRITY, "INTEGRITY"},
    {UBLK_F_SAFE_STOP_DEV, "SAFE_STOP_DEV"},
    {UBLK_F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN"},
    {UBLK_F_SHMEM_ZC, "SHMEM_ZC"},
    {UBLK_F_IO_DESC_SIZE, "IO_DESC_SIZE"},
};

constexpr uint64_t KnownFlags() {
  uint64_t known = 0;
  for (const auto& n : kFlagNames) known |= n.bit;
  return known;
}

}  // namespace

std::vector<std::string> KnownFlagNames(uint64_t flags) {
  std::vector<std::string> names;
  for (const auto& n : kFlagNames) {
    if (flags & n.bit) names.emplace_back(n.name);
  }
  return names;
}

std::vector<int> UnknownFlagBits(uint64_t flags) {
  std::vector<int> bits;
  const uint64_t unknown = flags & ~KnownFlags();
  for (int bit = 0; bit < 64; ++bit) {
    if (unknown & (uint64_t{1} << bit)) bits.push_back(bit);
  }
  return bits;
}

std::vector<std::string> FlagLabels(uint64_t flags) {
  std::vector<std::string> labels = KnownFlagNames(flags);
  for (int bit : UnknownFlagBits(flags)) labels.push_back(fmt::format("bit {}", bit));
  return labels;
}

std::string FeatureNames(uint64_t flags) {
  return fmt::format("{}", fmt::join(FlagLabels(flags), ","));
}

std::string DeviceStateName(uint16_t state) {
  switch (state) {
    case UBLK_S_DEV_DEAD:
      return "dead";
    case UBLK_S_DEV_LIVE:
      return "live";
    case UBLK_S_DEV_QUIESCED:
      return "quiesced";
    case UBLK_S_DEV_FAIL_IO:
      return "fail-io";
    default:
      return fmt::format("state {}", state);
  }
}

std::string RecoveryModeName(RecoveryMode mode) {
  switch (mode) {
    case RecoveryMode::kReissue:
      return "reissue";
    case RecoveryMode::kFailIo:
      return "fail-io";
    case RecoveryMode::kOff:
      break;
  }
  return "off";
}

RecoveryMode RecoveryModeOf(uint64_t flags) {
  if (!(flags & UBLK_F_USER_RECOVERY)) return RecoveryMode::kOff;
  if (flags & UBLK_F_USER_RECOVERY_FAIL_IO) return RecoveryMode::kFailIo;
  // USER_RECOVERY alone (requests the daemon held are failed, the rest
  // re-issued) is not something `add` asks for; it is recoverable too.
  return RecoveryMode::kReissue;
}

Result<uint64_t> RecoveryFlags(RecoveryMode mode, bool requested, uint64_t features) {
  uint64_t want = 0;
  const char* name = "";
  switch (mode) {
    case RecoveryMode::kOff:
      return uint64_t{0};
    case RecoveryMode::kReissue:
      want = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
      name = "UBLK_F_USER_RECOVERY_REISSUE (as GET_FEATURES reports it: Linux 6.5+)";
      break;
    case RecoveryMode::kFailIo:
      want = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_FAIL_IO;
      name = "UBLK_F_USER_RECOVERY_FAIL_IO (Linux 6.13+)";
      break;
  }
  if ((features & want) == want) return want | (features & UBLK_F_QUIESCE);
  if (!requested) return uint64_t{0};
  return Status::NotSupported(
      fmt::format("--recovery={} needs {}, which this kernel's ublk does "
                  "not offer",
                  RecoveryModeName(mode), name));
}

Status CheckUpgrade(uint64_t features, uint64_t device_flags, int dev_id) {
  if (!(features & UBLK_F_QUIESCE)) {
    return Status::NotSupported(
        fmt::format("ublk device {}: upgrade needs UBLK_F_QUIESCE (Linux 6.16+), which this "
                    "kernel's ublk does not offer",
                    dev_id));
  }
  if (!(device_flags & UBLK_F_USER_RECOVERY)) {
    return Status::InvalidArgument(
        fmt::format("ublk device {} was added without user recovery (--recovery=off): its "
                    "daemon cannot be replaced",
                    dev_id));
  }
  if (!(device_flags & UBLK_F_QUIESCE)) {
    return Status::InvalidArgument(
        fmt::format("ublk device {} was added without UBLK_F_QUIESCE (by an older ublk-qcow2): "
                    "its daemon cannot be replaced live (del and add it again)",
                    dev_id));
  }
  if (device_flags & UBLK_F_BATCH_IO) {
    return Status::NotSupported(
        fmt::format("ublk device {} was added with --batch-io, whose queues cannot be handed "
                    "over live yet",
                    dev_id));
  }
  return Status::Ok();
}

Result<uint64_t> PartitionScanFlags(bool no_partition_scan, uint64_t features) {
  if (!no_partition_scan) return uint64_t{0};
  if (features & UBLK_F_NO_AUTO_PART_SCAN) return uint64_t{UBLK_F_NO_AUTO_PART_SCAN};
  return Status::NotSupported(
      "--no-partition-scan needs UBLK_F_NO_AUTO_PART_SCAN (Linux 7.0+), which this kernel's "
      "ublk does not offer");
}

Result<uint64_t> PerIoDaemonFlags(unsigned threads_per_queue, uint64_t features) {
  if (threads_per_queue <= 1) return uint64_t{0};
  if (features & UBLK_F_PER_IO_DAEMON) return uint64_t{UBLK_F_PER_IO_DAEMON};
  return Status::NotSupported(
      "--nthreads above --queues needs UBLK_F_PER_IO_DAEMON (Linux 6.16+), which this kernel's "
      "ublk does not offer");
}

Result<uint64_t> BatchIoFlags(bool batch_io, unsigned threads_per_queue, uint64_t features) {
  if (!batch_io) return uint64_t{0};
  if ((features & UBLK_F_BATCH_IO) == 0) {
    return Status::NotSupported(
        "--batch-io needs UBLK_F_BATCH_IO (Linux 7.0+), which this kernel's ublk does not offer");
  }
  if (threads_per_queue > 1) {
    return Status::InvalidArgument("--batch-io serves each queue with one thread: drop --nthreads");
  }
  return uint64_t{UBLK_F_BATCH_IO};
}

Result<uint64_t> ZeroCopyFlags(ZeroCopyMode mode, uint64_t features) {
  if (mode == ZeroCopyMode::kOff) return uint64_t{0};
  if ((features & kZeroCopyFlags) == kZeroCopyFlags) return kZeroCopyFlags;
  if (mode == ZeroCopyMode::kAuto) return uint64_t{0};
  const char* missing = (features & UBLK_F_AUTO_BUF_REG) == 0 ? "UBLK_F_AUTO_BUF_REG (Linux 6.16+)"
                                                              : "UBLK_F_USER_COPY (Linux 6.5+)";
  return Status::NotSupported(
      fmt::format("--zero-copy=on needs {}, which this kernel's ublk does not offer", missing));
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
