// Crash safety of Qcow2Image::Resize by fault injection, as crash_test.cc
// does for writes. A QEMU-made image is opened in a FaultInjectionEnv; data
// is written and flushed, the image resized (growing the L1 table, zeroing
// over a longer backing file, preallocating, or shrinking into data), then
// closed. The run is replayed with a crash at every write and sync boundary
// (each of the three CrashModes in turn), and the surviving image must
//   - pass `qemu-img check` with no corruption (leaks are allowed), and
//   - have the old or the new virtual size, never another, and
//   - read back every flushed byte below both sizes; with the new size after
//     a grow, read zeros in the new area.
// (After a shrink that crashed before the header changed, the old size is
// back and the released tail may read as zeros: QEMU's shrink does the same.)
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/crash_harness.h"

namespace uq::qcow2 {
namespace {

using testing::CrashRun;
using testing::MemEnv;
using testing::Write;

struct ResizeCase {
  std::string name;
  std::string create;  // qemu-img create options
  uint64_t size;
  uint64_t new_size;
  Preallocation prealloc = Preallocation::kOff;
  bool longer_backing = false;  // a backing file twice the image's size, all 0xb1
  bool snapshot = false;        // an internal snapshot of the first writes
};
std::ostream& operator<<(std::ostream& o, const ResizeCase& c) { return o << c.name; }

class ResizeCrashTest : public testing::CrashFixture<ResizeCase> {
 protected:
  ResizeCrashTest() : CrashFixture("resize-crash-") {}
};

// The writes before the resize: spread over the image, the last one
// reaching into the part a shrink cuts.
std::vector<Write> Writes(const ResizeCase& c) {
  return {{0, 5000, 0x11},
          {c.size / 3, 70000, 0x22},
          {c.size - 9000, 9000, 0x33},
          {std::min(c.size, c.new_size) / 2 + 512, 3000, 0x44}};
}

TEST_P(ResizeCrashTest, EveryCrashPointLeavesTheOldOrTheNewImage) {
  const ResizeCase& c = GetParam();
  if (c.longer_backing) {
    ASSERT_TRUE(testing::MakeBackedImage(*scratch_, c.create, c.size, 2 * c.size, 2 * c.size));
  } else {
    ASSERT_TRUE(testing::MakeImage(*scratch_, c.create, c.size));
  }
  if (c.snapshot) {
    ASSERT_EQ(Sh(fmt::format("qemu-io -c 'write -P 0x21 0 {}' img.qcow2", c.size / 2)), 0);
    ASSERT_EQ(Sh("qemu-img snapshot -c before img.qcow2"), 0);
  }
  ASSERT_EQ(Sh("qemu-img convert -O raw img.qcow2 start.raw"), 0);
  std::vector<std::byte> flushed = scratch_->Slurp("start.raw");
  testing::ApplyWrites(flushed, Writes(c));

  // Runs the whole job on fresh copies; returns the boundaries crossed.
  uint64_t flushed_at = 0;  // boundaries crossed when the flush completed
  auto run = [&](int64_t crash_at, bool* resized) -> uint64_t {
    MemEnv mem;
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    if (c.longer_backing) testing::ImportImage(mem, dir_ + "/base.qcow2", "/w/base.qcow2");
    CrashRun crash(&mem, crash_at);
    *resized = false;
    auto opened = testing::OpenWritableImage(crash.env());
    if (opened.ok()) {
      std::unique_ptr<BlockDevice> dev = std::move(*opened);
      Status st = testing::WriteAndFlush(*dev, Writes(c));
      if (crash_at < 0) flushed_at = crash.env().operation_count();
      if (st.ok()) st = BlockOn(dev->Resize(c.new_size, c.prealloc));
      *resized = st.ok();
      if (st.ok()) st = BlockOn(dev->Close());
      if (crash_at < 0) EXPECT_TRUE(st.ok()) << st.ToString();
    }
    const uint64_t count = crash.Finish();
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
    return count;
  };

  bool resized = false;
  const uint64_t boundaries = run(-1, &resized);
  ASSERT_TRUE(resized);
  ASSERT_GT(boundaries, 10u);
  ASSERT_EQ(Sh("qemu-img check after.qcow2"), 0);

  const uint64_t common = std::min(c.size, c.new_size);
  int new_size_seen = 0;
  for (uint64_t n = 0; n < boundaries; n++) {
    run(static_cast<int64_t>(n), &resized);
    const std::string at = testing::CrashPoint(n);
    ASSERT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2")) << at;
    std::string out;
    ASSERT_EQ(Sh("qemu-img convert -O raw after.qcow2 after.raw", &out), 0) << at << out;
    std::vector<std::byte> got = scratch_->Slurp("after.raw");
    ASSERT_TRUE(got.size() == c.size || got.size() == c.new_size)
        << at << ": virtual size " << got.size();
    if (got.size() == c.new_size && c.new_size != c.size) new_size_seen++;
    // Flushed data below both sizes survives (a crash before the flush
    // completed promises nothing about the writes).
    if (n < flushed_at) continue;
    // (Whole-buffer searches: a new area of 100+ MiB is read at every point.)
    const auto lost = std::mismatch(got.begin(), got.begin() + common, flushed.begin()).first;
    ASSERT_EQ(lost, got.begin() + common)
        << at << ": flushed byte " << (lost - got.begin()) << " lost";
    if (got.size() == c.new_size && c.new_size > c.size) {
      const auto nonzero = std::find_if(got.begin() + c.size, got.end(),
                                        [](std::byte b) { return b != std::byte{0}; });
      ASSERT_EQ(nonzero, got.end())
          << at << ": byte " << (nonzero - got.begin()) << " of the new area";
    }
  }
  // The crash points reach past the header switch.
  EXPECT_GT(new_size_seen, 0);
  std::printf("%s: %llu crash points checked, %d with the new size\n", c.name.c_str(),
              static_cast<unsigned long long>(boundaries), new_size_seen);
}

INSTANTIATE_TEST_SUITE_P(
    Resizes, ResizeCrashTest,
    ::testing::Values(
        // 512 B clusters: an L2 table spans 32 KiB, so 1 MiB -> 6 MiB moves
        // a 256-byte L1 table to 2 clusters.
        ResizeCase{"grow_l1_c512", "-o cluster_size=512", 1 << 20, 6 << 20},
        // 512 B clusters with 64-bit refcounts: a block covers 64 clusters,
        // and 1 MiB -> 136 MiB needs a 68-cluster L1 table, a run no range
        // with its own block can hold (Refcounts gives it ranges of its own).
        ResizeCase{"grow_l1_longer_than_a_block_range", "-o cluster_size=512,refcount_bits=64",
                   1 << 20, 136 << 20},
        ResizeCase{"grow_extl2_over_longer_backing", "-o cluster_size=16k,extended_l2=on", 1 << 20,
                   (3 << 20) / 2 + 1024, Preallocation::kOff, true},
        ResizeCase{"grow_metadata_refcount1", "-o cluster_size=4k,refcount_bits=1", 1 << 20,
                   (3 << 20) / 2 + 512, Preallocation::kMetadata},
        ResizeCase{"grow_full_snapshot", "-o cluster_size=4k", 1 << 20, (3 << 20) / 2,
                   Preallocation::kFull, false, true},
        ResizeCase{"shrink_c512", "-o cluster_size=512", 1 << 20, (300 << 10) + 1536},
        ResizeCase{"shrink_snapshot", "-o cluster_size=4k", 1 << 20, 300 << 10, Preallocation::kOff,
                   false, true}),
    [](const ::testing::TestParamInfo<ResizeCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
