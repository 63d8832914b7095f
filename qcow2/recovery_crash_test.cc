// Crash tests for stable metadata (ImageOptions::stable_metadata), the write
// path of a ublk device with user recovery: when the daemon dies, the host
// file keeps every write issued so far but the engine's caches are lost, and
// the next daemon must still read back every write it acknowledged.
//
// A seeded workload of writes (alone, and in batches in flight together),
// write-zeroes, discards and a few flushes runs on an image held in a
// FaultInjectionEnv; the test counts the write and sync boundaries it
// crosses, then replays it once per boundary with a crash there, twice:
//   - process death (CrashMode::kKeepAll: every write that reached the file
//     stays): the image must pass `qemu-img check` (leaks allowed: reserved
//     clusters) and read back every byte of every acknowledged request; only
//     the bytes of the requests that failed at the crash may hold old or new
//     data;
//   - power loss (the three modes in turn): the image must still pass check
//     (an L2 entry on disk naming a cluster whose refcount is not, or one
//     past the end of the file, fails it), and read back, as of the last
//     completed flush, every byte no request touched since.
// The allocating requests take clusters from the reserve and write their L2
// entries without a sync (qcow2_image.h), so both runs cross that path at
// every boundary: a refill, a new L2 table, the entry writes, a flush.
// Without stable metadata the process-death run loses acknowledged
// allocating writes (their L2 entries stay in the cache): checked by
// StableMetadataIsWhatKeepsThem. A clean Close gives the unused reserve back:
// CleanCloseLeaksNothing.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <random>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/crash_harness.h"

