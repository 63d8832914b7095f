// Crash safety of Qcow2Image::CreateSnapshot, DeleteSnapshot and
// ApplySnapshot by fault injection, as resize_crash_test.cc does for Resize.
// A QEMU-made image (written, snapshotted by qemu-img, written again) is
// opened in a FaultInjectionEnv; data is written and flushed, the snapshot
// operation runs, the image is closed. The run is replayed with a crash at
// every write and sync boundary (each of the three CrashModes in turn), and
// the surviving image must
//   - pass the engine's check (CheckImage) and `qemu-img check` with no
//     error: leaks are allowed, nothing else. In particular no COPIED flag
//     out of step with its refcount, which QEMU's own snapshot code leaves
//     when a crash falls between its refcount and L2 writes (create and
//     delete switch the tables, refcounts included, in one header write);
//   - list the old or the new snapshots (names and ids), never a mix;
//   - read, once the flush before the operation has completed, as the
//     active layer did before (create, delete) or as either that or the
//     snapshot applied (apply, with its size), and read every snapshot it
//     lists as that snapshot read before.
// The number of crash points of each case is printed.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "qcow2/check/check.h"
#include "qcow2/format.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/crash_harness.h"

namespace uq::qcow2 {
namespace {

using testing::CrashRun;
using testing::MemEnv;
using testing::Write;

enum class Op { kCreate, kDelete, kApply };

struct SnapshotCase {
  std::string name;
  std::string create;  // qemu-img create options
  uint64_t size;
  Op op;
  uint64_t cluster_size;
  std::string setup;  // extra qemu-io commands before the snapshots (compressed writes...)
};
std::ostream& operator<<(std::ostream& o, const SnapshotCase& c) { return o << c.name; }

class SnapshotCrashTest : public testing::CrashFixture<SnapshotCase> {
 protected:
  SnapshotCrashTest() : CrashFixture("snapshot-crash-") {}
};

// The writes of our run, before the operation (flushed).
std::vector<Write> Writes(const SnapshotCase& c) {
  return {{4096, 6000, 0x41}, {c.size / 2 + 512, 70000, 0x42}, {c.size - 5000, 5000, 0x43}};
}

// What the engine's check found that a crash may leave; an empty string
// when acceptable (leaks only), else why not.
std::string JudgeCheck(const CheckResult& r) {
  if (!r.error.empty()) return "check failed: " + r.error;
  if (r.check_errors != 0) return "check errors";
  if (r.corruptions != 0) return fmt::format("{} corruptions", r.corruptions);
  for (const std::string& line : r.messages) {
    if (line.rfind("ERROR", 0) == 0) return "corruption: " + line;
  }
  return "";
}

TEST_P(SnapshotCrashTest, EveryCrashPointLeavesTheOldOrTheNewState) {
  const SnapshotCase& c = GetParam();
  ASSERT_TRUE(testing::MakeImage(*scratch_, c.create, c.size));
  ASSERT_EQ(Sh(fmt::format("qemu-io -c 'write -P 0x11 0 {}' -c 'write -P 0x12 {} 8192' {} "
                           "img.qcow2",
                           c.size / 2, c.size - 16384, c.setup)),
            0);
  ASSERT_EQ(Sh("qemu-img snapshot -c a img.qcow2"), 0);
  ASSERT_EQ(Sh(fmt::format("qemu-io -c 'write -P 0x21 0 8192' -c 'write -z {} 65536' img.qcow2",
                           c.size / 4)),
            0);
  ASSERT_EQ(Sh("qemu-img snapshot -c b img.qcow2"), 0);
  // The views every state must match: the snapshots, the active layer
  // after our writes (what create and delete keep, and apply's old state).
  ASSERT_EQ(Sh("qemu-img convert -l snapshot.name=a -O raw img.qcow2 a.raw"), 0);
  ASSERT_EQ(Sh("qemu-img convert -l snapshot.name=b -O raw img.qcow2 b.raw"), 0);
  ASSERT_EQ(Sh("qemu-img convert -O raw img.qcow2 start.raw"), 0);
  std::map<std::string, std::vector<std::byte>> views;
  views["a"] = scratch_->Slurp("a.raw");
  views["b"] = scratch_->Slurp("b.raw");
  std::vector<std::byte> active = scratch_->Slurp("start.raw");
  testing::ApplyWrites(active, Writes(c));
  views["new"] = active;  // what a created snapshot holds
  const std::vector<std::string> old_list = {"a", "b"};
  std::vector<std::string> new_list = old_list;
  if (c.op == Op::kCreate) new_list.push_back("new");
  if (c.op == Op::kDelete) new_list = {"b"};  // a is deleted
  const std::vector<std::byte>* new_active = &active;
  if (c.op == Op::kApply) new_active = &views["a"];

  uint64_t flushed_at = 0;
  auto run = [&](int64_t crash_at, MemEnv& mem, bool* done) -> uint64_t {
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    CrashRun crash(&mem, crash_at);
    *done = false;
    auto opened = testing::OpenWritableImage(crash.env());
    if (opened.ok()) {
      std::unique_ptr<BlockDevice> dev = std::move(*opened);
      auto* image = dynamic_cast<Qcow2Image*>(dev.get());
      EXPECT_NE(image, nullptr);
      Status st = testing::WriteAndFlush(*dev, Writes(c));
      if (crash_at < 0) flushed_at = crash.env().operation_count();
      if (st.ok()) {
        switch (c.op) {
          case Op::kCreate: {
            Snapshot entry;
            entry.name = "new";
            entry.icount = 0;
            st = BlockOn(image->CreateSnapshot(entry)).status();
            break;
          }
          case Op::kDelete:
            st = BlockOn(image->DeleteSnapshot(0));
            break;
          case Op::kApply:
            st = BlockOn(image->ApplySnapshot(0));
            break;
        }
      }
      *done = st.ok();
      if (st.ok()) st = BlockOn(dev->Close());
      if (crash_at < 0) EXPECT_TRUE(st.ok()) << st.ToString();
    }
    const uint64_t count = crash.Finish();
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
    return count;
  };

  // Checks the image in `mem` after a run; returns whether it shows the new
  // snapshot list.
  auto judge = [&](MemEnv& mem, const std::string& at, bool data_flushed) -> bool {
    bool is_new = false;
    {
      Result<CheckResult> r = testing::CheckInMemory(mem, "/w/img.qcow2");
      EXPECT_TRUE(r.ok()) << at << ": " << r.status().ToString();
      if (!r.ok()) return false;
      EXPECT_EQ(JudgeCheck(*r), "") << at << "\n" << testing::CheckMessages(*r);
    }
    auto opened = BlockOn(OpenImage("/w/img.qcow2", ImageOptions{.env = &mem, .lock = false}));
    EXPECT_TRUE(opened.ok()) << at << ": " << opened.status().ToString();
    if (!opened.ok()) return false;
    auto* image = dynamic_cast<Qcow2Image*>(opened->get());
    std::vector<std::string> names;
    for (const Snapshot& s : image->snapshots()) names.push_back(s.name);
    EXPECT_TRUE(names == old_list || names == new_list)
        << at << ": snapshots " << fmt::format("{}", fmt::join(names, ","));
    is_new = names == new_list && names != old_list;
    // Snapshot ids stay with their names.
    for (const Snapshot& s : image->snapshots()) {
      if (s.name == "a") EXPECT_EQ(s.id, "1") << at;
      if (s.name == "b") EXPECT_EQ(s.id, "2") << at;
      if (s.name == "new") EXPECT_EQ(s.id, "3") << at;
    }
    (void)BlockOn((*opened)->Close());
    std::string out;
    EXPECT_EQ(Sh("qemu-img convert -O raw after.qcow2 after.raw", &out), 0) << at << out;
    const std::vector<std::byte> got = scratch_->Slurp("after.raw");
    if (data_flushed) {
      EXPECT_TRUE(got == active || (c.op == Op::kApply && got == *new_active))
          << at << ": the active layer reads neither the old nor the new state";
    }
    // Apply keeps the list: its new state is the snapshot's data.
    if (c.op == Op::kApply) is_new = got == *new_active;
    for (const std::string& name : names) {
      EXPECT_EQ(
          Sh(fmt::format("qemu-img convert -l snapshot.name={} -O raw after.qcow2 s.raw", name),
             &out),
          0)
          << at << out;
      if (name == "new" && !data_flushed) continue;
      EXPECT_TRUE(scratch_->Slurp("s.raw") == views[name]) << at << ": snapshot " << name;
    }
    // 0: clean, 3: leaked clusters only.
    const int qemu_check = Sh("qemu-img check after.qcow2", &out);
    EXPECT_TRUE(qemu_check == 0 || qemu_check == 3) << at << ": qemu-img check\n" << out;
    return is_new;
  };

  bool done = false;
  uint64_t boundaries;
  {
    MemEnv mem;
    boundaries = run(-1, mem, &done);
    ASSERT_TRUE(done);
    ASSERT_TRUE(judge(mem, "no crash", true));
  }
  ASSERT_GT(boundaries, flushed_at);
  int new_seen = 0;
  // Crashes during our writes before the operation are crash_test's
  // business; every boundary from the flush's last one on is checked.
  for (uint64_t n = flushed_at - 1; n < boundaries; n++) {
    MemEnv mem;
    run(static_cast<int64_t>(n), mem, &done);
    const std::string at = testing::CrashPoint(n);
    if (judge(mem, at, n >= flushed_at)) new_seen++;
    if (HasFailure()) break;
  }
  EXPECT_GT(new_seen, 0);
  std::printf(
      "%s: %llu crash points checked (every boundary of the operation), %d with the new "
      "list\n",
      c.name.c_str(), static_cast<unsigned long long>(boundaries - flushed_at + 1), new_seen);
}

INSTANTIATE_TEST_SUITE_P(
    Snapshots, SnapshotCrashTest,
    ::testing::Values(
        SnapshotCase{"create_c512", "-o cluster_size=512", 1 << 20, Op::kCreate, 512},
        SnapshotCase{"create_extl2_compressed", "-o cluster_size=16k,extended_l2=on", 1 << 20,
                     Op::kCreate, 16384, "-c 'write -c -P 0x13 786432 65536'"},
        SnapshotCase{"delete_c4k_refcount64", "-o cluster_size=4k,refcount_bits=64", 1 << 20,
                     Op::kDelete, 4096, "-c 'write -c -P 0x13 786432 65536'"},
        SnapshotCase{"delete_c512", "-o cluster_size=512", 1 << 20, Op::kDelete, 512},
        SnapshotCase{"create_c2m_refcount8", "-o cluster_size=2M,refcount_bits=8", 16 << 20,
                     Op::kCreate, 2 << 20},
        SnapshotCase{"delete_extl2_c16k", "-o cluster_size=16k,extended_l2=on", 1 << 20,
                     Op::kDelete, 16384, "-c 'write -c -P 0x13 786432 65536'"},
        SnapshotCase{"apply_c4k", "-o cluster_size=4k", 1 << 20, Op::kApply, 4096,
                     "-c 'write -c -P 0x13 786432 65536'"},
        SnapshotCase{"apply_c512_v2", "-o cluster_size=512,compat=0.10", 1 << 20, Op::kApply, 512}),
    [](const ::testing::TestParamInfo<SnapshotCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
