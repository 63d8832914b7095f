// Crash safety of persistent dirty bitmaps (qcow2_bitmaps.cc) by fault
// injection, as snapshot_crash_test.cc does for snapshots. A QEMU-made image
// with bitmaps b0 (enabled, with dirty bits from qemu-io writes) and b1
// (disabled) is opened in a FaultInjectionEnv, and either
//   - kOps: the operations of `bitmap` run (add n -g 512, merge b0 into n,
//     disable b0, remove b1), then Close stores them; or
//   - kWrites: guest writes, a write-zeroes and a discard run, flushed, then
//     Close stores the bitmaps;
//   - kGrow, kShrink: Resize (to sizes that are no multiple of a granule;
//     the growth needs a larger bitmap table), then Close stores the resized
//     bitmaps;
// and the run is replayed with a crash at every write and sync boundary
// (each of the three CrashModes in turn). The surviving image must
//   - pass the engine's check with no corruption (leaks allowed);
//   - list the old bitmaps or the new ones (names, enabled flags), never a
//     mix; kOps never leaves a bitmap in use (no data is written); a resize
//     may leave any in use (never a valid one with a table too small for
//     the disk: the image would not open);
//   - hold, in every bitmap not in use, exactly its old or its new bits; a
//     bitmap with its old bits must cover every granule whose data changed
//     (never wrong: a bitmap that missed a write is marked in use). b1
//     (disabled) is never in use and never changes.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "qcow2/check/check.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/crash_harness.h"