namespace uq::qcow2 {
namespace {

using testing::CrashMode;
using testing::FaultInjectionEnv;
using testing::MemEnv;
using testing::Op;

struct RecoveryCase {
  std::string name;
  std::string create;  // qemu-img create options
  uint64_t size;
  bool backing = false;
  int ops = 30;
  int concurrency = 1;  // > 1: batches of adjacent writes, deferred completion
  uint64_t cache_size = 32ull << 20;
  // The workload starts by discarding the prefilled quarter and flushing, on
  // a file system that cannot punch holes: the reserve then hands out freed
  // clusters that still hold old data.
  bool discard_first = false;
  // ImageOptions::preallocate: the file is grown ahead, so later reserve
  // batches lie inside it, in space that reads as zeros.
  uint64_t preallocate = 0;
  // > 0: the workload starts with one write of this many bytes at the
  // middle, which drains the reserve's first batch in a few boundaries.
  uint64_t first_write = 0;
};
std::ostream& operator<<(std::ostream& o, const RecoveryCase& c) { return o << c.name; }

std::vector<Op> MakeWorkload(const RecoveryCase& c, uint64_t cluster) {
  std::mt19937_64 rng(std::hash<std::string>()(c.name));
  auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  std::vector<Op> ops;
  if (c.discard_first) {
    Op discard{Op::kDiscard};
    discard.length = c.size / 4;
    ops.push_back(discard);
    ops.push_back(Op{Op::kFlush});
  }
  if (c.first_write > 0) {
    Op big{Op::kWrite};
    big.length = std::min(c.first_write, c.size / 2);
    big.offset = c.size / 2;
    big.pattern = 0x5a;
    ops.push_back(big);
  }
  for (int i = 0, batch = 0; i < c.ops; i++) {
    uint64_t r = pick(10);
    if (c.concurrency > 1 && r < 6) {
      // A run of adjacent writes of 512 B to 8 KiB in flight at once.
      uint64_t at = pick(c.size / 512) * 512;
      for (int k = 0; k < c.concurrency && at < c.size; k++) {
        Op op{Op::kWrite};
        op.length = std::min<uint64_t>(512 * (1 + pick(16)), c.size - at);
        op.offset = at;
        op.pattern = static_cast<uint8_t>(1 + pick(250));
        op.batch = batch;
        ops.push_back(op);
        at += op.length;
      }
      batch++;
      continue;
    }
    if (pick(8) == 0) {
      ops.push_back(Op{Op::kFlush});
      continue;
    }
    Op op;
    op.kind = r < 7 ? Op::kWrite : r < 9 ? Op::kZero : Op::kDiscard;
    op.length = 1 + pick(2 * cluster + 700);
    if (op.kind != Op::kWrite) op.length = (op.length + 511) / 512 * 512;
    op.length = std::min(op.length, c.size);
    op.offset = pick((c.size - op.length) / 512 + 1) * 512;
    op.pattern = static_cast<uint8_t>(1 + pick(250));
    ops.push_back(op);
  }
  return ops;
}

// What the image must hold after a process crash, and after a power cut.
struct Model {
  std::vector<std::byte> acknowledged;
  std::vector<bool> unsure;        // touched by a request that did not complete
  std::vector<std::byte> flushed;  // `acknowledged` when the last flush completed
  std::vector<bool> since_flush;   // touched by a request started after it
};

class RecoveryCrashTest : public testing::CrashFixture<RecoveryCase> {
 protected:
  RecoveryCrashTest() : CrashFixture("recovery-") {}
  void SetUp() override {
    CrashFixture::SetUp();
    if (HasFatalFailure()) return;
    const RecoveryCase& c = GetParam();
    if (c.backing) {
      ASSERT_TRUE(testing::MakeBackedImage(*scratch_, c.create, c.size, c.size, c.size / 2));
    } else {
      ASSERT_TRUE(testing::MakeImage(*scratch_, c.create, c.size));
      // Some clusters allocated already: overwrites and copy-on-write too.
      ASSERT_EQ(Sh(fmt::format("qemu-io -c 'write -P 0x21 0 {}' img.qcow2", c.size / 4)), 0);
    }
    ASSERT_EQ(Sh("qemu-img convert -O raw img.qcow2 start.raw"), 0);
    start_ = scratch_->Slurp("start.raw");
    cluster_ = testing::ClusterSizeOf(*scratch_, "img.qcow2");
    v3_ = c.create.find("compat=0.10") == std::string::npos;
  }
  // Runs the workload on fresh copies of the images (crash_at < 0: no crash),
  // leaves the image as `mode` makes it in after.qcow2. Returns the number of
  // boundaries crossed.
  uint64_t Run(const std::vector<Op>& ops, bool stable, int64_t crash_at, CrashMode mode,
               Model* model, bool close = false) {
    const RecoveryCase& c = GetParam();
    MemEnv mem(testing::DeferredIf(c.concurrency > 1, 23));
    EventLoop* loop = c.concurrency > 1 ? &mem : nullptr;
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    if (c.backing) testing::ImportImage(mem, dir_ + "/base.qcow2", "/w/base.qcow2");
    testing::CrashRun crash(&mem, crash_at);
    FaultInjectionEnv& env = crash.env();
    if (c.discard_first) {
      env.AddFault(testing::Fault{
          .ops = testing::Fault::kDiscard, .count = testing::Fault::kForever, .error = EOPNOTSUPP});
    }
    model->acknowledged = start_;
    model->unsure.assign(start_.size(), false);
    model->flushed = start_;
    model->since_flush.assign(start_.size(), false);
    auto touch = [&](const Op& op) {
      for (uint64_t i = op.offset; i < op.offset + op.length; i++) model->since_flush[i] = true;
    };
    auto opened = BlockOn(OpenImage("/w/img.qcow2", ImageOptions{.env = &env,
                                                                 .writable = true,
                                                                 .cache_size = c.cache_size,
                                                                 .preallocate = c.preallocate,
                                                                 .stable_metadata = stable,
                                                                 .working_dir = "/w"}),
                          loop);
    auto fail = [&](const Op& op) {
      for (uint64_t i = op.offset; i < op.offset + op.length; i++) model->unsure[i] = true;
    };
    // What a discard makes of the guest bytes it acknowledges.
    auto discarded = [&](const Op& op) {
      const auto [s, e] = testing::DiscardedRange(op, cluster_, c.size);
      for (uint64_t i = s; i < e; i++) {
        model->acknowledged[i] =
            !v3_ && c.backing && i < c.size / 2 ? std::byte{0xb1} : std::byte{0};
      }
    };
    bool stopped = !opened.ok();
    if (opened.ok()) {
      std::unique_ptr<BlockDevice> dev = std::move(*opened);
      for (size_t at = 0; at < ops.size() && !stopped; at++) {
        const Op& op = ops[at];
        if (op.batch >= 0) {
          const size_t end = testing::BatchEnd(ops, at);
          for (size_t k = at; k < end; k++) touch(ops[k]);
          const testing::BatchResults batch = testing::RunBatch(*dev, mem, ops, at, end);
          for (size_t k = at; k < end; k++) {
            if (batch.results[k - at].ok()) {
              std::copy(batch.data[k - at].begin(), batch.data[k - at].end(),
                        model->acknowledged.begin() + ops[k].offset);
            } else {
              fail(ops[k]);
              stopped = true;
            }
          }
          at = end - 1;
          continue;
        }
        Status st;
        touch(op);
        switch (op.kind) {
          case Op::kWrite: {
            std::vector<std::byte> data = testing::PatternOf(op);
            // As the device does: published clusters are written in place.
            st = testing::WriteAsDevice(*dev, op.offset, data, loop);
            if (st.ok())
              std::copy(data.begin(), data.end(), model->acknowledged.begin() + op.offset);
            break;
          }
          case Op::kZero:
            st = BlockOn(dev->WriteZeroes(op.offset, op.length), loop);
            if (st.ok())
              std::fill_n(model->acknowledged.begin() + op.offset, op.length, std::byte{0});
            break;
          case Op::kDiscard:
            st = BlockOn(dev->Discard(op.offset, op.length), loop);
            if (st.ok()) discarded(op);
            break;
          case Op::kFlush:
            st = BlockOn(dev->Flush(), loop);
            if (st.ok()) {
              model->flushed = model->acknowledged;
              model->since_flush.assign(start_.size(), false);
            }
            break;
        }
        if (!st.ok()) {
          fail(op);
          stopped = true;
        }
      }
      // No Close() unless asked: the process dies with whatever is in the caches.
      if (close && !stopped) EXPECT_TRUE(BlockOn(dev->Close(), loop).ok());
      while (env.in_flight() > 0 && mem.Poll()) {
      }
      if (crash_at < 0) {
        EXPECT_FALSE(stopped) << "a request failed without a crash";
        crash.Die();  // now, after the last request
      }
    }
    const uint64_t count = crash.Finish(mode);
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
    return count;
  }

