// Stable metadata (the device's user recovery mode, qcow2_image.h): what an
// acknowledgement waits for. A write may return only once everything needed
// to read it back after a daemon crash is in the file, and should wait for
// nothing more:
//   - a new cluster that replaces zeros and reads as zeros on disk gets its
//     entry written beside its data (EntryBesideDataWrite), not after it;
//   - a write in place into a cluster whose entry is in the file waits for
//     no round, even while another request's round is in flight.
// A GateEnv holds the writes a test names until it lets them go, on top of a
// synchronous MemEnv, so each case is one fixed order of events.
#include <gtest/gtest.h>

#include <functional>
#include <vector>

#include "base/endian.h"
#include "qcow2/format.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"
#include "qcow2/testing/wrapping_env.h"

namespace uq::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;

// Writes for which `hold` answers true wait (started on the base file only at
// Release) while the gate is closed. The base must complete synchronously.
class GateEnv final : public testing::WrappingEnv {
 public:
  explicit GateEnv(Env* base) : WrappingEnv(base) {}

  std::function<bool(const IoRequest&)> hold;
  size_t held() const { return held_.size(); }
  // Starts every held write and resumes its waiter.
  void Release() {
    std::vector<std::pair<File*, IoRequest*>> now;
    now.swap(held_);
    hold = nullptr;
    for (auto [file, req] : now) {
      EXPECT_TRUE(file->Start(*req)) << "the base Env must complete synchronously";
      req->waiter.resume();
    }
  }

 private:
  bool StartOn(File& base, IoRequest& req) override {
    if (req.op == IoRequest::Op::kWrite && hold && hold(req)) {
      held_.emplace_back(&base, &req);
      return false;
    }
    return base.Start(req);
  }

  std::vector<std::pair<File*, IoRequest*>> held_;
};

class StableMetadataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>(
        std::string("stable-") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(scratch_->ok());
  }
  // Opens a new image of `size` with stable metadata, with a backing file
  // (which makes copy-on-write read it) or without, growing the file
  // `preallocate` bytes ahead of need (ImageOptions::preallocate).
  void OpenNew(bool backing, uint64_t size = 4 << 20, uint64_t preallocate = 0) {
    std::string out;
    const std::string sz = std::to_string(size);
    ASSERT_EQ(scratch_->Sh("qemu-img create -q -f qcow2 base.qcow2 " + sz, &out), 0) << out;
    ASSERT_EQ(scratch_->Sh(backing ? "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2"
                                   : "qemu-img create -q -f qcow2 img.qcow2 " + sz,
                           &out),
              0)
        << out;
    ASSERT_TRUE(mem_.ImportFromHostFile(scratch_->path("img.qcow2"), kPath).ok());
    ASSERT_TRUE(mem_.ImportFromHostFile(scratch_->path("base.qcow2"), "/w/base.qcow2").ok());
    auto opened = BlockOn(OpenImage(kPath, ImageOptions{.env = &gate_,
                                                        .writable = true,
                                                        .preallocate = preallocate,
                                                        .stable_metadata = true,
                                                        .working_dir = "/w"}));
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    dev_ = std::move(*opened);
  }
  void TearDown() override {
    if (dev_) EXPECT_TRUE(BlockOn(dev_->Close()).ok());
  }
  // Starts a write of `byte` over [offset, offset + length); *done once it
  // returns, with its status in *st.
  void StartWrite(uint64_t offset, uint64_t length, uint8_t byte, Status* st, bool* done) {
    data_.emplace_back(length, std::byte{byte});
    Spawn([](BlockDevice* d, uint64_t at, std::span<const std::byte> b, Status* st,
             bool* done) -> Task<void> {
      *st = co_await d->Write(at, b, false);
      *done = true;
    }(dev_.get(), offset, data_.back(), st, done));
  }
  // Writes all of guest cluster 0 (0x11), which makes its L2 table; *l2:
  // where that table lies in the file.
  void WriteFirstCluster(uint64_t* l2) {
    Status st;
    bool done = false;
    StartWrite(0, kCluster, 0x11, &st, &done);
    ASSERT_TRUE(done && st.ok()) << st.ToString();
    *l2 = L2TableInFile();
    ASSERT_NE(*l2, 0u);
    ASSERT_NE(EntryInFile(0), 0u);
  }
  // Whether `r` writes into the L2 table at `l2`.
  static bool InTable(const IoRequest& r, uint64_t l2) {
    return r.offset >= l2 && r.offset < l2 + kCluster;
  }
  // Where the L2 table of guest cluster 0 lies in the file (0: none yet).
  uint64_t L2TableInFile() {
    std::vector<std::byte> file = mem_.Contents(kPath);
    return LoadBE64(file, LoadBE64(file, 40)) & kL1OffsetMask;
  }
  // The L2 entry of guest cluster `n` (< 8192) as the file holds it.
  uint64_t EntryInFile(uint64_t n) {
    const uint64_t l2 = L2TableInFile();
    return l2 == 0 ? 0 : LoadBE64(mem_.Contents(kPath), l2 + 8 * n);
  }

  // Writes 4 KiB of 0x22 at 4 KiB into guest cluster `n` (the clusters
  // before it hold 0x11, the L2 table of all is the one at `l2`) with every
  // write held but the L2 table's: the data waits, and the entry must reach
  // the file meanwhile (after the data, it never would). Then reads back.
  void ExpectEntryBesideData(uint64_t n, uint64_t l2) {
    gate_.hold = [l2](const IoRequest& r) { return !InTable(r, l2); };
    Status st;
    bool done = false;
    StartWrite(n * kCluster + 4096, 4096, 0x22, &st, &done);
    EXPECT_EQ(gate_.held(), 1u) << "the data write";
    EXPECT_FALSE(done) << "acknowledged before its data was written";
    EXPECT_NE(EntryInFile(n), 0u) << "the entry waited for the data";
    gate_.Release();
    ASSERT_TRUE(done && st.ok()) << st.ToString();

    std::vector<std::byte> back((n + 1) * kCluster);
    ASSERT_TRUE(BlockOn(dev_->Read(0, back)).ok());
    for (uint64_t i = 0; i < back.size(); i++) {
      const uint64_t at = i - n * kCluster;
      const std::byte want = i < n * kCluster          ? std::byte{0x11}
                             : at >= 4096 && at < 8192 ? std::byte{0x22}
                                                       : std::byte{0};
      ASSERT_EQ(back[i], want) << "byte " << i;
    }
  }

  static constexpr const char* kPath = "/w/img.qcow2";
  std::unique_ptr<testing::ScratchDir> scratch_;
  testing::MemEnv mem_;
  GateEnv gate_{&mem_};
  std::unique_ptr<BlockDevice> dev_;
  std::vector<std::vector<std::byte>> data_;
};

