#include "driver/state_file.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <fstream>

namespace uq::driver {
namespace {

class StateFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string pattern = std::string(base ? base : "/tmp") + "/uq-state-XXXXXX";
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    ASSERT_NE(::mkdtemp(buf.data()), nullptr);
    dir_ = buf.data();
    dir_ += "/run";  // not created yet: WriteRecord creates it
    ::setenv("UBLK_QCOW2_STATE_DIR", dir_.c_str(), 1);
  }
  void TearDown() override { ::unsetenv("UBLK_QCOW2_STATE_DIR"); }
  std::string dir_;
};

DeviceRecord Sample(int id) {
  DeviceRecord r;
  r.id = id;
  r.image = "/scratch/a \"quoted\".qcow2";
  r.pid = 4242;
  r.queues = 2;
  r.depth = 64;
  r.size = uint64_t{1} << 40;
  r.read_only = true;
  r.working_dir = "/root";
  r.direct = false;
  r.cache_size = 1 << 20;
  r.preallocate = 0;
  r.max_io = 512 << 10;
  r.poll_us = 50;
  r.recovery = "fail-io";
  r.encrypted = true;
  return r;
}

TEST_F(StateFileTest, JsonRoundTrip) {
  DeviceRecord r = Sample(3);
  std::string json = RecordToJson(r);
  Result<DeviceRecord> back = RecordFromJson(json, "x");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, r);
  EXPECT_NE(json.find("\"id\":3"), std::string::npos);
}

TEST_F(StateFileTest, MalformedJsonIsCorruption) {
  EXPECT_TRUE(RecordFromJson("{", "f").status().IsCorruption());
  EXPECT_TRUE(RecordFromJson("[]", "f").status().IsCorruption());
  EXPECT_TRUE(RecordFromJson("{\"id\":1}", "f").status().IsCorruption());
  Status wrong = RecordFromJson(
                     "{\"id\":\"1\",\"image\":\"a\",\"pid\":1,\"queues\":1,\"depth\":1,\"size\":1,"
                     "\"read_only\":false}",
                     "f.json")
                     .status();
  EXPECT_TRUE(wrong.IsCorruption());
  EXPECT_NE(wrong.ToString().find("f.json"), std::string::npos);
}

// A record written before the recovery fields existed still reads, with
// the defaults `add` used then.
TEST_F(StateFileTest, OlderRecordGetsDefaults) {
  Result<DeviceRecord> old = RecordFromJson(
      "{\"id\":1,\"image\":\"/a\",\"pid\":1,\"queues\":1,\"depth\":1,\"size\":512,"
      "\"read_only\":false}",
      "f");
  ASSERT_TRUE(old.ok()) << old.status().ToString();
  EXPECT_EQ(old->recovery, "off");
  EXPECT_TRUE(old->direct);
  EXPECT_EQ(old->max_io, 1024u * 1024);
  EXPECT_TRUE(RecordFromJson("{\"id\":1,\"image\":\"/a\",\"pid\":1,\"queues\":1,\"depth\":1,"
                             "\"size\":512,\"read_only\":false,\"max_io\":\"x\"}",
                             "f")
                  .status()
                  .IsCorruption());
}

TEST_F(StateFileTest, WriteReadListRemove) {
  EXPECT_TRUE(RecordIds().empty());
  Result<std::optional<DeviceRecord>> none = ReadRecord(5);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  ASSERT_TRUE(WriteRecord(Sample(5)).ok());
  ASSERT_TRUE(WriteRecord(Sample(12)).ok());
  ASSERT_TRUE(WriteRecord(Sample(0)).ok());
  std::ofstream(dir_ + "/7.log") << "not a record";
  std::ofstream(dir_ + "/x.json") << "{}";
  EXPECT_EQ(RecordIds(), (std::vector<int>{0, 5, 12}));

  Result<std::optional<DeviceRecord>> got = ReadRecord(12);
  ASSERT_TRUE(got.ok());
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ(**got, Sample(12));
  EXPECT_EQ(RecordPath(12), dir_ + "/12.json");
  EXPECT_EQ(LogPath(12), dir_ + "/12.log");

  ASSERT_TRUE(RemoveRecord(12).ok());
  ASSERT_TRUE(RemoveRecord(12).ok());  // already gone: fine
  EXPECT_EQ(RecordIds(), (std::vector<int>{0, 5}));
}

}  // namespace
}  // namespace uq::driver
