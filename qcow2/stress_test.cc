// A randomized model test of the whole write path under concurrency: batches
// of writes, write-zeroes, discards, compressed writes, reads and flushes in
// flight together, completing in a seeded random order (MemEnv's deferred
// mode), some served without the engine (TryAnyThread), on images QEMU made
// in the shapes the engine treats differently (tiny and large clusters,
// extended L2, backing files, clusters shared with an internal snapshot,
// compressed clusters, external data files, narrow and wide refcounts, v2).
//
// Ranges within a batch never overlap, so the result is defined, but they
// crowd a few clusters, so allocations, copy-on-write, queued writes taken
// along, subcluster locks and revocations all meet. QEMU is the oracle at
// both ends: the model starts as `qemu-img convert -O raw` of the image, and
// at the end the image must pass `qemu-img check` with no corruption and no
// leak and convert to exactly the model.
//
// By hand: STRESS_SEEDS=N and STRESS_BATCHES=N for a longer soak,
// STRESS_TRACE=1 prints every batch's ops, STRESS_CHECK_EACH=1 compares the
// whole image with the model after every batch (finds the first bad batch).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

using testing::MemEnv;
using testing::MemEnvOptions;

struct StressCase {
  std::string name;
  std::string create;  // qemu-img create -o options of the image under test
  uint64_t size;
  bool backing = false;     // over a base image of random data
  bool snapshot = false;    // an internal snapshot after the prefill (shared clusters)
  bool compressed = false;  // prefill with compressed clusters (qemu-img convert -c)
  std::string data_file;    // the external data file's name, if any
  uint64_t cache_size = 32ull << 20;
  uint64_t preallocate = 0;
};
std::ostream& operator<<(std::ostream& o, const StressCase& c) { return o << c.name; }

struct Op {
  enum Kind { kRead, kWrite, kZero, kDiscard, kCompressed, kFlush } kind;
  uint64_t offset = 0, length = 0;
  bool any_thread = false;  // try TryAnyThread first (reads and writes)
};

const char* KindName(Op::Kind k) {
  switch (k) {
    case Op::kRead:
      return "read";
    case Op::kWrite:
      return "write";
    case Op::kZero:
      return "zero";
    case Op::kDiscard:
      return "discard";
    case Op::kCompressed:
      return "compressed write";
    case Op::kFlush:
      return "flush";
  }
  return "?";
}

uint64_t EnvNumber(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::strtoull(v, nullptr, 10) : fallback;
}

