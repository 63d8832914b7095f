#include "driver/ublk_abi.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "driver/params.h"
#include "uring/user_data.h"

namespace uq::driver {
namespace {

TEST(OpcodesTest, LegacyWithoutIoctlEncode) {
  Opcodes ops = Opcodes::For(0);
  EXPECT_EQ(ops.add_dev, 0x04u);
  EXPECT_EQ(ops.start_dev, 0x06u);
  EXPECT_EQ(ops.fetch_req, 0x20u);
  EXPECT_EQ(ops.commit_and_fetch_req, 0x21u);
}

TEST(OpcodesTest, EncodedWithIoctlEncode) {
  Opcodes ops = Opcodes::For(UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_USER_COPY);
  EXPECT_EQ(ops.add_dev, static_cast<uint32_t>(UBLK_U_CMD_ADD_DEV));
  EXPECT_EQ(ops.del_dev, static_cast<uint32_t>(UBLK_U_CMD_DEL_DEV));
  EXPECT_EQ(ops.fetch_req, static_cast<uint32_t>(UBLK_U_IO_FETCH_REQ));
  // The kernel dispatches on _IOC_NR: the command number is the legacy one.
  EXPECT_EQ(_IOC_NR(ops.commit_and_fetch_req), static_cast<uint32_t>(UBLK_IO_COMMIT_AND_FETCH_REQ));
  EXPECT_EQ(_IOC_TYPE(ops.get_dev_info), static_cast<uint32_t>('u'));
}

// Only in encoded form: _IOWR('u', 0x15, struct ublksrv_ctrl_cmd), as Linux
// 7.3's include/uapi/linux/ublk_cmd.h has it; the kernel dispatches on 0x15.
TEST(OpcodesTest, UpdateSize) {
  EXPECT_EQ(static_cast<uint32_t>(UBLK_U_CMD_UPDATE_SIZE), 0xc0207515u);
  EXPECT_EQ(_IOC_NR(UBLK_U_CMD_UPDATE_SIZE), 0x15u);
  EXPECT_EQ(UBLK_F_UPDATE_SIZE, 1ull << 10);
}

TEST(FeatureNamesTest, NamesKnownAndUnknownBits) {
  EXPECT_EQ(FeatureNames(0), "");
  EXPECT_EQ(FeatureNames(UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_USER_COPY), "CMD_IOCTL_ENCODE,USER_COPY");
  EXPECT_EQ(FeatureNames(uint64_t{1} << 40), "bit 40");
}

// The values of Linux 7.3's include/uapi/linux/ublk_cmd.h, bit by bit: a
// wrong number here would name the wrong flag.
TEST(FlagNamesTest, EveryBitOfLinux73) {
  const char* const expected[] = {
      "SUPPORT_ZERO_COPY",
      "URING_CMD_COMP_IN_TASK",
      "NEED_GET_DATA",
      "USER_RECOVERY",
      "USER_RECOVERY_REISSUE",
      "UNPRIVILEGED_DEV",
      "CMD_IOCTL_ENCODE",
      "USER_COPY",
      "ZONED",
      "USER_RECOVERY_FAIL_IO",
      "UPDATE_SIZE",
      "AUTO_BUF_REG",
      "QUIESCE",
      "PER_IO_DAEMON",
      "BUF_REG_OFF_DAEMON",
      "BATCH_IO",
      "INTEGRITY",
      "SAFE_STOP_DEV",
      "NO_AUTO_PART_SCAN",
      "SHMEM_ZC",
      "IO_DESC_SIZE",
  };
  for (int bit = 0; bit < 21; ++bit) {
    EXPECT_EQ(KnownFlagNames(uint64_t{1} << bit), std::vector<std::string>{expected[bit]})
        << "bit " << bit;
    EXPECT_TRUE(UnknownFlagBits(uint64_t{1} << bit).empty()) << "bit " << bit;
  }
  EXPECT_EQ(UBLK_F_UPDATE_SIZE, uint64_t{1} << 10);
  EXPECT_EQ(UBLK_F_SAFE_STOP_DEV, uint64_t{1} << 17);
  EXPECT_EQ(UBLK_F_IO_DESC_SIZE, uint64_t{1} << 20);
}

// What the rig's kernels answer. 6.12 (measured in the VM): bits 1..8, no
// SUPPORT_ZERO_COPY. 7.3: its UBLK_F_ALL, bits 0..20, less INTEGRITY
// (offered only with CONFIG_BLK_DEV_INTEGRITY, which the fragment leaves off).
TEST(FlagNamesTest, KernelAnswers) {
  EXPECT_EQ(KnownFlagNames(0x1fe),
            (std::vector<std::string>{"URING_CMD_COMP_IN_TASK", "NEED_GET_DATA", "USER_RECOVERY",
                                      "USER_RECOVERY_REISSUE", "UNPRIVILEGED_DEV",
                                      "CMD_IOCTL_ENCODE", "USER_COPY", "ZONED"}));
  EXPECT_TRUE(UnknownFlagBits(0x1fe).empty());
  const uint64_t k73 = ((uint64_t{1} << 21) - 1) & ~UBLK_F_INTEGRITY;
  std::vector<std::string> names = KnownFlagNames(k73);
  EXPECT_EQ(names.size(), 20u);
  EXPECT_NE(std::find(names.begin(), names.end(), "UPDATE_SIZE"), names.end());
  EXPECT_EQ(std::find(names.begin(), names.end(), "INTEGRITY"), names.end());
  EXPECT_TRUE(UnknownFlagBits(k73).empty());
}

TEST(FlagNamesTest, UnknownBitsAsNumbers) {
  const uint64_t flags =
      UBLK_F_USER_COPY | (uint64_t{1} << 21) | (uint64_t{1} << 40) | (uint64_t{1} << 63);
  EXPECT_EQ(KnownFlagNames(flags), std::vector<std::string>{"USER_COPY"});
  EXPECT_EQ(UnknownFlagBits(flags), (std::vector<int>{21, 40, 63}));
  EXPECT_EQ(FlagLabels(flags),
            (std::vector<std::string>{"USER_COPY", "bit 21", "bit 40", "bit 63"}));
  EXPECT_TRUE(FlagLabels(0).empty());
}

// `add` asks only for what the kernel offers, and of that only the opcode
// encoding: a kernel without it (before 6.5) gets no flags at all.
TEST(AddFlagsTest, OnlyOfferedAndUsed) {
  EXPECT_EQ(AddFlags(0), 0u);
  EXPECT_EQ(AddFlags(UBLK_F_USER_COPY | UBLK_F_UPDATE_SIZE), 0u);
  EXPECT_EQ(AddFlags(~uint64_t{0}), UBLK_F_CMD_IOCTL_ENCODE);
}

// `del` without --force stops through the kernel's TRY_STOP_DEV only where
// GET_FEATURES offers SAFE_STOP_DEV (7.0+; the rig's 7.3 answers 0x1effff),
// and through an exclusive open of the node on older kernels (6.12: 0x1fe,
// 6.1: no GET_FEATURES, so 0).
TEST(SafeStopTest, ChosenFromFeatures) {
  EXPECT_EQ(SafeStopFor(0), SafeStop::kExclusiveOpen);
  EXPECT_EQ(SafeStopFor(0x1fe), SafeStop::kExclusiveOpen);
  EXPECT_EQ(SafeStopFor(0x1effff), SafeStop::kTryStopDev);
  EXPECT_EQ(SafeStopFor(UBLK_F_SAFE_STOP_DEV), SafeStop::kTryStopDev);
  EXPECT_EQ(SafeStopFor(~UBLK_F_SAFE_STOP_DEV), SafeStop::kExclusiveOpen);
}

// TRY_STOP_DEV's number is the kernel's (include/uapi/linux/ublk_cmd.h, 7.0).
TEST(SafeStopTest, TryStopOpcode) {
  EXPECT_EQ(_IOC_NR(UBLK_U_CMD_TRY_STOP_DEV), 0x17u);
  EXPECT_EQ(_IOC_TYPE(UBLK_U_CMD_TRY_STOP_DEV), 'u');
  EXPECT_EQ(_IOC_DIR(UBLK_U_CMD_TRY_STOP_DEV), _IOC_READ | _IOC_WRITE);
  EXPECT_EQ(_IOC_SIZE(UBLK_U_CMD_TRY_STOP_DEV), sizeof(ublksrv_ctrl_cmd));
}

TEST(DeviceStateNameTest, KnownStates) {
  EXPECT_EQ(DeviceStateName(UBLK_S_DEV_LIVE), "live");
  EXPECT_EQ(DeviceStateName(UBLK_S_DEV_DEAD), "dead");
  EXPECT_EQ(DeviceStateName(UBLK_S_DEV_QUIESCED), "quiesced");
  EXPECT_EQ(DeviceStateName(UBLK_S_DEV_FAIL_IO), "fail-io");
  EXPECT_EQ(DeviceStateName(9), "state 9");
}

TEST(DescriptorAreaTest, SizeIsRoundedToPages) {
  static_assert(sizeof(ublksrv_io_desc) == 24);
  EXPECT_EQ(DescriptorAreaSize(1, 4096), 4096u);
  EXPECT_EQ(DescriptorAreaSize(128, 4096), 4096u);  // 3072 bytes
  EXPECT_EQ(DescriptorAreaSize(171, 4096), 8192u);  // 4104 bytes
  EXPECT_EQ(DescriptorAreaSize(4096, 4096), 98304u);
  EXPECT_EQ(DescriptorAreaSize(128, 65536), 65536u);
}

TEST(DescriptorAreaTest, QueuesAreStridedByTheLargestQueue) {
  EXPECT_EQ(DescriptorAreaOffset(0, 4096), 0u);
  EXPECT_EQ(DescriptorAreaOffset(1, 4096), 98304u);
  EXPECT_EQ(DescriptorAreaOffset(3, 4096), 3 * 98304u);
  EXPECT_EQ(DescriptorAreaOffset(1, 65536), 131072u);
}

TEST(DecodeDescriptorTest, SplitsOpAndFlagsAndConvertsSectors) {
  ublksrv_io_desc desc{};
  desc.op_flags = UBLK_IO_OP_WRITE | UBLK_IO_F_FUA | UBLK_IO_F_META;
  desc.nr_sectors = 8;
  desc.start_sector = (uint64_t{1} << 33) + 3;
  IoDescriptor d = DecodeDescriptor(desc);
  EXPECT_EQ(d.op, UBLK_IO_OP_WRITE);
  EXPECT_EQ(d.flags, UBLK_IO_F_FUA | UBLK_IO_F_META);
  EXPECT_TRUE(d.fua());
  EXPECT_EQ(d.offset, ((uint64_t{1} << 33) + 3) * 512);
  EXPECT_EQ(d.length, 4096u);

  desc.op_flags = UBLK_IO_OP_READ;
  d = DecodeDescriptor(desc);
  EXPECT_EQ(d.op, UBLK_IO_OP_READ);
  EXPECT_FALSE(d.fua());
  EXPECT_EQ(OpName(UBLK_IO_OP_WRITE_ZEROES), "write-zeroes");
  EXPECT_EQ(OpName(UBLK_IO_OP_ZONE_OPEN), "op 10");
}

TEST(CommandIdTest, QueueTagAndCommandSurviveUserData) {
  for (uint16_t queue : {0, 1, 63}) {
    for (uint16_t tag : {0, 1, 127, 4095}) {
      for (IoCommand command : {IoCommand::kFetch, IoCommand::kCommitAndFetch}) {
        uring::CommandId id{queue, tag, static_cast<uint8_t>(command)};
        uint64_t user_data = uring::UserData::ForCommand(id);
        ASSERT_EQ(uring::UserData::KindOf(user_data), uring::UserData::Kind::kCommand);
        EXPECT_EQ(uring::CommandId::Unpack(uring::UserData::PayloadOf(user_data)), id);
      }
    }
  }
}

TEST(ParamsTest, QcowWith64KClusters) {
  ImageFacts facts{.size = uint64_t{10} << 30, .cluster_size = 65536, .read_only = false};
  Result<ublk_params> p = ComputeParams(facts, 512 * 1024);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->len, sizeof(ublk_params));
  EXPECT_EQ(p->types, UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD);
  EXPECT_EQ(p->basic.attrs, UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA);
  EXPECT_EQ(p->basic.logical_bs_shift, 9);
  EXPECT_EQ(p->basic.physical_bs_shift, 12);
  EXPECT_EQ(p->basic.io_min_shift, 9);
  EXPECT_EQ(p->basic.io_opt_shift, 16);
  EXPECT_EQ(p->basic.max_sectors, 1024u);
  EXPECT_EQ(p->basic.dev_sectors, (uint64_t{10} << 30) / 512);
  EXPECT_EQ(p->discard.discard_granularity, 65536u);
  EXPECT_EQ(p->discard.max_discard_segments, 1);
  EXPECT_EQ(p->discard.max_discard_sectors, 2u << 20);
  EXPECT_EQ(p->discard.max_write_zeroes_sectors, 2u << 20);
  EXPECT_EQ(p->discard.max_discard_sectors % (65536 / 512), 0u);
}

TEST(ParamsTest, SmallAndHugeClusters) {
  Result<ublk_params> small = ComputeParams({.size = 1 << 20, .cluster_size = 512}, 512 * 1024);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->basic.physical_bs_shift, 9);
  EXPECT_EQ(small->basic.io_opt_shift, 9);
  EXPECT_EQ(small->discard.discard_granularity, 512u);

