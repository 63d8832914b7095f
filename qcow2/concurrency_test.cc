// Many requests in flight on one image, with completions in a random order
// (MemEnv's deferred mode): concurrent writes to the same unallocated
// clusters must allocate each cluster once, reads must see a consistent
// model, and the result must match a reference model and pass qemu-img check.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

using testing::MemEnv;
using testing::MemEnvOptions;

struct ConcurrencyCase {
  std::string name;
  std::string create;
  uint64_t size;
  bool backing;
};
std::ostream& operator<<(std::ostream& o, const ConcurrencyCase& c) { return o << c.name; }

class ConcurrencyTest : public ::testing::TestWithParam<ConcurrencyCase> {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>("conc-" + GetParam().name);
    ASSERT_TRUE(scratch_->ok());
    dir_ = scratch_->dir();
  }
  int Sh(const std::string& cmd, std::string* out = nullptr) { return scratch_->Sh(cmd, out); }
  std::unique_ptr<testing::ScratchDir> scratch_;
  std::string dir_;
};

TEST_P(ConcurrencyTest, OverlappingClustersInFlightMatchTheModel) {
  const ConcurrencyCase& c = GetParam();
  if (c.backing) {
    ASSERT_EQ(Sh(fmt::format("qemu-img create -f qcow2 base.qcow2 {}", c.size)), 0);
    ASSERT_EQ(Sh(fmt::format("qemu-io -c 'write -P 0x5b 0 {}' base.qcow2", c.size)), 0);
    ASSERT_EQ(
        Sh(fmt::format("qemu-img create -f qcow2 {} -b base.qcow2 -F qcow2 img.qcow2", c.create)),
        0);
  } else {
    ASSERT_EQ(Sh(fmt::format("qemu-img create -f qcow2 {} img.qcow2 {}", c.create, c.size)), 0);
  }
  std::vector<std::byte> model(c.size, std::byte{c.backing ? uint8_t{0x5b} : uint8_t{0}});

  for (uint64_t seed = 1; seed <= 5; seed++) {
    MemEnv mem(MemEnvOptions{.completion = MemEnvOptions::Completion::kDeferred,
                             .seed = seed,
                             .max_completions_per_poll = 3});
    ASSERT_TRUE(mem.ImportFromHostFile(dir_ + "/img.qcow2", "/w/img.qcow2").ok());
    if (c.backing) ASSERT_TRUE(mem.ImportFromHostFile(dir_ + "/base.qcow2", "/w/base.qcow2").ok());
    auto opened =
        BlockOn(OpenImage("/w/img.qcow2", ImageOptions{.env = &mem, .writable = true}), &mem);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    std::unique_ptr<BlockDevice> dev = std::move(*opened);
    const uint64_t cs = static_cast<Qcow2Image*>(dev.get())->geometry().cluster_size;

    // 64 requests at once. Writes never overlap each other byte-wise (so the
    // result is defined) but share clusters heavily: each takes a distinct
    // 512-byte slot, slots interleaved across a few clusters.
    std::mt19937_64 rng(seed);
    const uint64_t slots = std::min<uint64_t>(c.size / 512, 4 * cs / 512);
    std::vector<uint64_t> order(slots);
    for (uint64_t i = 0; i < slots; i++) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    const uint64_t base = (seed * 7 % (c.size / cs - 4)) * cs;
    int outstanding = 0, failures = 0;
    std::vector<std::vector<std::byte>> buffers(std::min<uint64_t>(slots, 64));
    for (size_t r = 0; r < buffers.size(); r++) {
      uint64_t off = base + order[r] * 512;
      buffers[r].assign(512, std::byte(seed * 31 + r));
      std::copy(buffers[r].begin(), buffers[r].end(), model.begin() + off);
      outstanding++;
      Spawn([](BlockDevice* d, uint64_t off, std::span<const std::byte> data, int* out,
               int* fail) -> Task<void> {
        Status st = co_await d->Write(off, data, false);
        if (!st.ok()) {
          std::fprintf(stderr, "write failed: %s\n", st.ToString().c_str());
          ++*fail;
        }
        --*out;
      }(dev.get(), off, buffers[r], &outstanding, &failures));
    }
    // Concurrent reads of untouched neighbouring clusters must still see the model.
    std::vector<std::byte> probe(cs);
    bool probe_ok = false;
    Spawn([](BlockDevice* d, uint64_t off, std::span<std::byte> out, bool* ok) -> Task<void> {
      *ok = (co_await d->Read(off, out)).ok();
    }(dev.get(), base + 4 * cs < c.size ? base + 4 * cs : 0, probe, &probe_ok));
    while (mem.Poll()) {
    }
    ASSERT_EQ(outstanding, 0);
    ASSERT_EQ(failures, 0);
    ASSERT_TRUE(probe_ok);
    uint64_t probe_at = base + 4 * cs < c.size ? base + 4 * cs : 0;
    if (probe_at != 0)
      EXPECT_TRUE(std::equal(probe.begin(), probe.end(), model.begin() + probe_at));

    std::vector<std::byte> all(c.size);
    ASSERT_TRUE(BlockOn(dev->Read(0, all), &mem).ok());
    ASSERT_TRUE(all == model) << "seed " << seed;
    ASSERT_TRUE(BlockOn(dev->Close(), &mem).ok());
    dev.reset();
    ASSERT_TRUE(mem.ExportToHostFile("/w/img.qcow2", dir_ + "/img.qcow2").ok());
    std::string out;
    ASSERT_EQ(Sh("qemu-img check img.qcow2", &out), 0) << "seed " << seed << "\n" << out;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Images, ConcurrencyTest,
    ::testing::Values(ConcurrencyCase{"c4k", "-o cluster_size=4k", 1 << 20, false},
                      ConcurrencyCase{"c64k_backing", "", 4 << 20, true},
                      ConcurrencyCase{"extl2", "-o cluster_size=16k,extended_l2=on", 2 << 20, true},
                      ConcurrencyCase{"c512", "-o cluster_size=512", 1 << 20, false}),
    [](const ::testing::TestParamInfo<ConcurrencyCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