namespace uq::qcow2 {
namespace {

using testing::CrashRun;
using testing::MemEnv;

enum class Op { kOps, kWrites, kGrow, kShrink };
bool IsResize(Op op) { return op == Op::kGrow || op == Op::kShrink; }

struct BitmapCase {
  std::string name;
  std::string create;  // qemu-img create options
  uint64_t size;
  Op op;
  std::string granularity;  // b0's
};
std::ostream& operator<<(std::ostream& o, const BitmapCase& c) { return o << c.name; }

using Extents = std::vector<std::pair<uint64_t, uint64_t>>;
struct Listed {
  bool enabled, in_use;
  Extents bits;  // empty when in use
  bool operator==(const Listed& o) const {
    return enabled == o.enabled && in_use == o.in_use && bits == o.bits;
  }
};
using State = std::map<std::string, Listed>;

// The bitmaps of the image at /w/img.qcow2 in `mem`, and its guest data.
Result<State> ReadState(MemEnv& mem, std::vector<std::byte>* data) {
  ASSIGN_OR_RETURN(std::unique_ptr<BlockDevice> dev,
                   BlockOn(OpenImage("/w/img.qcow2", ImageOptions{.env = &mem, .lock = false})));
  auto* image = dynamic_cast<Qcow2Image*>(dev.get());
  State s;
  for (const BitmapSummary& b : image->bitmaps()) {
    Listed l{b.enabled, b.in_use, {}};
    if (!b.in_use) {
      ASSIGN_OR_RETURN(std::shared_ptr<const DirtyBitmap> bits,
                       BlockOn(image->BitmapContents(b.name)));
      for (const auto& e : bits->DirtyExtents()) l.bits.emplace_back(e.offset, e.length);
    }
    s[b.name] = l;
  }
  data->resize(dev->size());
  RETURN_IF_ERROR(BlockOn(dev->Read(0, *data)));
  RETURN_IF_ERROR(BlockOn(dev->Close()));
  return s;
}

class BitmapCrashTest : public testing::CrashFixture<BitmapCase> {
 protected:
  BitmapCrashTest() : CrashFixture("bitmap-crash-") {}
};

TEST_P(BitmapCrashTest, EveryCrashPointLeavesTheOldOrTheNewBitmaps) {
  const BitmapCase& c = GetParam();
  ASSERT_TRUE(testing::MakeImage(*scratch_, c.create, c.size));
  ASSERT_EQ(Sh(fmt::format("qemu-img bitmap --add -g {} img.qcow2 b0", c.granularity)), 0);
  ASSERT_EQ(Sh("qemu-img bitmap --add --disable -g 64k img.qcow2 b1"), 0);
  ASSERT_EQ(Sh(fmt::format("qemu-io -c 'write -P 0x11 0 100000' -c 'write -P 0x12 {} 8192' "
                           "img.qcow2",
                           c.size - 16384)),
            0);
  ASSERT_EQ(Sh("qemu-img bitmap --enable img.qcow2 b1"), 0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0x13 300000 5000' img.qcow2"), 0);
  ASSERT_EQ(Sh("qemu-img bitmap --disable img.qcow2 b1"), 0);

  // The state before, read by our engine from QEMU's image.
  std::vector<std::byte> start;
  State old_state;
  {
    MemEnv mem;
    ASSERT_TRUE(mem.ImportFromHostFile(dir_ + "/img.qcow2", "/w/img.qcow2").ok());
    Result<State> s = ReadState(mem, &start);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    old_state = *s;
  }
  ASSERT_EQ(old_state.size(), 2u);
  ASSERT_FALSE(old_state["b0"].bits.empty());
  ASSERT_FALSE(old_state["b1"].bits.empty());

  struct Request {
    char kind;  // w(rite), z(ero), d(iscard)
    uint64_t offset, length;
  };
  const std::vector<Request> requests = {
      {'w', c.size / 2 + 700, 9000}, {'z', c.size / 4, 70000}, {'d', c.size - 300000, 200000}};

  const uint64_t new_size = c.op == Op::kGrow ? c.size * 5 + 3 * 512 : c.size / 2 + 7 * 512;
  uint64_t opened_at = 0;
  auto run = [&](int64_t crash_at, MemEnv& mem, bool* done) -> uint64_t {
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    CrashRun crash(&mem, crash_at);
    *done = false;
    auto opened = testing::OpenWritableImage(crash.env());
    if (crash_at < 0) opened_at = crash.env().operation_count();
    if (opened.ok()) {
      std::unique_ptr<BlockDevice> dev = std::move(*opened);
      auto* image = dynamic_cast<Qcow2Image*>(dev.get());
      Status st;
      if (c.op == Op::kOps) {
        st = image->AddBitmap("n", 512, true);
        if (st.ok()) {
          auto b0 = BlockOn(image->BitmapContents("b0"));
          st = b0.ok() ? BlockOn(image->MergeBitmap("n", **b0)) : b0.status();
        }
        if (st.ok()) st = BlockOn(image->EnableBitmap("b0", false));
        if (st.ok()) st = image->RemoveBitmap("b1");
      } else if (IsResize(c.op)) {
        st = BlockOn(image->Resize(new_size, Preallocation::kOff));
      } else {
        for (const Request& r : requests) {
          if (!st.ok()) break;
          if (r.kind == 'w') {
            std::vector<std::byte> data(r.length, std::byte{0x5a});
            st = BlockOn(dev->Write(r.offset, data, false));
          } else if (r.kind == 'z') {
            st = BlockOn(dev->WriteZeroes(r.offset, r.length));
          } else {
            st = BlockOn(dev->Discard(r.offset, r.length));
          }
        }
        if (st.ok()) st = BlockOn(dev->Flush());
      }
      if (st.ok()) st = BlockOn(dev->Close());
      *done = st.ok();
      if (crash_at < 0) EXPECT_TRUE(st.ok()) << st.ToString();
    }
    return crash.Finish();
  };

  // The state after a run without a crash is the new one.
  State new_state;
  uint64_t boundaries;
  {
    MemEnv mem;
    bool done = false;
    boundaries = run(-1, mem, &done);
    ASSERT_TRUE(done);
    std::vector<std::byte> data;
    Result<State> s = ReadState(mem, &data);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    new_state = *s;
    EXPECT_EQ(data.size(), IsResize(c.op) ? new_size : c.size);
    if (c.op != Op::kGrow) EXPECT_NE(new_state, old_state);
    ASSERT_TRUE(mem.ExportToHostFile("/w/img.qcow2", dir_ + "/after.qcow2").ok());
    EXPECT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2", /*leaks_allowed=*/false));
  }
  if (c.op == Op::kOps) {
    EXPECT_EQ(new_state.count("b1"), 0u);
    EXPECT_EQ(new_state["n"].bits, old_state["b0"].bits);
    EXPECT_FALSE(new_state["b0"].enabled);
  } else if (IsResize(c.op)) {
    // The bits follow the size: the new area clean, granules past a shrunk
    // end gone (DirtyExtents clamps a partial last one to the end).
    for (const auto& [name, old] : old_state) {
      Listed want = old;
      want.bits.clear();
      for (auto [o, l] : old.bits) {
        if (o < new_size) want.bits.emplace_back(o, std::min(l, new_size - o));
      }
      EXPECT_EQ(new_state[name], want) << name;
    }
  } else {
    EXPECT_EQ(new_state["b1"], old_state["b1"]);
    EXPECT_TRUE(new_state["b0"].enabled && !new_state["b0"].in_use);
  }

  int new_seen = 0, in_use_seen = 0;
  for (uint64_t n = 0; n < boundaries; n++) {
    MemEnv mem;
    bool done = false;
    run(static_cast<int64_t>(n), mem, &done);
    const std::string at = testing::CrashPoint(n);
    EXPECT_TRUE(testing::EngineCheckPasses(mem, "/w/img.qcow2")) << at;
    std::vector<std::byte> data;
    Result<State> got = ReadState(mem, &data);
    ASSERT_TRUE(got.ok()) << at << ": " << got.status().ToString();
    // Granules whose data changed: a consistent bitmap must cover them.
    auto covers = [&](const Extents& bits) {
      for (size_t i = 0; i < data.size(); i++) {
        if (data[i] == start[i]) continue;
        bool in = false;
        for (const auto& [o, l] : bits) in = in || (i >= o && i < o + l);
        if (!in) return false;
      }
      return true;
    };
    std::vector<std::string> names, old_names, new_names;
    for (const auto& [k, v] : *got) names.push_back(k);
    for (const auto& [k, v] : old_state) old_names.push_back(k);
    for (const auto& [k, v] : new_state) new_names.push_back(k);
    EXPECT_TRUE(names == old_names || names == new_names)
        << at << ": bitmaps " << fmt::format("{}", fmt::join(names, ","));
    bool is_new = true;
    for (const auto& [name, l] : *got) {
      const Listed* o = old_state.count(name) ? &old_state[name] : nullptr;
      const Listed* w = new_state.count(name) ? &new_state[name] : nullptr;
      if (l.in_use) {
        in_use_seen++;
        EXPECT_TRUE((c.op == Op::kWrites && name == "b0") || IsResize(c.op))
            << at << ": " << name << " in use";
        is_new = false;
        continue;
      }
      EXPECT_TRUE((o && l == *o) || (w && l == *w)) << at << ": bitmap " << name;
      if (!(w && l == *w)) is_new = false;
      if (l.enabled && c.op == Op::kWrites) EXPECT_TRUE(covers(l.bits)) << at << ": " << name;
    }
    if (is_new && names == new_names) new_seen++;
    if (HasFailure()) break;
  }
  EXPECT_GT(new_seen, 0);
  if (c.op != Op::kOps) EXPECT_GT(in_use_seen, 0);
  std::printf("%s: %llu crash points checked, %d with the new bitmaps, %d with b0 in use\n",
              c.name.c_str(), static_cast<unsigned long long>(boundaries), new_seen, in_use_seen);
}

INSTANTIATE_TEST_SUITE_P(
    Bitmaps, BitmapCrashTest,
    ::testing::Values(BitmapCase{"ops_c4k", "-o cluster_size=4k", 4 << 20, Op::kOps, "4k"},
                      BitmapCase{"ops_c512", "-o cluster_size=512", 1 << 20, Op::kOps, "512"},
                      BitmapCase{"writes_c4k", "-o cluster_size=4k", 4 << 20, Op::kWrites, "4k"},
                      BitmapCase{"writes_c64k_extl2", "-o extended_l2=on", 4 << 20, Op::kWrites,
                                 "64k"},
                      BitmapCase{"grow_c512", "-o cluster_size=512", 1 << 20, Op::kGrow, "512"},
                      BitmapCase{"shrink_c64k", "", 4 << 20, Op::kShrink, "64k"}),
    [](const ::testing::TestParamInfo<BitmapCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
