// Crash safety of Qcow2Image::SetRefcountBits by fault injection, as
// resize_crash_test.cc does for Resize. A QEMU-made image is opened in a
// FaultInjectionEnv; data is written and flushed, the refcount width
// changed, the image closed. The run is replayed with a crash at every write
// and sync boundary (those of the width change with each of the three
// CrashModes, the writes before it with one in turn), and the surviving
// image must
//   - pass the engine's check and `qemu-img check` with no corruption, and
//     no leak either once the writes before the change were flushed,
//   - show the old or the new refcount width in `qemu-img info`, and
//   - read back every flushed byte.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qcow2/check/check.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/crash_harness.h"

namespace uq::qcow2 {
namespace {

using testing::CrashMode;
using testing::CrashRun;
using testing::FaultInjectionEnv;
using testing::MemEnv;
using testing::Write;

struct WidthCase {
  std::string name;
  std::string create;  // qemu-img create options
  uint64_t size;
  int bits;                          // the new width
  std::vector<std::string> qemu_io;  // qemu-io commands before the snapshot
  bool snapshot = false;             // an internal snapshot after them
};
std::ostream& operator<<(std::ostream& o, const WidthCase& c) { return o << c.name; }

class RefcountWidthCrashTest : public testing::CrashFixture<WidthCase> {
 protected:
  RefcountWidthCrashTest() : CrashFixture("refcount-width-crash-") {}
  // img.qcow2 as QEMU makes it for the case, and its guest view in start.raw.
  void MakeStartingImage() {
    const WidthCase& c = GetParam();
    ASSERT_TRUE(testing::MakeImage(*scratch_, c.create, c.size));
    for (const std::string& cmd : c.qemu_io) {
      ASSERT_EQ(Sh(fmt::format("qemu-io -c '{}' img.qcow2", cmd)), 0) << cmd;
    }
    if (c.snapshot) ASSERT_EQ(Sh("qemu-img snapshot -c before img.qcow2"), 0);
    ASSERT_EQ(Sh("qemu-img convert -O raw img.qcow2 start.raw"), 0);
  }
  // The refcount-bits qemu-img info shows for after.qcow2 (0: none found).
  int InfoBits() { return InfoBitsOf("after.qcow2"); }
  int InfoBitsOf(const std::string& name) {
    std::string out;
    if (Sh("qemu-img info --output=json " + name, &out) != 0) return 0;
    const std::string key = "\"refcount-bits\": ";
    const size_t at = out.find(key);
    return at == std::string::npos ? 0 : std::atoi(out.c_str() + at + key.size());
  }
};

// The writes before the change (new clusters, and one into the snapshot's).
std::vector<Write> Writes(const WidthCase& c) {
  return {{4096, 5000, 0x11}, {c.size / 3, 70000, 0x22}, {c.size - 9000, 9000, 0x33}};
}

TEST_P(RefcountWidthCrashTest, EveryCrashPointLeavesTheOldOrTheNewWidth) {
  const WidthCase& c = GetParam();
  ASSERT_NO_FATAL_FAILURE(MakeStartingImage());
  std::vector<std::byte> flushed = scratch_->Slurp("start.raw");
  testing::ApplyWrites(flushed, Writes(c));
  std::string info;
  ASSERT_EQ(Sh("qemu-img info --output=json img.qcow2", &info), 0);
  const int old_bits = [&] {
    const size_t at = info.find("\"refcount-bits\": ");
    return at == std::string::npos ? 0 : std::atoi(info.c_str() + at + 17);
  }();
  ASSERT_NE(old_bits, 0);
  ASSERT_NE(old_bits, c.bits);

  // Runs the whole job on fresh copies; returns the boundaries crossed. The
  // engine's check runs on the surviving bytes.
  uint64_t flushed_at = 0;  // boundaries crossed when the flush completed
  auto run = [&](int64_t crash_at, CrashMode mode, bool* changed) -> uint64_t {
    MemEnv mem;
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    CrashRun crash(&mem, crash_at);
    *changed = false;
    auto opened =
        BlockOn(OpenImage("/w/img.qcow2", ImageOptions{.env = &crash.env(), .writable = true}));
    if (opened.ok()) {
      std::unique_ptr<BlockDevice> dev = std::move(*opened);
      Status st = testing::WriteAndFlush(*dev, Writes(c));
      if (crash_at < 0) flushed_at = crash.env().operation_count();
      if (st.ok()) st = BlockOn(dynamic_cast<Qcow2Image&>(*dev).SetRefcountBits(c.bits));
      *changed = st.ok();
      if (st.ok()) st = BlockOn(dev->Close());
      if (crash_at < 0) EXPECT_TRUE(st.ok()) << st.ToString();
    }
    const uint64_t count = crash.Finish(mode);
    Result<CheckResult> checked = testing::CheckInMemory(mem, "/w/img.qcow2");
    EXPECT_TRUE(checked.ok()) << checked.status().ToString();
    if (checked.ok()) {
      EXPECT_EQ(checked->corruptions, 0u) << "crash at " << crash_at;
      if (crash_at >= static_cast<int64_t>(flushed_at)) {
        EXPECT_EQ(checked->leaks, 0u) << "crash at " << crash_at;
      }
      EXPECT_TRUE(checked->error.empty()) << "crash at " << crash_at << ": " << checked->error;
    }
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
    return count;
  };

  bool changed = false;
  const uint64_t boundaries = run(-1, CrashMode::kDropAllUnsynced, &changed);
  ASSERT_TRUE(changed);
  ASSERT_GT(boundaries, 10u);
  ASSERT_EQ(Sh("qemu-img check after.qcow2"), 0);
  ASSERT_EQ(InfoBits(), c.bits);

  // Boundaries before the flush of the writes get one crash mode each (in
  // turn); those of the width change get all three.
  std::vector<std::pair<uint64_t, int>> points;
  for (uint64_t n = 0; n < boundaries; n++) {
    if (n < flushed_at) {
      points.emplace_back(n, n % 3);
    } else {
      for (int mode = 0; mode < 3; mode++) points.emplace_back(n, mode);
    }
  }
  int new_width_seen = 0;
  for (auto [n, mode] : points) {
    run(static_cast<int64_t>(n), static_cast<CrashMode>(mode), &changed);
    if (HasFailure()) FAIL() << "engine check after a crash at boundary " << n << " mode " << mode;
    const std::string at = testing::CrashPoint(n, mode);
    // Once the writes are flushed, the width change leaks nothing: before
    // the switch its clusters lie past the old end with refcount 0 (qemu-img
    // check counts neither corruption nor leak there), after it the old
    // structures have refcount 0 under the new ones.
    const bool flushed_before = n >= flushed_at;
    ASSERT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2", !flushed_before)) << at;
    std::string out;
    const int bits = InfoBits();
    ASSERT_TRUE(bits == old_bits || bits == c.bits) << at << ": refcount-bits " << bits;
    if (bits == c.bits) new_width_seen++;
    // A crash before the flush completed promises nothing about the writes.
    if (!flushed_before) continue;
    ASSERT_EQ(Sh("qemu-img convert -O raw after.qcow2 after.raw", &out), 0) << at << out;
    std::vector<std::byte> got = scratch_->Slurp("after.raw");
    ASSERT_EQ(got.size(), flushed.size()) << at;
    for (uint64_t i = 0; i < got.size(); i++) {
      ASSERT_EQ(got[i], flushed[i]) << at << ": flushed byte " << i << " lost";
    }
  }
  // The crash points reach past the header switch.
  EXPECT_GT(new_width_seen, 0);
  std::printf(
      "%s: %zu crashes at %llu boundaries (%llu in the width change, 3 modes each), %d "
      "with the new width\n",
      c.name.c_str(), points.size(), static_cast<unsigned long long>(boundaries),
      static_cast<unsigned long long>(boundaries - flushed_at), new_width_seen);
}

// An I/O error (EIO, no crash) at each write, discard, truncation or sync of
// the width change: SetRefcountBits fails, or, where the error costs only
// space (a discard, the final cut), succeeds. Either way the image stays
// usable: a failure before the header write leaves it writable at the old
// width (a later write and Close work), a failure of the header write or its
// sync leaves it read-only; and it passes qemu-img check with the old or the
// new width and every byte written.
TEST_P(RefcountWidthCrashTest, AnIoErrorLeavesAUsableImage) {
  const WidthCase& c = GetParam();
  ASSERT_NO_FATAL_FAILURE(MakeStartingImage());
  const std::vector<std::byte> start = scratch_->Slurp("start.raw");
  constexpr uint32_t kOps = testing::Fault::kWrite | testing::Fault::kSync |
                            testing::Fault::kDiscard | testing::Fault::kTruncate;
  const std::vector<std::byte> later(8192, std::byte{0x99});
  const uint64_t later_at = c.size / 2;

  // fail_at < 0: no error; returns the operations SetRefcountBits did.
  auto run = [&](int64_t fail_at, int* failed, int* still_writable) -> uint64_t {
    MemEnv mem;
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    FaultInjectionEnv env(&mem);
    auto opened = BlockOn(OpenImage("/w/img.qcow2", ImageOptions{.env = &env, .writable = true}));
    EXPECT_TRUE(opened.ok()) << opened.status().ToString();
    if (!opened.ok()) return 0;
    std::unique_ptr<BlockDevice> dev = std::move(*opened);
    if (fail_at >= 0) {
      env.AddFault({.ops = kOps, .skip = static_cast<uint64_t>(fail_at), .count = 1});
    }
    const uint64_t before = env.operation_count();
    Status st = BlockOn(dynamic_cast<Qcow2Image&>(*dev).SetRefcountBits(c.bits));
    const uint64_t ops = env.operation_count() - before;
    env.ClearFaults();
    *failed += !st.ok();
    std::vector<std::byte> want = start;
    if (!dev->read_only()) {
      *still_writable += !st.ok();
      Status w = BlockOn(dev->Write(later_at, later, false));
      EXPECT_TRUE(w.ok()) << "error at " << fail_at << ": " << w.ToString();
      std::copy(later.begin(), later.end(), want.begin() + later_at);
    }
    EXPECT_TRUE(BlockOn(dev->Close()).ok());
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
    std::string out;
    EXPECT_EQ(Sh("qemu-img check after.qcow2", &out), 0) << "error at " << fail_at << "\n" << out;
    EXPECT_EQ(Sh("qemu-img convert -O raw after.qcow2 after.raw"), 0);
    EXPECT_TRUE(scratch_->Slurp("after.raw") == want) << "error at " << fail_at;
    return ops;
  };

  int failed = 0, still_writable = 0;
  const uint64_t ops = run(-1, &failed, &still_writable);
  ASSERT_EQ(failed, 0);
  ASSERT_EQ(InfoBits(), c.bits);
  for (uint64_t k = 0; k < ops && !HasFailure(); k++) {
    run(static_cast<int64_t>(k), &failed, &still_writable);
    const int bits = InfoBits();
    EXPECT_TRUE(bits == c.bits || bits == InfoBitsOf("img.qcow2")) << "error at " << k;
  }
  EXPECT_GT(still_writable, 0);
  std::printf("%s: %llu errors injected, %d failed the change (%d left it writable)\n",
              c.name.c_str(), static_cast<unsigned long long>(ops), failed, still_writable);
}

INSTANTIATE_TEST_SUITE_P(
    Widths, RefcountWidthCrashTest,
    ::testing::Values(
        // 512 B clusters, 1 -> 64 bits: 64 clusters per new block, so ~45
        // block writes and a table of two clusters.
        WidthCase{"c512_1_to_64",
                  "-o cluster_size=512,refcount_bits=1",
                  1 << 20,
                  64,
                  {"write -P 0x41 0 1M"}},
        // 64 -> 2 bits with a snapshot sharing clusters (refcount 2 fits).
        WidthCase{
            "snapshot_64_to_2", "-o refcount_bits=64", 4 << 20, 2, {"write -P 0x51 0 2M"}, true},
        // 16 -> 8 bits with compressed clusters packed into shared host
        // clusters and a snapshot: refcounts well above 2.
        WidthCase{"compressed_snapshot_16_to_8",
                  "-o cluster_size=4k",
                  2 << 20,
                  8,
                  {"write -c -P 0x61 0 256k", "write -P 0x62 1M 64k"},
                  true},
        // 16 -> 1 bit, data only.
        WidthCase{"c4k_16_to_1", "-o cluster_size=4k", 2 << 20, 1, {"write -P 0x71 0 1M"}}),
    [](const ::testing::TestParamInfo<WidthCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
