// Crash safety of a safe `rebase` by fault injection. QEMU makes an overlay
// over an old backing file and a new backing file that differs from it in
// places; the rebase runs on copies held in a FaultInjectionEnv, first
// without a crash to count its write and sync boundaries, then once per
// boundary with a crash there (unsynced changes dropped, kept at random, or
// torn per sector, by turns). After each crash `qemu-img check` passes on the
// overlay (leaks allowed) and the overlay, through whichever backing file its
// header names, reads exactly what it read before: the copies equal what the
// old chain reads, and are stable before the header names the new file.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qcow2/testing/crash_harness.h"
#include "tools/rebase_image.h"

namespace uq::tools {
namespace {

namespace harness = qcow2::testing;

struct RebaseCrashCase {
  std::string name;
  std::string options;  // qemu-img create -o for all three images
  std::string backing;  // the new backing file's name ("" removes it)
};
std::ostream& operator<<(std::ostream& o, const RebaseCrashCase& c) { return o << c.name; }

constexpr uint64_t kSize = 1 << 20;

class RebaseCrashTest : public harness::CrashFixture<RebaseCrashCase> {
 protected:
  RebaseCrashTest() : CrashFixture("rebase-crash-") {}
};

TEST_P(RebaseCrashTest, EveryCrashPointKeepsTheGuestView) {
  const RebaseCrashCase& c = GetParam();
  const std::string o = "-o " + c.options;
  ASSERT_EQ(Sh(fmt::format("qemu-img create -f qcow2 {} old.qcow2 {}", o, kSize)), 0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0xb1 0 512k' -c 'write -z 64k 64k' old.qcow2"), 0);
  ASSERT_EQ(Sh(fmt::format("qemu-img create -f qcow2 {} new.qcow2 {}", o, kSize)), 0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0xb1 0 128k' -c 'write -P 0xc2 300k 5k' -c 'write -P 0xc3 "
               "700k 100k' new.qcow2"),
            0);
  ASSERT_EQ(
      Sh(fmt::format("qemu-img create -f qcow2 {} -b old.qcow2 -F qcow2 top.qcow2 {}", o, kSize)),
      0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0x21 4k 8k' -c 'write -z 320k 4k' top.qcow2"), 0);
  ASSERT_EQ(Sh("qemu-img convert -O raw top.qcow2 before.raw"), 0);
  const std::vector<std::byte> before = scratch_->Slurp("before.raw");
  ASSERT_EQ(Sh("mkdir -p after && cp old.qcow2 new.qcow2 after/"), 0);

  // Rebases a copy of the overlay; crash_at < 0: no crash. Leaves it in after/.
  auto run = [&](int64_t crash_at) -> uint64_t {
    harness::MemEnv mem;
    for (const char* name : {"top.qcow2", "old.qcow2", "new.qcow2"}) {
      harness::ImportImage(mem, scratch_->path(name), std::string("/w/") + name);
    }
    harness::CrashRun crash(&mem, crash_at);
    RebaseRequest request;
    request.env = &crash.env();
    request.image = "/w/top.qcow2";
    request.backing = c.backing;
    if (!c.backing.empty()) request.backing_format = "qcow2";
    Status st = BlockOn(RebaseImage(request));
    if (crash_at < 0) EXPECT_TRUE(st.ok()) << st.ToString();
    const uint64_t count = crash.Finish();
    harness::ExportImage(mem, "/w/top.qcow2", scratch_->path("after/top.qcow2"));
    return count;
  };

  std::string out;
  const uint64_t boundaries = run(-1);
  ASSERT_GT(boundaries, 3u);
  ASSERT_EQ(Sh("qemu-img info after/top.qcow2", &out), 0);
  EXPECT_EQ(out.find("backing file: old.qcow2"), std::string::npos) << out;
  for (uint64_t n = 0; n <= boundaries; n++) {
    // n == boundaries: the run without a crash, checked the same way.
    if (n < boundaries) run(static_cast<int64_t>(n));
    if (n == boundaries) run(-1);
    const std::string where = harness::CrashPoint(n);
    ASSERT_TRUE(harness::QemuCheckPasses(*scratch_, "after/top.qcow2")) << where;
    ASSERT_EQ(Sh("qemu-img convert -O raw after/top.qcow2 after.raw", &out), 0) << where << out;
    ASSERT_TRUE(scratch_->Slurp("after.raw") == before) << where << ": the guest view changed";
  }
  RecordProperty("crash_points", static_cast<int>(boundaries));
  std::printf("%s: %llu crash points checked\n", c.name.c_str(),
              static_cast<unsigned long long>(boundaries));
}

INSTANTIATE_TEST_SUITE_P(
    Chains, RebaseCrashTest,
    ::testing::Values(RebaseCrashCase{"onto_new_4k", "cluster_size=4k", "new.qcow2"},
                      RebaseCrashCase{"remove_extl2", "cluster_size=16k,extended_l2=on", ""},
                      RebaseCrashCase{"onto_new_64k", "cluster_size=64k", "new.qcow2"}),
    [](const ::testing::TestParamInfo<RebaseCrashCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::tools