  // io_opt is capped at one request.
  Result<ublk_params> huge = ComputeParams({.size = 1 << 30, .cluster_size = 2 << 20}, 512 * 1024);
  ASSERT_TRUE(huge.ok());
  EXPECT_EQ(huge->basic.physical_bs_shift, 12);
  EXPECT_EQ(huge->basic.io_opt_shift, 19);
  EXPECT_EQ(huge->discard.max_discard_sectors % ((2 << 20) / 512), 0u);
}

TEST(ParamsTest, ReadOnlyHasNoDiscard) {
  Result<ublk_params> p =
      ComputeParams({.size = 1 << 20, .cluster_size = 65536, .read_only = true}, 4096);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->types, UBLK_PARAM_TYPE_BASIC);
  EXPECT_TRUE(p->basic.attrs & UBLK_ATTR_READ_ONLY);
  EXPECT_EQ(p->basic.max_sectors, 8u);
  EXPECT_EQ(p->basic.io_opt_shift, 12);
}

TEST(ParamsTest, RejectsImpossibleInput) {
  EXPECT_TRUE(ComputeParams({.size = 0}, 4096).status().IsInvalidArgument());
  EXPECT_TRUE(ComputeParams({.size = 1000}, 4096).status().IsInvalidArgument());
  EXPECT_TRUE(
      ComputeParams({.size = 4096, .cluster_size = 3000}, 4096).status().IsInvalidArgument());
  EXPECT_TRUE(
      ComputeParams({.size = 4096, .cluster_size = 4 << 20}, 4096).status().IsInvalidArgument());
  EXPECT_TRUE(
      ComputeParams({.size = 4096, .cluster_size = 4096}, 5000).status().IsInvalidArgument());
}

