// Crash tests for leak repair (CheckImage with RepairMode::kLeaks, what
// `check -r leaks` runs and what a recovering daemon runs before it serves,
// ImageOptions::repair_leaks): a crash at any write or sync boundary of the
// repair must leave an image that passes `qemu-img check` (leaks allowed:
// those not freed yet) with every guest byte as it was, and a second repair
// must then free what is left.
//
// The leaky images are what a dead daemon leaves: an image served with
// stable metadata (ublk user recovery), written with allocating writes,
// write-zeroes and discards, then the process dies (CrashMode::kKeepAll):
// the unused part of its cluster reserve leaks, and a discard whose refcount
// drop was not flushed leaves its cluster leaked. The repair is replayed
// once per boundary with a crash there, as a process death and as a power
// loss (each of the three modes in turn).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qcow2/check/check.h"
#include "qcow2/open_image.h"
#include "qcow2/testing/crash_harness.h"

namespace uq::qcow2 {
namespace {

using testing::CrashMode;
using testing::CrashRun;
using testing::MemEnv;

struct LeakCase {
  std::string name;
  std::string create;  // qemu-img create options
  uint64_t size;
};
std::ostream& operator<<(std::ostream& o, const LeakCase& c) { return o << c.name; }

class LeakRepairCrashTest : public testing::CrashFixture<LeakCase> {
 protected:
  LeakRepairCrashTest() : CrashFixture("leak-repair-") {}
  void SetUp() override {
    CrashFixture::SetUp();
    if (HasFatalFailure()) return;
    const LeakCase& c = GetParam();
    ASSERT_TRUE(testing::MakeImage(*scratch_, c.create, c.size));
    ASSERT_EQ(Sh(fmt::format("qemu-io -c 'write -P 0x21 0 {}' img.qcow2", c.size / 4)), 0);
    MakeLeaky();
    std::string out;
    ASSERT_EQ(Sh("qemu-img check leaky.qcow2", &out), 3) << "the workload left no leak:\n" << out;
    guest_ = testing::RawView(*scratch_, "leaky.qcow2");
  }

  // Serves img.qcow2 with stable metadata, then the process dies: leaky.qcow2.
  void MakeLeaky() {
    const uint64_t size = GetParam().size;
    MemEnv mem;
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    CrashRun crash(&mem, -1);
    {
      auto opened = BlockOn(
          OpenImage("/w/img.qcow2",
                    ImageOptions{.env = &crash.env(), .writable = true, .stable_metadata = true}));
      ASSERT_TRUE(opened.ok()) << opened.status().ToString();
      std::unique_ptr<BlockDevice> dev = std::move(*opened);
      std::vector<std::byte> data(12345, std::byte{0x5a});
      for (uint64_t at = size / 3; at + data.size() < size; at += size / 7) {
        ASSERT_TRUE(BlockOn(dev->Write(at, data, false)).ok());
      }
      ASSERT_TRUE(BlockOn(dev->WriteZeroes(size / 2, 65536)).ok());
      ASSERT_TRUE(BlockOn(dev->Discard(0, size / 8)).ok());
      crash.Die();  // the daemon dies here
    }
    crash.Finish(CrashMode::kKeepAll);
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/leaky.qcow2");
  }

  // Repairs leaky.qcow2 with a crash at boundary `crash_at` (< 0: none),
  // leaving the file as `mode` makes it in after.qcow2. Returns the
  // boundaries crossed and, through `result`, what the repair said.
  uint64_t Repair(int64_t crash_at, CrashMode mode, CheckResult* result = nullptr) {
    MemEnv mem;
    testing::ImportImage(mem, dir_ + "/leaky.qcow2", "/w/img.qcow2");
    CrashRun crash(&mem, crash_at);
    {
      auto file = crash.env().Open("/w/img.qcow2", OpenOptions{.writable = true});
      EXPECT_TRUE(file.ok());
      if (file.ok()) {
        Result<CheckResult> r =
            BlockOn(CheckImage(**file, CheckOptions{.repair = RepairMode::kLeaks}));
        if (result != nullptr && r.ok()) *result = *r;
      }
      crash.Die();
    }
    const uint64_t count = crash.Finish(mode);
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
    return count;
  }