  // After a process crash: consistent, and every acknowledged byte there.
  // Returns the first lost byte's offset, or -1.
  int64_t CheckKept(const Model& model, const std::string& what) {
    EXPECT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2")) << what;
    std::string out;
    EXPECT_EQ(Sh("qemu-img convert -O raw after.qcow2 after.raw", &out), 0) << what << out;
    std::vector<std::byte> got = scratch_->Slurp("after.raw");
    EXPECT_EQ(got.size(), start_.size());
    for (uint64_t i = 0; i < got.size() && i < model.acknowledged.size(); i++) {
      if (!model.unsure[i] && got[i] != model.acknowledged[i]) return static_cast<int64_t>(i);
    }
    return -1;
  }

  // After a power cut: consistent, and what the last flush covered there.
  // Returns the first lost byte's offset, or -1.
  int64_t CheckFlushed(const Model& model, const std::string& what) {
    const ::testing::AssertionResult consistent =
        testing::QemuCheckPasses(*scratch_, "after.qcow2");
    EXPECT_TRUE(consistent) << what;
    if (!consistent) return 0;
    std::string out;
    EXPECT_EQ(Sh("qemu-img convert -O raw after.qcow2 after.raw", &out), 0) << what << out;
    std::vector<std::byte> got = scratch_->Slurp("after.raw");
    EXPECT_EQ(got.size(), start_.size());
    for (uint64_t i = 0; i < got.size() && i < model.flushed.size(); i++) {
      if (!model.since_flush[i] && got[i] != model.flushed[i]) return static_cast<int64_t>(i);
    }
    return -1;
  }

