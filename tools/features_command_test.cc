#include "tools/features_command.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "driver/ublk_abi.h"

namespace uq::tools {
namespace {

// A kernel offering the opcode encoding, user copy, UPDATE_SIZE and a bit
// this program has no name for.
constexpr uint64_t kSample =
    UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_USER_COPY | UBLK_F_UPDATE_SIZE | (uint64_t{1} << 40);

TEST(RenderFeaturesTest, HumanTableNamesEveryBit) {
  EXPECT_EQ(RenderFeatures(kSample, true, "human"),
            "FEATURE           BIT  USED BY ADD\n"
            "CMD_IOCTL_ENCODE  6    yes\n"
            "USER_COPY         7    no\n"
            "UPDATE_SIZE       10   no\n"
            "bit 40            40   no\n");
}

// Where the kernel offers user recovery, add asks for it with re-issue.
TEST(RenderFeaturesTest, RecoveryUsedWhereOffered) {
  nlohmann::json j = nlohmann::json::parse(RenderFeatures(
      kSample | UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_USER_RECOVERY_FAIL_IO,
      true, "json"));
  EXPECT_EQ(j["used-by-add"],
            (nlohmann::json{"USER_RECOVERY", "USER_RECOVERY_REISSUE", "CMD_IOCTL_ENCODE"}));
}

// Where it also offers QUIESCE (6.16+), add asks for it with recovery, so
// that `upgrade` can replace the daemon.
TEST(RenderFeaturesTest, QuiesceUsedWithRecovery) {
  const uint64_t recovery = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
  nlohmann::json j =
      nlohmann::json::parse(RenderFeatures(kSample | recovery | UBLK_F_QUIESCE, true, "json"));
  EXPECT_EQ(j["used-by-add"], (nlohmann::json{"USER_RECOVERY", "USER_RECOVERY_REISSUE",
                                              "CMD_IOCTL_ENCODE", "QUIESCE"}));
  // Without recovery to go with it, QUIESCE is not asked for.
  j = nlohmann::json::parse(RenderFeatures(kSample | UBLK_F_QUIESCE, true, "json"));
  EXPECT_EQ(j["used-by-add"], (nlohmann::json{"CMD_IOCTL_ENCODE"}));
}

// Where it offers AUTO_BUF_REG and USER_COPY (6.16+), add asks for both by
// default (--zero-copy=auto); USER_COPY alone is not asked for.
TEST(RenderFeaturesTest, ZeroCopyUsedWhereOffered) {
  nlohmann::json j =
      nlohmann::json::parse(RenderFeatures(kSample | UBLK_F_AUTO_BUF_REG, true, "json"));
  EXPECT_EQ(j["used-by-add"], (nlohmann::json{"CMD_IOCTL_ENCODE", "USER_COPY", "AUTO_BUF_REG"}));
}

TEST(RenderFeaturesTest, Json) {
  nlohmann::json j = nlohmann::json::parse(RenderFeatures(kSample, true, "json"));
  EXPECT_EQ(j["get-features"], true);
  EXPECT_EQ(j["mask"], kSample);
  EXPECT_EQ(j["features"], (nlohmann::json{"CMD_IOCTL_ENCODE", "USER_COPY", "UPDATE_SIZE"}));
  EXPECT_EQ(j["unknown"], (nlohmann::json{40}));
  EXPECT_EQ(j["used-by-add"], (nlohmann::json{"CMD_IOCTL_ENCODE"}));
}

// Before 6.5 the kernel refuses GET_FEATURES: no table, and no flag used.
TEST(RenderFeaturesTest, KernelWithoutGetFeatures) {
  EXPECT_EQ(RenderFeatures(0, false, "human"),
            "this kernel's ublk has no GET_FEATURES (Linux before 6.5): no optional features\n");
  nlohmann::json j = nlohmann::json::parse(RenderFeatures(0, false, "json"));
  EXPECT_EQ(j["get-features"], false);
  EXPECT_TRUE(j["features"].empty());
  EXPECT_TRUE(j["unknown"].empty());
  EXPECT_TRUE(j["used-by-add"].empty());
}

}  // namespace
}  // namespace uq::tools