class StressTest : public ::testing::TestWithParam<StressCase> {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>("stress-" + GetParam().name);
    ASSERT_TRUE(scratch_->ok());
  }
  int Sh(const std::string& cmd, std::string* out = nullptr) { return scratch_->Sh(cmd, out); }

  // Random bytes, seeded.
  static std::vector<std::byte> RandomBytes(uint64_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::byte> bytes(n);
    for (auto& b : bytes) b = std::byte(rng());
    return bytes;
  }

  // Makes img.qcow2 (and base.qcow2 / the data file) as the case says.
  void MakeImages() {
    const StressCase& c = GetParam();
    std::string out;
    const std::string opts = c.create.empty() ? "" : "-o " + c.create;
    // Every other 16 KiB holds random data, the rest zeros: allocated and
    // unallocated clusters side by side whatever the cluster size.
    std::vector<std::byte> prefill = RandomBytes(c.size, 7);
    for (uint64_t at = 16384; at < c.size; at += 32768) {
      std::fill_n(prefill.begin() + at, std::min<uint64_t>(16384, c.size - at), std::byte{0});
    }
    scratch_->Spit("prefill.raw", prefill);
    if (c.backing) {
      scratch_->Spit("base.raw", RandomBytes(c.size, 11));
      ASSERT_EQ(Sh("qemu-img convert -f raw -O qcow2 base.raw base.qcow2", &out), 0) << out;
      ASSERT_EQ(
          Sh(fmt::format("qemu-img create -q -f qcow2 {} -b base.qcow2 -F qcow2 img.qcow2", opts),
             &out),
          0)
          << out;
      // Some clusters of our own over the base.
      ASSERT_EQ(Sh("qemu-io -f qcow2 -c 'write -P 0x3c 8k 20k' -c 'write -z 64k 64k' "
                   "-c 'write -P 0x4d 200k 3k' img.qcow2",
                   &out),
                0)
          << out;
    } else {
      ASSERT_EQ(Sh(fmt::format("qemu-img convert -f raw -O qcow2 {} {} prefill.raw img.qcow2",
                               c.compressed ? "-c" : "", opts),
                   &out),
                0)
          << out;
    }
    if (c.snapshot) {
      ASSERT_EQ(Sh("qemu-img snapshot -c s1 img.qcow2", &out), 0) << out;
    }
    ASSERT_EQ(Sh("qemu-img convert -O raw img.qcow2 start.raw", &out), 0) << out;
  }

  // A batch of ops with pairwise disjoint ranges in a window of a few
  // clusters (flushes have none).
  std::vector<Op> MakeBatch(std::mt19937_64& rng, uint64_t cluster, bool can_compress) {
    const StressCase& c = GetParam();
    auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
    const uint64_t window = std::min<uint64_t>(c.size, 6 * cluster + 4096);
    const uint64_t window_start = pick((c.size - window) / 512 + 1) * 512;
    std::vector<std::pair<uint64_t, uint64_t>> taken;
    auto free_range = [&](uint64_t at, uint64_t len) {
      for (auto [a, b] : taken) {
        if (at < b && a < at + len) return false;
      }
      return true;
    };
    std::vector<Op> ops;
    const int count = 1 + static_cast<int>(pick(16));
    for (int i = 0; i < count; i++) {
      Op op;
      const uint64_t r = pick(100);
      op.kind = r < 40   ? Op::kWrite
                : r < 62 ? Op::kRead
                : r < 74 ? Op::kZero
                : r < 84 ? Op::kDiscard
                : r < 92 ? Op::kCompressed
                         : Op::kFlush;
      if (op.kind == Op::kCompressed && !can_compress) op.kind = Op::kWrite;
      if (op.kind == Op::kFlush) {
        ops.push_back(op);
        continue;
      }
      if (op.kind == Op::kCompressed) {
        op.offset = (window_start + pick(window)) / cluster * cluster;
        op.length = std::min(cluster, c.size - op.offset);
      } else {
        // Sector-aligned like a block device's requests, or any bytes.
        const bool aligned = pick(3) != 0;
        const uint64_t max_len = std::min<uint64_t>(window, 2 * cluster + 1024);
        op.length = 1 + pick(max_len);
        op.offset = window_start + pick(window - std::min(window, op.length) + 1);
        if (aligned) {
          op.offset &= ~uint64_t{511};
          op.length = std::max<uint64_t>(512, op.length & ~uint64_t{511});
        }
        op.length = std::min(op.length, c.size - op.offset);
        if (op.length == 0) continue;
        op.any_thread = pick(2) == 0;
      }
      if (!free_range(op.offset, op.length)) continue;
      taken.emplace_back(op.offset, op.offset + op.length);
      ops.push_back(op);
    }
    return ops;
  }

  std::unique_ptr<testing::ScratchDir> scratch_;
};