  // after.qcow2: no corruption (leaks are allowed), the guest bytes as before.
  ::testing::AssertionResult Verify() {
    ::testing::AssertionResult consistent = testing::QemuCheckPasses(*scratch_, "after.qcow2");
    if (!consistent) return consistent;
    if (testing::RawView(*scratch_, "after.qcow2") != guest_) {
      return ::testing::AssertionFailure() << "the guest bytes changed";
    }
    return ::testing::AssertionSuccess();
  }

  std::vector<std::byte> guest_;
};

TEST_P(LeakRepairCrashTest, RepairFreesEveryLeak) {
  CheckResult result;
  const uint64_t boundaries = Repair(-1, CrashMode::kKeepAll, &result);
  EXPECT_GT(result.leaks_fixed, 0u);
  EXPECT_EQ(result.corruptions, 0u);
  EXPECT_GT(boundaries, 0u);
  EXPECT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2", /*leaks_allowed=*/false));
  EXPECT_TRUE(Verify());
}

// What a recovering daemon does: OpenImage with repair_leaks frees them
// before serving (and says so); a plain writable open and clean close
// leaves them.
TEST_P(LeakRepairCrashTest, OpenWithRepairLeaksFreesThem) {
  for (bool repair : {false, true}) {
    MemEnv mem;
    testing::ImportImage(mem, dir_ + "/leaky.qcow2", "/w/img.qcow2");
    uint64_t freed = 0;
    int calls = 0;
    ImageOptions options{.env = &mem, .writable = true, .stable_metadata = true};
    options.repair_leaks = repair;
    options.on_leak_repair = [&](const CheckResult& r, double seconds) {
      freed = r.leaks_fixed;
      calls++;
      EXPECT_EQ(r.corruptions, 0u);
      EXPECT_GE(seconds, 0.0);
    };
    auto opened = BlockOn(OpenImage("/w/img.qcow2", options));
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    ASSERT_TRUE(BlockOn((*opened)->Close()).ok());
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
    std::string out;
    EXPECT_EQ(Sh("qemu-img check after.qcow2", &out), repair ? 0 : 3) << out;
    EXPECT_EQ(calls, repair ? 1 : 0);
    if (repair) EXPECT_GT(freed, 0u);
    EXPECT_TRUE(Verify());
  }
}

TEST_P(LeakRepairCrashTest, CrashAtAnyBoundaryIsConsistent) {
  const uint64_t boundaries = Repair(-1, CrashMode::kKeepAll);
  ASSERT_GT(boundaries, 0u);
  int points = 0;
  for (uint64_t n = 0; n < boundaries; n++) {
    for (CrashMode mode : {CrashMode::kKeepAll, static_cast<CrashMode>(n % 3)}) {
      const std::string at =
          fmt::format("{} of {}", testing::CrashPoint(n, static_cast<int>(mode)), boundaries);
      Repair(static_cast<int64_t>(n), mode);
      ASSERT_TRUE(Verify()) << at;
      // A repair after the crash finishes the job.
      std::string out;
      ASSERT_EQ(Sh("qemu-img check -r leaks after.qcow2", &out), 0) << at << "\n" << out;
      ASSERT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2", /*leaks_allowed=*/false))
          << at;
      points++;
    }
  }
  std::printf("%s: %d crash points in a repair of %llu boundaries\n", GetParam().name.c_str(),
              points, static_cast<unsigned long long>(boundaries));
}

INSTANTIATE_TEST_SUITE_P(
    Images, LeakRepairCrashTest,
    ::testing::Values(LeakCase{"c64k", "", 8 << 20}, LeakCase{"c4k", "-o cluster_size=4k", 2 << 20},
                      LeakCase{"c512", "-o cluster_size=512", 1 << 20},
                      LeakCase{"v2_c4k", "-o compat=0.10,cluster_size=4k", 2 << 20},
                      LeakCase{"refcount1_c4k", "-o refcount_bits=1,cluster_size=4k", 2 << 20}),
    [](const ::testing::TestParamInfo<LeakCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