TEST(RecoveryFlagsTest, FromFeatures) {
  const uint64_t r = UBLK_F_USER_RECOVERY, re = UBLK_F_USER_RECOVERY_REISSUE,
                 fi = UBLK_F_USER_RECOVERY_FAIL_IO;
  // 6.12: recovery and reissue, no fail-io.
  const uint64_t k612 = r | re | UBLK_F_CMD_IOCTL_ENCODE;
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kReissue, false, k612), r | re);
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kReissue, true, k612), r | re);
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kOff, true, k612), 0u);
  Result<uint64_t> failio = RecoveryFlags(RecoveryMode::kFailIo, true, k612);
  ASSERT_TRUE(failio.status().IsNotSupported());
  EXPECT_NE(failio.status().message().find("USER_RECOVERY_FAIL_IO"), std::string::npos);
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kFailIo, true, k612 | fi), r | fi);
  // No GET_FEATURES: the default falls back to off, a request is refused.
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kReissue, false, 0), 0u);
  EXPECT_TRUE(RecoveryFlags(RecoveryMode::kReissue, true, 0).status().IsNotSupported());
}

// Where the kernel offers QUIESCE (7.3: 0x1effff), add asks for it with
// either recovery mode, never without recovery (ADD_DEV refuses that).
TEST(RecoveryFlagsTest, QuiesceWithRecoveryWhereOffered) {
  const uint64_t r = UBLK_F_USER_RECOVERY, re = UBLK_F_USER_RECOVERY_REISSUE,
                 fi = UBLK_F_USER_RECOVERY_FAIL_IO, q = UBLK_F_QUIESCE;
  const uint64_t k73 = 0x1effff;
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kReissue, false, k73), r | re | q);
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kFailIo, true, k73), r | fi | q);
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kOff, true, k73), 0u);
  // QUIESCE alone, recovery missing: nothing.
  EXPECT_EQ(*RecoveryFlags(RecoveryMode::kReissue, false, q | UBLK_F_CMD_IOCTL_ENCODE), 0u);
}