TEST_F(StableMetadataTest, NewClusterEntryIsWrittenBesideItsData) {
  ASSERT_NO_FATAL_FAILURE(OpenNew(false));
  // Cluster 0 first: its L2 table exists from then on.
  uint64_t l2 = 0;
  ASSERT_NO_FATAL_FAILURE(WriteFirstCluster(&l2));
  ASSERT_NO_FATAL_FAILURE(ExpectEntryBesideData(1, l2));
}

// Preallocation grows the file ahead of the clusters in use (fallocate, which
// reads as zeros): the reserve's later batches lie inside the file, and still
// read as zeros on disk, which is what lets the entry go first.
TEST_F(StableMetadataTest, PreallocatedClusterEntryIsWrittenBesideItsData) {
  ASSERT_NO_FATAL_FAILURE(OpenNew(false, 32 << 20, 64 << 20));
  uint64_t l2 = 0;
  ASSERT_NO_FATAL_FAILURE(WriteFirstCluster(&l2));
  // Past the first refill's 128 clusters (8 MiB): what follows came from a
  // refill made after the file was grown 64 MiB ahead.
  constexpr uint64_t kFilled = 160;
  for (uint64_t n = 1; n < kFilled; n++) {
    Status st;
    bool done = false;
    StartWrite(n * kCluster, kCluster, 0x11, &st, &done);
    ASSERT_TRUE(done && st.ok()) << st.ToString();
  }
  const uint64_t file_before = mem_.Contents(kPath).size();
  ASSERT_NO_FATAL_FAILURE(ExpectEntryBesideData(kFilled, l2));
  const uint64_t host = EntryInFile(kFilled) & kL2OffsetMask;
  EXPECT_LT(host + kCluster, file_before) << "the cluster was not inside the grown file";
}
TEST_F(StableMetadataTest, InPlaceWriteWaitsForNoRound) {
  ASSERT_NO_FATAL_FAILURE(OpenNew(false));
  uint64_t l2 = 0;
  ASSERT_NO_FATAL_FAILURE(WriteFirstCluster(&l2));

  // Cluster 1's round is held at its L2 write...
  gate_.hold = [l2](const IoRequest& r) { return InTable(r, l2); };
  Status alloc;
  bool alloc_done = false;
  StartWrite(kCluster, 4096, 0x22, &alloc, &alloc_done);
  EXPECT_EQ(gate_.held(), 1u) << "the round's write of the L2 table";
  EXPECT_FALSE(alloc_done) << "acknowledged before its entry was in the file";
  // ...while a write into cluster 0, whose entry is in the file, completes
  // on its own data write.
  Status in_place;
  bool in_place_done = false;
  StartWrite(4096, 4096, 0x33, &in_place, &in_place_done);
  EXPECT_TRUE(in_place_done) << "an in-place write waited for another request's round";
  EXPECT_TRUE(in_place.ok()) << in_place.ToString();
  gate_.Release();
  ASSERT_TRUE(alloc_done && alloc.ok()) << alloc.ToString();
}

// ...but one into a cluster whose entry is not in the file yet waits for
// the round that writes it: a daemon crash before then would unmap it.
TEST_F(StableMetadataTest, InPlaceWriteIntoUnwrittenEntryWaitsForItsRound) {
  // With a backing file, the new cluster's entry is written after its data,
  // and the cluster lock is released before that round.
  ASSERT_NO_FATAL_FAILURE(OpenNew(true));
  uint64_t l2 = 0;
  ASSERT_NO_FATAL_FAILURE(WriteFirstCluster(&l2));

  gate_.hold = [l2](const IoRequest& r) { return InTable(r, l2); };
  Status alloc;
  bool alloc_done = false;
  StartWrite(kCluster, 4096, 0x22, &alloc, &alloc_done);
  EXPECT_EQ(gate_.held(), 1u) << "the round's write of the L2 table";
  Status in_place;
  bool in_place_done = false;
  StartWrite(kCluster + 8192, 4096, 0x33, &in_place, &in_place_done);
  EXPECT_FALSE(alloc_done) << "acknowledged before its entry was in the file";
  EXPECT_FALSE(in_place_done) << "a write into a cluster a crash would unmap was acknowledged";
  gate_.Release();
  ASSERT_TRUE(alloc_done && alloc.ok()) << alloc.ToString();
  ASSERT_TRUE(in_place_done && in_place.ok()) << in_place.ToString();
  EXPECT_NE(EntryInFile(1), 0u);
}

}  // namespace
}  // namespace uq::qcow2