  std::vector<std::byte> start_;
  uint64_t cluster_ = 0;
  bool v3_ = true;
};

TEST_P(RecoveryCrashTest, NothingAcknowledgedIsLostAtAnyPoint) {
  const std::vector<Op> ops = MakeWorkload(GetParam(), cluster_);
  Model model;
  const uint64_t boundaries = Run(ops, true, -1, CrashMode::kKeepAll, &model);
  ASSERT_GT(boundaries, 10u);
  ASSERT_EQ(CheckKept(model, "process death after the last request"), -1);
  int checked = 0;
  for (uint64_t n = 0; n < boundaries; n++) {
    const std::string what = fmt::format("process death at boundary {}", n);
    Run(ops, true, static_cast<int64_t>(n), CrashMode::kKeepAll, &model);
    const int64_t lost = CheckKept(model, what);
    ASSERT_EQ(lost, -1) << what << ": acknowledged byte " << lost << " lost";
    // Power loss at the same point: consistent, and the flushed writes kept.
    const std::string cut = fmt::format("power loss at boundary {} (mode {})", n, n % 3);
    Run(ops, true, static_cast<int64_t>(n), static_cast<CrashMode>(n % 3), &model);
    const int64_t unflushed = CheckFlushed(model, cut);
    ASSERT_EQ(unflushed, -1) << cut << ": flushed byte " << unflushed << " lost";
    checked++;
  }
  RecordProperty("crash_points", checked);
  std::printf("%s: %d crash points, each as process death and as power loss\n",
              GetParam().name.c_str(), checked);
}

// The test above would catch a missing flush: without stable metadata a
// process death after the last request loses acknowledged writes.
TEST_P(RecoveryCrashTest, StableMetadataIsWhatKeepsThem) {
  std::vector<Op> ops = MakeWorkload(GetParam(), cluster_);
  // Without the flushes, which would put some of the metadata on disk.
  std::erase_if(ops, [](const Op& op) { return op.kind == Op::kFlush; });
  Model model;
  Run(ops, false, -1, CrashMode::kKeepAll, &model);
  EXPECT_NE(CheckKept(model, "without stable metadata"), -1)
      << "every acknowledged write survived without stable metadata: the workload allocates "
         "nothing?";
}

// A clean Close releases the clusters reserved and never used: no leak.
TEST_P(RecoveryCrashTest, CleanCloseLeaksNothing) {
  const std::vector<Op> ops = MakeWorkload(GetParam(), cluster_);
  Model model;
  Run(ops, true, -1, CrashMode::kKeepAll, &model, /*close=*/true);
  std::string out;
  EXPECT_EQ(Sh("qemu-img check after.qcow2", &out), 0) << out;
  EXPECT_EQ(CheckKept(model, "after Close"), -1);
}

INSTANTIATE_TEST_SUITE_P(
    Workloads, RecoveryCrashTest,
    ::testing::Values(
        RecoveryCase{"c64k", "", 4 << 20},
        RecoveryCase{"c4k_backing", "-o cluster_size=4k", 1 << 20, true},
        RecoveryCase{"c512_refcount_growth", "-o cluster_size=512", 1 << 20},
        RecoveryCase{"extl2_backing", "-o cluster_size=16k,extended_l2=on", 2 << 20, true},
        RecoveryCase{"v2_backing", "-o compat=0.10,cluster_size=4k", 1 << 20, true},
        RecoveryCase{"c512_tiny_cache", "-o cluster_size=512", 1 << 20, false, 30, 1, 2048},
        RecoveryCase{"c64k_batches", "", 2 << 20, false, 16, 8},
        RecoveryCase{"c4k_reused_clusters", "-o cluster_size=4k", 1 << 20, false, 30, 4,
                     32ull << 20, true},
        // Grown ahead: the reserve's later batches lie inside the file, in
        // space that reads as zeros, and have their entries written beside
        // their data.
        RecoveryCase{"c512_preallocate", "-o cluster_size=512", 1 << 20, false, 12, 4, 32ull << 20,
                     false, 256 << 10, 136 << 10}),
    [](const ::testing::TestParamInfo<RecoveryCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