// QUIESCE_DEV's number is the kernel's (include/uapi/linux/ublk_cmd.h, 6.16).
TEST(UpgradeTest, QuiesceOpcode) {
  EXPECT_EQ(_IOC_NR(UBLK_U_CMD_QUIESCE_DEV), 0x16u);
  EXPECT_EQ(_IOC_TYPE(UBLK_U_CMD_QUIESCE_DEV), 'u');
  EXPECT_EQ(_IOC_DIR(UBLK_U_CMD_QUIESCE_DEV), _IOC_READ | _IOC_WRITE);
  EXPECT_EQ(_IOC_SIZE(UBLK_U_CMD_QUIESCE_DEV), sizeof(ublksrv_ctrl_cmd));
  EXPECT_EQ(UBLK_F_QUIESCE, uint64_t{1} << 12);
}

// upgrade is gated on GET_FEATURES and the device's flags, with fake masks.
TEST(UpgradeTest, GatedOnFeaturesAndDeviceFlags) {
  const uint64_t r = UBLK_F_USER_RECOVERY, re = UBLK_F_USER_RECOVERY_REISSUE,
                 fi = UBLK_F_USER_RECOVERY_FAIL_IO, q = UBLK_F_QUIESCE;
  const uint64_t k612 = 0x1fe, k73 = 0x1effff;
  EXPECT_TRUE(CheckUpgrade(k73, r | re | q | UBLK_F_CMD_IOCTL_ENCODE, 3).ok());
  EXPECT_TRUE(CheckUpgrade(k73, r | fi | q, 3).ok());
  EXPECT_TRUE(CheckUpgrade(q, r | re | q, 3).ok());  // the mask decides, nothing else
  // 6.12 (no QUIESCE), no GET_FEATURES (0), everything but QUIESCE: refused,
  // naming the flag, whatever the device has.
  for (uint64_t features : {k612, uint64_t{0}, ~q}) {
    Status s = CheckUpgrade(features, r | re | q, 3);
    ASSERT_TRUE(s.IsNotSupported()) << features;
    EXPECT_NE(s.message().find("UBLK_F_QUIESCE"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("6.16"), std::string::npos) << s.message();
    EXPECT_EQ(s.message().find('\n'), std::string::npos);
  }
  // A device without recovery (--recovery=off), or without QUIESCE.
  Status off = CheckUpgrade(k73, UBLK_F_CMD_IOCTL_ENCODE, 4);
  ASSERT_TRUE(off.IsInvalidArgument());
  EXPECT_NE(off.message().find("--recovery=off"), std::string::npos) << off.message();
  EXPECT_NE(off.message().find("device 4"), std::string::npos) << off.message();
  Status old = CheckUpgrade(k73, r | re, 4);
  ASSERT_TRUE(old.IsInvalidArgument());
  EXPECT_NE(old.message().find("UBLK_F_QUIESCE"), std::string::npos) << old.message();
  // A zero-copy device is handed over like any other (the queues do not wait
  // for fetches QUIESCE_DEV leaves: driver/queue.h).
  EXPECT_TRUE(CheckUpgrade(k73, r | re | q | UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY, 5).ok());
}

TEST(RecoveryFlagsTest, ModeOfDeviceFlags) {
  EXPECT_EQ(RecoveryModeOf(UBLK_F_CMD_IOCTL_ENCODE), RecoveryMode::kOff);
  EXPECT_EQ(RecoveryModeOf(UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE),
            RecoveryMode::kReissue);
  EXPECT_EQ(RecoveryModeOf(UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_FAIL_IO),
            RecoveryMode::kFailIo);
  EXPECT_EQ(RecoveryModeName(RecoveryMode::kFailIo), "fail-io");
  EXPECT_TRUE(AwaitsRecovery(UBLK_S_DEV_QUIESCED));
  EXPECT_TRUE(AwaitsRecovery(UBLK_S_DEV_FAIL_IO));
  EXPECT_FALSE(AwaitsRecovery(UBLK_S_DEV_LIVE));
}

// GET_FEATURES as the rig's kernels answer it: 6.1 has none (0), 6.12
// 0x1fe, 7.3 0x1effff.
constexpr uint64_t k61 = 0, k612 = 0x1fe, k73 = 0x1effff;

TEST(PartitionScanFlagsTest, OnlyWhereOffered) {
  for (uint64_t features : {k61, k612, k73}) {
    EXPECT_EQ(*PartitionScanFlags(false, features), 0u);
  }
  EXPECT_EQ(*PartitionScanFlags(true, k73), UBLK_F_NO_AUTO_PART_SCAN);
  for (uint64_t features : {k61, k612}) {
    Result<uint64_t> r = PartitionScanFlags(true, features);
    ASSERT_TRUE(r.status().IsNotSupported());
    EXPECT_NE(r.status().message().find("UBLK_F_NO_AUTO_PART_SCAN"), std::string::npos);
  }
}

TEST(PerIoDaemonFlagsTest, OnlyForMoreThreadsThanQueuesWhereOffered) {
  for (uint64_t features : {k61, k612, k73}) EXPECT_EQ(*PerIoDaemonFlags(1, features), 0u);
  EXPECT_EQ(*PerIoDaemonFlags(2, k73), UBLK_F_PER_IO_DAEMON);
  for (uint64_t features : {k61, k612}) {
    Result<uint64_t> r = PerIoDaemonFlags(2, features);
    ASSERT_TRUE(r.status().IsNotSupported());
    EXPECT_NE(r.status().message().find("UBLK_F_PER_IO_DAEMON"), std::string::npos);
  }
}

TEST(BatchIoFlagsTest, OnlyWhenAskedAndOffered) {
  for (uint64_t features : {k61, k612, k73}) EXPECT_EQ(*BatchIoFlags(false, 1, features), 0u);
  EXPECT_EQ(*BatchIoFlags(true, 1, k73), UBLK_F_BATCH_IO);
  for (uint64_t features : {k61, k612}) {
    Result<uint64_t> r = BatchIoFlags(true, 1, features);
    ASSERT_TRUE(r.status().IsNotSupported());
    EXPECT_NE(r.status().message().find("UBLK_F_BATCH_IO"), std::string::npos);
    EXPECT_NE(r.status().message().find("7.0"), std::string::npos);
  }
  EXPECT_TRUE(BatchIoFlags(true, 2, k73).status().IsInvalidArgument());
  // A batch device is not handed over live.
  const uint64_t dev = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_QUIESCE;
  EXPECT_TRUE(CheckUpgrade(k73, dev, 6).ok());
  Status batch = CheckUpgrade(k73, dev | UBLK_F_BATCH_IO, 6);
  ASSERT_TRUE(batch.IsNotSupported());
  EXPECT_NE(batch.message().find("--batch-io"), std::string::npos) << batch.message();
}

// The batch commands' numbers and layouts, as the 7.0 UAPI header has them
// (ioctl-encoded 'u' 0x25-0x27 over a 16-byte struct ublk_batch_io).
TEST(BatchIoAbiTest, CommandNumbers) {
  EXPECT_EQ(kPrepIoCmds, 0xc0107525u);
  EXPECT_EQ(kCommitIoCmds, 0xc0107526u);
  EXPECT_EQ(kFetchIoCmds, 0xc0107527u);
  EXPECT_EQ(offsetof(BatchIoCmd, nr_elem), 4u);
  EXPECT_EQ(offsetof(BatchIoCmd, elem_bytes), 6u);
  EXPECT_EQ(offsetof(BatchElemHeader, result), 4u);
}

TEST(ZeroCopyFlagsTest, AutoOnOff) {
  const uint64_t zc = UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY;
  // auto: both flags on 7.3, nothing before (6.12 has USER_COPY alone).
  EXPECT_EQ(*ZeroCopyFlags(ZeroCopyMode::kAuto, k73), zc);
  EXPECT_EQ(*ZeroCopyFlags(ZeroCopyMode::kAuto, k612), 0u);
  EXPECT_EQ(*ZeroCopyFlags(ZeroCopyMode::kAuto, k61), 0u);
  // off: never.
  EXPECT_EQ(*ZeroCopyFlags(ZeroCopyMode::kOff, k73), 0u);
  // on: both, or the missing flag named.
  EXPECT_EQ(*ZeroCopyFlags(ZeroCopyMode::kOn, k73), zc);
  for (uint64_t features : {k61, k612}) {
    Result<uint64_t> r = ZeroCopyFlags(ZeroCopyMode::kOn, features);
    ASSERT_TRUE(r.status().IsNotSupported());
    EXPECT_NE(r.status().message().find("UBLK_F_AUTO_BUF_REG"), std::string::npos);
  }
  Result<uint64_t> no_user_copy = ZeroCopyFlags(ZeroCopyMode::kOn, k73 & ~UBLK_F_USER_COPY);
  ASSERT_TRUE(no_user_copy.status().IsNotSupported());
  EXPECT_NE(no_user_copy.status().message().find("UBLK_F_USER_COPY"), std::string::npos);
  EXPECT_EQ(*ZeroCopyFlags(ZeroCopyMode::kAuto, k73 & ~UBLK_F_USER_COPY), 0u);
  EXPECT_TRUE(UsesZeroCopy(zc | UBLK_F_CMD_IOCTL_ENCODE));
  EXPECT_FALSE(UsesZeroCopy(UBLK_F_USER_COPY));
  EXPECT_FALSE(UsesZeroCopy(UBLK_F_AUTO_BUF_REG));
}

TEST(Log2Test, Values) {
  EXPECT_EQ(Log2(1), 0);
  EXPECT_EQ(Log2(512), 9);
  EXPECT_EQ(Log2(4097), 12);
}

}  // namespace
}  // namespace uq::driver