TEST_P(StressTest, ConcurrentMixedOpsMatchQemu) {
  const StressCase& c = GetParam();
  MakeImages();
  if (HasFatalFailure()) return;
  std::vector<std::byte> base;
  if (c.backing) base = scratch_->Slurp("base.raw");
  std::vector<std::byte> model = scratch_->Slurp("start.raw");
  // Version 2 has no zero flag: a discarded cluster shows the backing file.
  const bool v2 = c.create.find("compat=0.10") != std::string::npos;
  ASSERT_EQ(model.size(), c.size);

  // STRESS_SEEDS / STRESS_BATCHES: a longer soak by hand (defaults: CI's run).
  const uint64_t seeds = EnvNumber("STRESS_SEEDS", 3);
  const int batches = static_cast<int>(EnvNumber("STRESS_BATCHES", 150));
  for (uint64_t seed = 1; seed <= seeds; seed++) {
    SCOPED_TRACE(fmt::format("seed {}", seed));
    MemEnv mem(MemEnvOptions{.completion = MemEnvOptions::Completion::kDeferred,
                             .seed = seed,
                             .max_completions_per_poll = 1 + seed % 4});
    // Each seed goes on from the image the previous one left.
    ASSERT_TRUE(mem.ImportFromHostFile(scratch_->path("img.qcow2"), "/w/img.qcow2").ok());
    if (c.backing) {
      ASSERT_TRUE(mem.ImportFromHostFile(scratch_->path("base.qcow2"), "/w/base.qcow2").ok());
    }
    if (!c.data_file.empty()) {
      ASSERT_TRUE(mem.ImportFromHostFile(scratch_->path(c.data_file), "/w/" + c.data_file).ok());
    }
    auto opened = BlockOn(OpenImage("/w/img.qcow2", ImageOptions{.env = &mem,
                                                                 .writable = true,
                                                                 .cache_size = c.cache_size,
                                                                 .preallocate = c.preallocate,
                                                                 .working_dir = "/w"}),
                          &mem);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    std::unique_ptr<BlockDevice> dev = std::move(*opened);
    auto* img = static_cast<Qcow2Image*>(dev.get());
    const uint64_t cluster = img->geometry().cluster_size;
    const bool can_compress = c.data_file.empty();

    std::mt19937_64 rng(seed * 1000 + std::hash<std::string>()(c.name));
    std::map<std::string, int> tally;  // what ran, printed at the end
    for (int batch = 0; batch < batches; batch++) {
      std::vector<Op> ops = MakeBatch(rng, cluster, can_compress);
      std::vector<std::vector<std::byte>> buffers(ops.size());
      std::vector<Status> results(ops.size());
      int outstanding = 0;
      for (size_t i = 0; i < ops.size(); i++) {
        const Op& op = ops[i];
        std::vector<std::byte>& buf = buffers[i];
        std::optional<Task<Status>> task;
        switch (op.kind) {
          case Op::kRead:
            buf.resize(op.length);
            if (op.any_thread) task = dev->TryAnyThread(false, op.offset, buf);
            tally[task ? "reads off the engine" : "reads"]++;
            if (!task) task = dev->Read(op.offset, buf);
            break;
          case Op::kWrite:
          case Op::kCompressed: {
            buf = RandomBytes(op.length, rng());
            if (op.kind == Op::kCompressed) {
              // Compressible: runs of a byte, with some noise.
              for (uint64_t k = 0; k < buf.size(); k++) {
                if (k % 97 != 0) buf[k] = std::byte(k / 1024);
              }
              task = img->WriteCompressed(op.offset, buf);
              tally["compressed writes"]++;
            } else {
              if (op.any_thread) task = dev->TryAnyThread(true, op.offset, buf);
              tally[task ? "writes off the engine" : "writes"]++;
              if (!task) task = dev->Write(op.offset, buf, false);
            }
            break;
          }
          case Op::kZero:
            tally["write-zeroes"]++;
            task = dev->WriteZeroes(op.offset, op.length);
            break;
          case Op::kDiscard:
            tally["discards"]++;
            task = dev->Discard(op.offset, op.length);
            break;
          case Op::kFlush:
            tally["flushes"]++;
            task = dev->Flush();
            break;
        }
        outstanding++;
        Spawn([](Task<Status> t, Status* out, int* left) -> Task<void> {
          *out = co_await std::move(t);
          --*left;
        }(std::move(*task), &results[i], &outstanding));
      }
      if (std::getenv("STRESS_TRACE")) {
        for (size_t i = 0; i < ops.size(); i++) {
          std::fprintf(stderr, "batch %d op %zu: %s %lu+%lu%s\n", batch, i, KindName(ops[i].kind),
                       ops[i].offset, ops[i].length, ops[i].any_thread ? " any" : "");
        }
      }
      while (mem.Poll()) {
      }
      ASSERT_EQ(outstanding, 0) << "batch " << batch << " never completed";
      for (size_t i = 0; i < ops.size(); i++) {
        const Op& op = ops[i];
        const std::string what = fmt::format("batch {} op {}: {} of {} at {}", batch, i,
                                             KindName(op.kind), op.length, op.offset);
        ASSERT_TRUE(results[i].ok()) << what << ": " << results[i].ToString();
        auto at = model.begin() + op.offset;
        switch (op.kind) {
          case Op::kRead:
            // Nothing in the batch wrote these bytes: the model before it holds.
            if (!std::equal(buffers[i].begin(), buffers[i].end(), at)) {
              auto diff = std::mismatch(buffers[i].begin(), buffers[i].end(), at);
              const uint64_t k = diff.first - buffers[i].begin();
              FAIL() << what << ": first wrong byte at " << op.offset + k << ": read "
                     << int(*diff.first) << ", want " << int(*diff.second)
                     << (base.empty() ? "" : fmt::format(" (base {})", int(base[op.offset + k])));
            }
            break;
          case Op::kWrite:
          case Op::kCompressed:
            std::copy(buffers[i].begin(), buffers[i].end(), at);
            break;
          case Op::kZero:
            std::fill_n(at, op.length, std::byte{0});
            break;
          case Op::kDiscard: {
            // Advisory: each byte now reads as before, as zero, or (v2,
            // whose discarded clusters let the backing file show) as the base.
            std::vector<std::byte> now(op.length);
            ASSERT_TRUE(BlockOn(dev->Read(op.offset, now), &mem).ok()) << what;
            for (uint64_t k = 0; k < op.length; k++) {
              const std::byte b = now[k];
              const bool ok = b == at[k] || b == std::byte{0} ||
                              (v2 && !base.empty() && b == base[op.offset + k]);
              ASSERT_TRUE(ok) << what << ": byte " << k;
            }
            std::copy(now.begin(), now.end(), at);
            break;
          }
          case Op::kFlush:
            break;
        }
      }
      if (std::getenv("STRESS_CHECK_EACH")) {
        std::vector<std::byte> now(c.size);
        ASSERT_TRUE(BlockOn(dev->Read(0, now), &mem).ok());
        if (now != model) {
          auto diff = std::mismatch(now.begin(), now.end(), model.begin());
          FAIL() << "after batch " << batch << ": first wrong byte at " << diff.first - now.begin()
                 << ": " << int(*diff.first) << " want " << int(*diff.second);
        }
      }
    }
    std::string summary;
    for (const auto& [what, n] : tally)
      summary += fmt::format("{}{} {}", summary.empty() ? "" : ", ", n, what);
    std::printf("%s seed %lu: %s\n", c.name.c_str(), seed, summary.c_str());
    std::vector<std::byte> all(c.size);
    ASSERT_TRUE(BlockOn(dev->Read(0, all), &mem).ok());
    if (all != model) {
      auto diff = std::mismatch(all.begin(), all.end(), model.begin());
      ADD_FAILURE() << "first wrong byte at " << diff.first - all.begin();
    }
    ASSERT_TRUE(all == model) << "read back after the run";
    Status closed = BlockOn(dev->Close(), &mem);
    ASSERT_TRUE(closed.ok()) << closed.ToString();
    dev.reset();
    ASSERT_TRUE(mem.ExportToHostFile("/w/img.qcow2", scratch_->path("img.qcow2")).ok());
    if (!c.data_file.empty()) {
      ASSERT_TRUE(mem.ExportToHostFile("/w/" + c.data_file, scratch_->path(c.data_file)).ok());
    }
    std::string out;
    ASSERT_EQ(Sh("qemu-img check img.qcow2", &out), 0) << out;
    ASSERT_EQ(Sh("qemu-img convert -O raw img.qcow2 end.raw", &out), 0) << out;
    ASSERT_TRUE(scratch_->Slurp("end.raw") == model) << "qemu-img reads other bytes";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Images, StressTest,
    ::testing::Values(
        StressCase{.name = "c512", .create = "cluster_size=512", .size = 256 << 10},
        StressCase{.name = "c4k_tiny_cache",
                   .create = "cluster_size=4k",
                   .size = 1 << 20,
                   .cache_size = 16 << 10},
        StressCase{.name = "c64k_backing_prealloc",
                   .create = "",
                   .size = 2 << 20,
                   .backing = true,
                   .preallocate = 1 << 20},
        StressCase{.name = "c64k_compressed_snapshot",
                   .create = "",
                   .size = 2 << 20,
                   .snapshot = true,
                   .compressed = true},
        StressCase{
            .name = "c4k_refcount1", .create = "cluster_size=4k,refcount_bits=1", .size = 1 << 20},
        StressCase{.name = "c4k_refcount64_snapshot",
                   .create = "cluster_size=4k,refcount_bits=64",
                   .size = 1 << 20,
                   .snapshot = true},
        StressCase{.name = "extl2_16k_backing",
                   .create = "cluster_size=16k,extended_l2=on",
                   .size = 1 << 20,
                   .backing = true},
        StressCase{.name = "extl2_64k_zstd_compressed_snapshot",
                   .create = "cluster_size=64k,extended_l2=on,compression_type=zstd",
                   .size = 2 << 20,
                   .snapshot = true,
                   .compressed = true},
        StressCase{.name = "extl2_2m_backing_prealloc",
                   .create = "cluster_size=2M,extended_l2=on",
                   .size = 8 << 20,
                   .backing = true,
                   .preallocate = 4 << 20},
        StressCase{.name = "lazy_refcounts",
                   .create = "cluster_size=4k,lazy_refcounts=on",
                   .size = 1 << 20,
                   .snapshot = true},
        StressCase{.name = "v2_backing",
                   .create = "compat=0.10,cluster_size=4k",
                   .size = 1 << 20,
                   .backing = true},
        StressCase{.name = "data_file",
                   .create = "cluster_size=4k,data_file=img.data",
                   .size = 1 << 20,
                   .data_file = "img.data"},
        StressCase{.name = "data_file_raw_extl2",
                   .create = "cluster_size=16k,extended_l2=on,data_file=img.data,data_file_raw=on",
                   .size = 1 << 20,
                   .data_file = "img.data"}),
    [](const ::testing::TestParamInfo<StressCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
