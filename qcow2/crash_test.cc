// Crash safety by fault injection. A seeded workload of writes, write-zeroes,
// discards and flushes runs on an image held in a FaultInjectionEnv; the
// test first counts the write and sync boundaries it crosses, then replays it
// once per boundary with a crash there: that operation and everything after
// it fail, the unsynced changes are dropped, kept at random, or torn per
// sector, and the surviving image must
//   - pass the check with no corruption (leaks are allowed: QEMU's design
//     leaks clusters allocated by writes that never got flushed), and
//   - read back exactly what was acknowledged before the last completed flush
//     (bytes touched after it may hold old or new data).
// Every crash point is checked in process, by the engine's own check
// (qcow2/check, which counts what qemu-img check counts) and a read of the
// whole disk through a fresh read-only open, both on the in-memory files; and
// every kQemuEvery-th point (UQ_CRASH_QEMU_EVERY overrides; 1: all) and the last also by
// QEMU, the independent oracle: `qemu-img check` and `qemu-img convert` of the
// exported image. Checking in process is what lets a run afford longer
// workloads, so more crash points, in the same time.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <sstream>

#include "qcow2/crypto/secret.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/crash_harness.h"

namespace uq::qcow2 {
namespace {

using testing::CrashRun;
using testing::MemEnv;
using testing::MemEnvOptions;
using testing::Op;

struct CrashCase {
  std::string name;
  std::string create;  // qemu-img create options
  uint64_t size;
  bool backing = false;
  bool snapshot = false;
  int ops = 40;
  bool compressed = false;            // start from `qemu-img convert -c` of a patterned raw file
  uint64_t preallocate = 0;           // ImageOptions::preallocate (grow the file ahead)
  uint64_t cache_size = 32ull << 20;  // ImageOptions::cache_size; tiny: write-back mid-workload
  // > 1: I/O completes in a seeded random order (MemEnv's deferred mode) and
  // writes come in batches of this many adjacent ones in flight at once, so
  // allocations take queued writes along (queued_writes.h).
  int concurrency = 1;
  // QEMU's persistent bitmaps on the image (one enabled, one disabled): the
  // open marks them in use before the first write (MarkBitmapsInUse).
  bool bitmaps = false;
  // LUKS: `create` holds the encrypt options; every open takes kPassphrase.
  bool encrypted = false;
  // The device's user-recovery write path (ImageOptions::stable_metadata): clusters come
  // from a reserve whose refcounts are stable first, entries are written before the
  // acknowledgement. Power-loss ordering must hold on it as on the default path.
  bool stable_metadata = false;
};

// The passphrase of the encrypted cases' secret `sec0` (a test key).
constexpr char kPassphrase[] = "crash-test-passphrase";

int PositiveEnv(const char* name, int otherwise) {
  const char* v = std::getenv(name);
  return v != nullptr && std::atoi(v) > 0 ? std::atoi(v) : otherwise;
}
// QEMU checks every this many crash points (and the last one).
constexpr int kQemuEvery = 8;
int QemuEvery() { return PositiveEnv("UQ_CRASH_QEMU_EVERY", kQemuEvery); }
// Each case runs this many times its `ops` (UQ_CRASH_SCALE overrides, for
// soak runs); the longer workload starts with the shorter one's operations.
constexpr int kWorkloadScale = 3;
int WorkloadOps(const CrashCase& c) {
  return c.ops * PositiveEnv("UQ_CRASH_SCALE", kWorkloadScale);
}
std::ostream& operator<<(std::ostream& o, const CrashCase& c) { return o << c.name; }

std::vector<Op> MakeWorkload(const CrashCase& c, uint64_t cluster) {
  std::mt19937_64 rng(std::hash<std::string>()(c.name));
  auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  std::vector<Op> ops;
  if (c.concurrency <= 1) {
    for (int i = 0; i < WorkloadOps(c); i++) {
      Op op;
      uint64_t r = pick(10);
      op.kind = r < 5 ? Op::kWrite : r < 7 ? Op::kZero : r < 8 ? Op::kDiscard : Op::kFlush;
      op.length = 1 + pick(2 * cluster + 700);
      op.offset = pick(c.size - op.length + 1);
      op.pattern = static_cast<uint8_t>(1 + pick(250));
      ops.push_back(op);
    }
  } else {  // runs of adjacent writes in flight together, for queued_writes.h
    for (int i = 0, batch = 0; i < WorkloadOps(c); i++) {
      if (pick(3) == 0) {  // a flush, a zeroing or a discard on its own
        Op op;
        uint64_t r = pick(3);
        op.kind = r == 0 ? Op::kFlush : r == 1 ? Op::kZero : Op::kDiscard;
        op.length = 1 + pick(cluster + 700);
        op.offset = pick(c.size - op.length + 1);
        ops.push_back(op);
        continue;
      }
      // A run of adjacent writes of 512 B to 8 KiB, as a sequential writer's.
      uint64_t at = pick(c.size / 512) * 512;
      for (int k = 0; k < c.concurrency; k++) {
        Op op;
        op.kind = Op::kWrite;
        op.length = std::min<uint64_t>(512 * (1 + pick(16)), c.size - at);
        if (op.length == 0) break;
        op.offset = at;
        op.pattern = static_cast<uint8_t>(1 + pick(250));
        op.batch = batch;
        ops.push_back(op);
        at += op.length;
      }
      batch++;
    }
  }
  ops.push_back(Op{Op::kFlush});
  return ops;
}

class CrashTest : public testing::CrashFixture<CrashCase> {
 protected:
  CrashTest() : CrashFixture("crash-") {}
};

// The model of what the image must hold.
struct Model {
  std::vector<std::byte> current, durable;
  std::vector<bool> unsure;  // touched since the last completed flush
};

TEST_P(CrashTest, EveryCrashPointLeavesAConsistentImage) {
  const CrashCase& c = GetParam();
  // The starting images, made by QEMU.
  if (c.backing) {
    ASSERT_TRUE(testing::MakeBackedImage(*scratch_, c.create, c.size, c.size, c.size / 2));
  } else if (c.compressed) {
    ASSERT_EQ(Sh(fmt::format("qemu-img create -f raw src.raw {}", c.size)), 0);
    ASSERT_EQ(Sh(fmt::format("qemu-io -f raw -c 'write -P 0x3c 0 {}' src.raw", c.size * 3 / 4)), 0);
    ASSERT_EQ(Sh(fmt::format("qemu-img convert -c -O qcow2 {} src.raw img.qcow2", c.create)), 0);
  } else if (c.encrypted) {
    // QEMU's PBKDF2 timing probe needs the preloaded clock (QemuImgForLuks); retried without it.
    ASSERT_EQ(Sh(fmt::format("(for i in $(seq 60); do {} create -f qcow2 --object "
                             "secret,id=sec0,data={} {} img.qcow2 {} && exit 0; done; exit 1)",
                             testing::QemuImgForLuks(), kPassphrase, c.create, c.size)),
              0);
  } else {
    ASSERT_TRUE(testing::MakeImage(*scratch_, c.create, c.size));
  }
  // How qemu-img names an image: with the secret for an encrypted one.
  auto qemu_image = [&](const std::string& file) {
    return c.encrypted ? fmt::format(
                             "--object secret,id=sec0,data={} --image-opts "
                             "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                             kPassphrase, file)
                       : file;
  };
  const std::shared_ptr<const crypto::SecretBytes> key =
      c.encrypted ? std::make_shared<const crypto::SecretBytes>(
                        crypto::SecretBytes::FromString(kPassphrase))
                  : nullptr;
  if (c.bitmaps) {
    ASSERT_EQ(Sh("qemu-img bitmap --add img.qcow2 b0 && "
                 "qemu-img bitmap --add --disable -g 1M img.qcow2 b1"),
              0);
  }
  if (c.snapshot) {
    ASSERT_EQ(
        Sh(fmt::format("qemu-io -c 'write -P 0x21 0 {}' {}", c.size / 2, qemu_image("img.qcow2"))),
        0);
    ASSERT_EQ(Sh("qemu-img snapshot -c before " + qemu_image("img.qcow2")), 0);
  }
  ASSERT_EQ(Sh(fmt::format("qemu-img convert {} -O raw start.raw", qemu_image("img.qcow2"))), 0);
  // An external data file is copied in and out beside the image.
  const bool data_file = Sh("test -e img.data") == 0;
  if (data_file) ASSERT_EQ(Sh("cp img.data img.data.orig"), 0);
  const std::vector<std::byte> start = Slurp("start.raw");
  const uint64_t cluster = testing::ClusterSizeOf(*scratch_, "img.qcow2");
  const bool v3 = c.create.find("compat=0.10") == std::string::npos;
  const std::vector<Op> ops = MakeWorkload(c, cluster);

  // Writes served by TryAnyThread, and writes taken along by an allocation,
  // in the run without a crash.
  uint64_t served_here = 0, taken_along = 0;
  // Runs the workload on a fresh copy of the images; crash_at < 0: no crash.
  const MemEnvOptions mem_options = testing::DeferredIf(c.concurrency > 1, 17);
  // Leaves the images in `mem`; exports them to the scratch directory if
  // `export_files`.
  auto run = [&](int64_t crash_at, Model* model, MemEnv& mem, bool export_files) -> uint64_t {
    EventLoop* loop = c.concurrency > 1 ? &mem : nullptr;
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    if (c.backing) testing::ImportImage(mem, dir_ + "/base.qcow2", "/w/base.qcow2");
    if (data_file) testing::ImportImage(mem, dir_ + "/img.data.orig", "/w/img.data");
    CrashRun crash(&mem, crash_at);
    model->current = model->durable = start;
    model->unsure.assign(start.size(), false);
    auto opened =
        BlockOn(OpenImage("/w/img.qcow2", ImageOptions{.env = &crash.env(),
                                                       .writable = true,
                                                       .cache_size = c.cache_size,
                                                       .preallocate = c.preallocate,
                                                       .stable_metadata = c.stable_metadata,
                                                       .working_dir = "/w",
                                                       .key = key}),
                loop);
    if (opened.ok()) {
      std::unique_ptr<BlockDevice> dev = std::move(*opened);
      for (size_t at = 0; at < ops.size(); at++) {
        const Op& op = ops[at];
        Status st;
        if (op.kind != Op::kFlush) {
          for (uint64_t i = op.offset; i < op.offset + op.length; i++) model->unsure[i] = true;
        }
        if (op.batch >= 0) {
          // The whole batch at once; the model takes each write that succeeded.
          const size_t end = testing::BatchEnd(ops, at);
          for (size_t k = at; k < end; k++) {
            const Op& w = ops[k];
            for (uint64_t i = w.offset; i < w.offset + w.length; i++) model->unsure[i] = true;
          }
          const testing::BatchResults batch = testing::RunBatch(*dev, mem, ops, at, end);
          for (size_t k = at; k < end; k++) {
            if (batch.results[k - at].ok()) {
              std::copy(batch.data[k - at].begin(), batch.data[k - at].end(),
                        model->current.begin() + ops[k].offset);
            } else if (st.ok()) {
              st = batch.results[k - at];
            }
          }
          at = end - 1;
          if (!st.ok()) {
            EXPECT_GE(crash_at, 0) << "unexpected failure without a crash: " << st.ToString();
            break;
          }
          continue;
        }
        switch (op.kind) {
          case Op::kWrite: {
            std::vector<std::byte> data = testing::PatternOf(op);
            // As the device does: published clusters are written in place
            // without the engine (TryAnyThread), the rest by the engine.
            st = testing::WriteAsDevice(*dev, op.offset, data, loop, &served_here);
            if (st.ok()) std::copy(data.begin(), data.end(), model->current.begin() + op.offset);
            break;
          }
          case Op::kZero:
            st = BlockOn(dev->WriteZeroes(op.offset, op.length), loop);
            if (st.ok()) std::fill_n(model->current.begin() + op.offset, op.length, std::byte{0});
            break;
          case Op::kDiscard: {
            st = BlockOn(dev->Discard(op.offset, op.length), loop);
            const auto [s, e] = testing::DiscardedRange(op, cluster, c.size);
            if (st.ok() && v3) {
              for (uint64_t i = s; i < e; i++) model->current[i] = std::byte{0};
            }
            if (st.ok() && !v3) {
              // v2 lets the backing file (or zeros) show through.
              for (uint64_t i = s; i < e; i++)
                model->current[i] = c.backing && i < c.size / 2 ? std::byte{0xb1} : std::byte{0};
            }
            break;
          }
          case Op::kFlush:
            st = BlockOn(dev->Flush(), loop);
            if (st.ok()) {
              model->durable = model->current;
              model->unsure.assign(start.size(), false);
            }
            break;
        }
        if (!st.ok()) {
          EXPECT_GE(crash_at, 0) << "unexpected failure without a crash: " << st.ToString();
          break;
        }
      }
      if (crash_at < 0) {
        taken_along = static_cast<Qcow2Image*>(dev.get())->writes_taken_along();
        EXPECT_TRUE(BlockOn(dev->Close(), loop).ok());
      }
    }
    const uint64_t count = crash.Finish();
    if (export_files) {
      testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
      if (data_file) testing::ExportImage(mem, "/w/img.data", dir_ + "/img.data");
    }
    return count;
  };

  Model model;
  uint64_t boundaries = 0;
  {
    MemEnv mem(mem_options);
    boundaries = run(-1, &model, mem, true);
  }
  ASSERT_GT(boundaries, 10u);
  // The batches are there to cross allocations that take writes along.
  if (c.concurrency > 1) EXPECT_GT(taken_along, 0u);
  const uint64_t written_here = served_here;
  ASSERT_EQ(Sh("qemu-img check " + qemu_image("after.qcow2")), 0);
  if (c.preallocate > 0) {
    // A clean close cuts what was grown ahead back to the image's end.
    std::string out;
    // (One command per Sh(): it redirects only the last command of a list.)
    ASSERT_EQ(Sh("qemu-img check --output=json " + qemu_image("after.qcow2") +
                     " | sed -n 's/.*\"image-end-offset\": "
                     "*\\([0-9]*\\).*/\\1/p'",
                 &out),
              0);
    std::string sizes;
    ASSERT_EQ(Sh("stat -c %s after.qcow2 img.qcow2", &sizes), 0);
    out += sizes;
    std::istringstream in(out);
    uint64_t end = 0, size = 0, size_at_open = 0;
    in >> end >> size >> size_at_open;
    EXPECT_GT(end, 0u) << out;
    // Discards may free the last clusters without shrinking the file, so the
    // bound is the larger of the image's end and the size it started with.
    EXPECT_LE(size, std::max(end, size_at_open)) << "file not cut back after Close(): " << out;
    EXPECT_GE(size, end) << out;
  }

  // The engine's check and a read of the whole disk, on the in-memory files.
  auto check_in_process = [&](MemEnv& mem, const std::string& at) {
    EventLoop* loop = c.concurrency > 1 ? &mem : nullptr;
    ASSERT_TRUE(testing::EngineCheckPasses(mem, "/w/img.qcow2", loop)) << at;
    auto opened = BlockOn(
        OpenImage("/w/img.qcow2", ImageOptions{.env = &mem, .working_dir = "/w", .key = key}),
        loop);
    ASSERT_TRUE(opened.ok()) << at << ": " << opened.status().ToString();
    std::vector<std::byte> got(start.size());
    Status st = BlockOn((*opened)->Read(0, got), loop);
    ASSERT_TRUE(st.ok()) << at << ": " << st.ToString();
    for (uint64_t i = 0; i < got.size(); i++) {
      if (model.unsure[i]) continue;
      ASSERT_EQ(got[i], model.durable[i]) << at << ": flushed byte " << i << " lost";
    }
  };

  const int qemu_every = QemuEvery();
  int checked = 0, by_qemu = 0;
  for (uint64_t n = 0; n < boundaries; n++) {
    const bool qemu = n % qemu_every == 0 || n + 1 == boundaries;
    MemEnv mem(mem_options);
    run(static_cast<int64_t>(n), &model, mem, qemu);
    check_in_process(mem, testing::CrashPoint(n));
    if (HasFatalFailure()) return;
    checked++;
    if (!qemu) continue;
    by_qemu++;
    ASSERT_TRUE(testing::QemuCheckPasses(*scratch_, qemu_image("after.qcow2")))
        << testing::CrashPoint(n);
    std::string out;
    ASSERT_EQ(
        Sh(fmt::format("qemu-img convert {} -O raw after.raw", qemu_image("after.qcow2")), &out), 0)
        << out;
    std::vector<std::byte> got = Slurp("after.raw");
    ASSERT_EQ(got.size(), start.size());
    for (uint64_t i = 0; i < got.size(); i++) {
      if (model.unsure[i]) continue;
      ASSERT_EQ(got[i], model.durable[i])
          << testing::CrashPoint(n) << ": flushed byte " << i << " lost";
    }
  }
  RecordProperty("crash_points", checked);
  std::printf(
      "%s: %d crash points checked (%d also by qemu-img); %llu writes served without the "
      "engine, %llu taken along by an allocation\n",
      c.name.c_str(), checked, by_qemu, static_cast<unsigned long long>(written_here),
      static_cast<unsigned long long>(taken_along));
}

INSTANTIATE_TEST_SUITE_P(
    Workloads, CrashTest,
    ::testing::Values(
        CrashCase{"c64k", "", 4 << 20, false, false, 100},
        CrashCase{"c4k", "-o cluster_size=4k", 1 << 20, false, false, 100},
        CrashCase{"c512_refcount64_growth", "-o cluster_size=512,refcount_bits=64", 1 << 20, false,
                  false, 120},
        CrashCase{"c4k_refcount2", "-o cluster_size=4k,refcount_bits=2", 1 << 20, false, false, 80},
        CrashCase{"c4k_refcount1", "-o cluster_size=4k,refcount_bits=1", 1 << 20, false, false, 60},
        CrashCase{"extl2_backing", "-o cluster_size=16k,extended_l2=on", 2 << 20, true, false, 100},
        CrashCase{"snapshot", "-o cluster_size=4k", 1 << 20, false, true, 100},
        CrashCase{"snapshot_extl2", "-o cluster_size=32k,extended_l2=on", 2 << 20, false, true, 60},
        CrashCase{"v2_backing", "-o compat=0.10,cluster_size=4k", 1 << 20, true, false, 80},
        CrashCase{"compressed_zstd", "-o cluster_size=4k,compression_type=zstd", 1 << 20, false,
                  false, 80, true},
        CrashCase{"data_file", "-o cluster_size=4k,data_file=img.data", 1 << 20, false, false, 60},
        CrashCase{"c2m", "-o cluster_size=2M", 8 << 20, false, false, 40},
        CrashCase{"c4k_preallocate", "-o cluster_size=4k", 2 << 20, false, false, 80, false,
                  64 << 10},
        CrashCase{"compressed_preallocate", "-o cluster_size=4k", 1 << 20, false, false, 60, true,
                  32 << 10},
        CrashCase{"c512_tiny_cache", "-o cluster_size=512", 1 << 20, false, false, 60, false, 0,
                  2048},
        CrashCase{"snapshot_tiny_cache", "-o cluster_size=4k", 1 << 20, false, true, 60, false, 0,
                  16 << 10},
        CrashCase{"c64k_batches", "", 2 << 20, false, false, 24, false, 0, 32ull << 20, 8},
        CrashCase{"extl2_backing_batches", "-o cluster_size=64k,extended_l2=on", 2 << 20, true,
                  false, 24, false, 0, 32ull << 20, 8},
        CrashCase{"bitmaps", "-o cluster_size=4k", 1 << 20, false, true, 60, false, 0, 32ull << 20,
                  1, true},
        CrashCase{"extl2_data_file_batches",
                  "-o cluster_size=64k,extended_l2=on,data_file=img.data", 2 << 20, false, false,
                  24, false, 0, 32ull << 20, 8},
        CrashCase{"luks_c4k",
                  "-o cluster_size=4k,encrypt.format=luks,encrypt.key-secret=sec0,"
                  "encrypt.iter-time=10",
                  1 << 20, false, false, 40, false, 64 << 10, 32ull << 20, 1, false, true},
        CrashCase{"luks_extl2_cbc",
                  "-o cluster_size=16k,extended_l2=on,encrypt.format=luks,encrypt.key-secret=sec0,"
                  "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
                  "encrypt.ivgen-hash-alg=sha256,encrypt.iter-time=10",
                  1 << 20, false, true, 40, false, 0, 32ull << 20, 1, false, true},
        CrashCase{"stable_c4k", "-o cluster_size=4k", 1 << 20, false, false, 40, false, 0,
                  32ull << 20, 1, false, false, true},
        CrashCase{"stable_c64k_batches_backing", "", 2 << 20, true, false, 16, false, 0,
                  32ull << 20, 8, false, false, true},
        // Grown ahead: later reserve batches lie inside the file, in
        // fallocated space whose zeros let entries go beside their data.
        CrashCase{"stable_c1k_preallocate_batches", "-o cluster_size=1k", 1 << 20, false, false, 16,
                  false, 256 << 10, 32ull << 20, 4, false, false, true},
        // Zeros copied around a small write are not zeros on disk once
        // encrypted: a new cluster's entry must wait for their sync.
        CrashCase{"stable_luks_c4k_batches",
                  "-o cluster_size=4k,encrypt.format=luks,encrypt.key-secret=sec0,"
                  "encrypt.iter-time=10",
                  1 << 20, false, false, 24, false, 0, 32ull << 20, 8, false, true, true}),
    [](const ::testing::TestParamInfo<CrashCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
