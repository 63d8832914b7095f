// Crash safety of `commit` by fault injection. QEMU makes the chain: a base
// (qcow2 or raw) and an overlay with data, zeros and discards over it. The
// commit runs on copies held in a FaultInjectionEnv, first without a crash to
// count its write and sync boundaries, then once per boundary with a crash
// there (unsynced changes dropped, kept at random, or torn per sector, by
// turns). After each crash:
//   - `qemu-img check` passes on both images (leaks allowed, as QEMU's
//     design leaks clusters allocated by writes that never got flushed);
//   - the overlay reads exactly what it read before the commit (its clusters
//     are dropped only after the base holds their data durably);
//   - every 512-byte sector of the base holds its old bytes or the committed
//     ones (what the overlay read there).
// Without a crash the base reads what the overlay read and the overlay maps
// nothing itself.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "qcow2/testing/crash_harness.h"
#include "tools/commit_image.h"

namespace uq::tools {
namespace {

namespace harness = qcow2::testing;

struct CommitCrashCase {
  std::string name;
  std::string top_options;   // qemu-img create -o for the overlay
  std::string base_format;   // "qcow2" or "raw"
  std::string base_options;  // qemu-img create -o for a qcow2 base
};
std::ostream& operator<<(std::ostream& o, const CommitCrashCase& c) { return o << c.name; }

constexpr uint64_t kSize = 1 << 20;
constexpr uint64_t kSector = 512;

class CommitCrashTest : public harness::CrashFixture<CommitCrashCase> {
 protected:
  CommitCrashTest() : CrashFixture("commit-crash-") {}
  std::vector<std::byte> View(const std::string& image, const std::string& format) {
    return harness::RawView(*scratch_, fmt::format("-f {} {}", format, image));
  }
};

TEST_P(CommitCrashTest, EveryCrashPointLeavesOldOrCommittedData) {
  const CommitCrashCase& c = GetParam();
  const std::string base = "base." + c.base_format;
  const std::string base_opts = c.base_options.empty() ? "" : "-o " + c.base_options;
  ASSERT_EQ(
      Sh(fmt::format("qemu-img create -f {} {} {} {}", c.base_format, base_opts, base, kSize)), 0);
  ASSERT_EQ(Sh(fmt::format("qemu-io -f {} -c 'write -P 0xb1 0 768k' {}", c.base_format, base)), 0);
  ASSERT_EQ(Sh(fmt::format("qemu-img create -f qcow2 -o {} -b {} -F {} top.qcow2 {}", c.top_options,
                           base, c.base_format, kSize)),
            0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0x21 4k 60k' -c 'write -z 128k 64k' -c 'write -P 0x22 "
               "200k 3k' -c 'discard 256k 64k' -c 'write -P 0x23 900k 100k' -c 'write -P 0x24 "
               "1000k 512' top.qcow2"),
            0);
  const std::vector<std::byte> top_before = View("top.qcow2", "qcow2");
  const std::vector<std::byte> base_before = View(base, c.base_format);
  ASSERT_EQ(top_before.size(), kSize);
  ASSERT_EQ(Sh("mkdir -p after"), 0);

  // Commits copies of the images; crash_at < 0: no crash. Leaves them in after/.
  auto run = [&](int64_t crash_at) -> uint64_t {
    harness::MemEnv mem;
    harness::ImportImage(mem, scratch_->path("top.qcow2"), "/w/top.qcow2");
    harness::ImportImage(mem, scratch_->path(base), "/w/" + base);
    harness::CrashRun crash(&mem, crash_at);
    CommitRequest request;
    request.env = &crash.env();
    request.image = "/w/top.qcow2";
    Status st = BlockOn(CommitImage(request));
    if (crash_at < 0) EXPECT_TRUE(st.ok()) << st.ToString();
    const uint64_t count = crash.Finish();
    harness::ExportImage(mem, "/w/top.qcow2", scratch_->path("after/top.qcow2"));
    harness::ExportImage(mem, "/w/" + base, scratch_->path("after/" + base));
    return count;
  };

  const uint64_t boundaries = run(-1);
  ASSERT_GT(boundaries, 5u);
  ASSERT_EQ(Sh("qemu-img check after/top.qcow2"), 0);
  if (c.base_format == "qcow2") ASSERT_EQ(Sh("qemu-img check after/" + base), 0);
  ASSERT_EQ(View("after/" + base, c.base_format), top_before);
  std::string map;
  ASSERT_EQ(Sh("qemu-img map --output=json after/top.qcow2", &map), 0);
  EXPECT_EQ(map.find("\"depth\": 0"), std::string::npos) << "overlay not emptied:\n" << map;

  for (uint64_t n = 0; n < boundaries; n++) {
    run(static_cast<int64_t>(n));
    const std::string where = harness::CrashPoint(n);
    ASSERT_TRUE(harness::QemuCheckPasses(*scratch_, "after/top.qcow2")) << where << ": the overlay";
    if (c.base_format == "qcow2") {
      ASSERT_TRUE(harness::QemuCheckPasses(*scratch_, "after/" + base)) << where << ": the base";
    }
    ASSERT_EQ(View("after/top.qcow2", "qcow2"), top_before) << where << ": the overlay changed";
    const std::vector<std::byte> got = View("after/" + base, c.base_format);
    ASSERT_EQ(got.size(), kSize) << where;
    for (uint64_t s = 0; s < kSize; s += kSector) {
      const bool old_bytes = std::memcmp(&got[s], &base_before[s], kSector) == 0;
      const bool committed = std::memcmp(&got[s], &top_before[s], kSector) == 0;
      ASSERT_TRUE(old_bytes || committed)
          << where << ": base sector at " << s << " holds neither old nor committed data";
    }
  }
  RecordProperty("crash_points", static_cast<int>(boundaries));
  std::printf("%s: %llu crash points checked\n", c.name.c_str(),
              static_cast<unsigned long long>(boundaries));
}

INSTANTIATE_TEST_SUITE_P(
    Chains, CommitCrashTest,
    ::testing::Values(CommitCrashCase{"qcow2_base_4k", "cluster_size=4k", "qcow2",
                                      "cluster_size=4k"},
                      CommitCrashCase{"raw_base", "cluster_size=64k", "raw", ""},
                      CommitCrashCase{"extl2_top_v2_base", "cluster_size=16k,extended_l2=on",
                                      "qcow2", "compat=0.10,cluster_size=8k"}),
    [](const ::testing::TestParamInfo<CommitCrashCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::tools
