#include "tools/list_command.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "driver/ublk_abi.h"

namespace uq::tools {
namespace {

std::vector<driver::DeviceStatus> Sample() {
  driver::DeviceStatus a;
  a.id = 0;
  a.block_path = "/dev/ublkb0";
  a.state = "live";
  a.queues = 2;
  a.depth = 64;
  a.pid = 812;
  a.daemon_running = true;
  a.size = uint64_t{1} << 30;
  a.image = "/scratch/a.qcow2";
  a.flags = UBLK_F_URING_CMD_COMP_IN_TASK | UBLK_F_CMD_IOCTL_ENCODE | (uint64_t{1} << 40);
  driver::DeviceStatus b;
  b.id = 12;
  b.block_path = "/dev/ublkb12";
  b.state = "dead";
  b.queues = 1;
  b.depth = 128;
  b.pid = 0;
  b.size = 0;
  return {a, b};
}

TEST(RenderDeviceListTest, HumanTableWithAlignedColumns) {
  EXPECT_EQ(RenderDeviceList(Sample(), "human"),
            "ID  DEVICE        STATE  QUEUES  DEPTH  PID  SIZE   IMAGE\n"
            "0   /dev/ublkb0   live   2       64     812  1 GiB  /scratch/a.qcow2\n"
            "12  /dev/ublkb12  dead   1       128    -    -      -\n");
}

TEST(RenderDeviceListTest, NothingWhenEmpty) {
  EXPECT_EQ(RenderDeviceList({}, "human"), "");
  EXPECT_EQ(RenderDeviceList({}, "json"), "[]\n");
}

TEST(RenderDeviceListTest, Json) {
  nlohmann::json j = nlohmann::json::parse(RenderDeviceList(Sample(), "json"));
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["device"], "/dev/ublkb0");
  EXPECT_EQ(j[0]["pid"], 812);
  EXPECT_EQ(j[0]["size"], uint64_t{1} << 30);
  EXPECT_EQ(j[0]["image"], "/scratch/a.qcow2");
  EXPECT_TRUE(j[1]["pid"].is_null());
  EXPECT_TRUE(j[1]["image"].is_null());
  EXPECT_EQ(j[1]["state"], "dead");
  EXPECT_EQ(j[0]["flags"],
            (nlohmann::json{"URING_CMD_COMP_IN_TASK", "CMD_IOCTL_ENCODE", "bit 40"}));
  EXPECT_TRUE(j[1]["flags"].is_null());  // not known
}

}  // namespace
}  // namespace uq::tools
