// Refcounts::Allocate for runs at least one refcount block's range long (the
// L1 table of a big resize or a snapshot's L1 copy with small clusters). A
// fresh range holds its own block in its first cluster, so such a run never
// fits in one: it gets ranges of its own, past everything in use, with their
// blocks first. Images are QEMU-made, worked on in a MemEnv, and checked by
// reading the refcounts back and by `qemu-img check`.
#include "qcow2/refcounts.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "base/endian.h"
#include "qcow2/header.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/crash_harness.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

class RefcountsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>(
        std::string("refcounts-") +
        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(scratch_->ok());
  }
  // `qemu-img check --output=json`'s "leaks" figure (0 when absent); fails
  // the test on any corruption or check error.
  uint64_t QemuLeaks(const std::string& image) {
    std::string out;
    const int st = scratch_->Sh("qemu-img check --output=json " + image, &out);
    EXPECT_TRUE(st == 0 || st == 3) << out;
    EXPECT_EQ(out.find("\"corruptions\""), std::string::npos) << out;
    EXPECT_NE(out.find("\"check-errors\": 0"), std::string::npos) << out;
    const size_t at = out.find("\"leaks\": ");
    return at == std::string::npos ? 0 : std::stoull(out.substr(at + 9));
  }
  std::unique_ptr<testing::ScratchDir> scratch_;
};

// Every cluster of the run [offset, offset + count clusters) has refcount 1
// and is no refcount structure.
void ExpectRun(Refcounts& rc, uint64_t offset, uint64_t count, uint64_t cluster_size) {
  ASSERT_EQ(offset % cluster_size, 0u);
  for (uint64_t c = offset / cluster_size; c < offset / cluster_size + count; c++) {
    auto got = BlockOn(rc.Get(c));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ASSERT_EQ(*got, 1u) << "cluster " << c;
    ASSERT_FALSE(rc.IsRefcountMetadata(c)) << "cluster " << c;
  }
}

TEST_F(RefcountsTest, RunsLongerThanABlockRangeGetRangesOfTheirOwn) {
  ASSERT_EQ(scratch_->Sh("qemu-img create -f qcow2 -o cluster_size=512 img.qcow2 64M"), 0);
  testing::MemEnv mem;
  testing::ImportImage(mem, scratch_->path("img.qcow2"), "/w/img.qcow2");
  auto file = mem.Open("/w/img.qcow2", OpenOptions{.writable = true});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  auto header = BlockOn(ReadHeader(**file));
  ASSERT_TRUE(header.ok()) << header.status().ToString();
  const uint64_t cs = header->cluster_size();
  Refcounts rc(file->get(), &*header, 1 << 20);
  ASSERT_TRUE(BlockOn(rc.Load()).ok());
  const uint64_t E = rc.entries_per_block();
  ASSERT_EQ(E, 256u);  // 512 B clusters, 16-bit refcounts

  auto small1 = BlockOn(rc.Allocate(1));
  ASSERT_TRUE(small1.ok()) << small1.status().ToString();
  // Exactly one range's worth, then more than two ranges' worth: neither fits
  // beside a self-describing block.
  auto long1 = BlockOn(rc.Allocate(E));
  ASSERT_TRUE(long1.ok()) << long1.status().ToString();
  auto long2 = BlockOn(rc.Allocate(2 * E + 7));
  ASSERT_TRUE(long2.ok()) << long2.status().ToString();
  auto small2 = BlockOn(rc.Allocate(1));
  ASSERT_TRUE(small2.ok()) << small2.status().ToString();
  ExpectRun(rc, *small1, 1, cs);
  ExpectRun(rc, *long1, E, cs);
  ExpectRun(rc, *long2, 2 * E + 7, cs);
  ExpectRun(rc, *small2, 1, cs);
  // Small allocations still fill from the front, below the long runs.
  EXPECT_EQ(*small2, *small1 + cs);
  EXPECT_LT(*small2, *long1);
  EXPECT_GE(*long2, *long1 + E * cs);

  // The flush order: blocks, sync, table, sync. The last cluster of the
  // last run is written too, as its user would: qemu-img check counts only
  // what lies below the end of the file.
  File* f = file->get();
  const uint64_t end = *long2 + (2 * E + 7) * cs;
  auto flush = [](Refcounts* rc, File* f, uint64_t end, uint64_t cs) -> Task<Status> {
    CO_RETURN_IF_ERROR(co_await WriteZeroBytes(*f, end - cs, cs));
    CO_RETURN_IF_ERROR(co_await rc->WriteBlocks());
    CO_RETURN_IF_ERROR(co_await f->Sync());
    CO_RETURN_IF_ERROR(co_await rc->WriteTable());
    co_return co_await f->Sync();
  };
  ASSERT_TRUE(BlockOn(flush(&rc, f, end, cs)).ok());
  testing::ExportImage(mem, "/w/img.qcow2", scratch_->path("after.qcow2"));
  // Nothing references the runs, so they leak; the new refcount blocks do not
  // (the table names them), and nothing else is miscounted.
  EXPECT_EQ(QemuLeaks("after.qcow2"), 1 + E + (2 * E + 7) + 1);

  // A freed long run is found again where it was, in ranges with blocks.
  for (uint64_t c = *long2 / cs; c < *long2 / cs + 2 * E + 7; c++) rc.DeferDecrement(c);
  ASSERT_TRUE(BlockOn(rc.ApplyDeferredDecrements()).ok());
  auto again = BlockOn(rc.Allocate(2 * E + 7));
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(*again, *long2);
  ExpectRun(rc, *again, 2 * E + 7, cs);
}

// Through the engine: a resize whose new L1 table (512 clusters) is twice a
// block's range, then another; qemu-img check finds nothing at all.
TEST_F(RefcountsTest, ResizeWithAnL1LongerThanABlockRange) {
  ASSERT_EQ(scratch_->Sh("qemu-img create -f qcow2 -o cluster_size=512 img.qcow2 64M"), 0);
  ASSERT_EQ(scratch_->Sh("qemu-io -c 'write -P 0x5a 1M 64k' img.qcow2"), 0);
  testing::MemEnv mem;
  testing::ImportImage(mem, scratch_->path("img.qcow2"), "/w/img.qcow2");
  auto dev = testing::OpenWritableImage(mem);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  Status st = BlockOn((*dev)->Resize(1ull << 30, Preallocation::kOff));
  ASSERT_TRUE(st.ok()) << st.ToString();
  st = BlockOn((*dev)->Resize(3ull << 30, Preallocation::kOff));
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(BlockOn((*dev)->Close()).ok());
  testing::ExportImage(mem, "/w/img.qcow2", scratch_->path("after.qcow2"));
  EXPECT_EQ(QemuLeaks("after.qcow2"), 0u);
  ASSERT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2", /*leaks_allowed=*/false));
  std::string out;
  ASSERT_EQ(scratch_->Sh("qemu-img info after.qcow2 | grep 'virtual size'", &out), 0);
  EXPECT_NE(out.find("3221225472 bytes"), std::string::npos) << out;
  // The data written before is still there.
  ASSERT_EQ(scratch_->Sh("qemu-io -c 'read -P 0x5a 1M 64k' -c 'read -P 0 2M 64k' after.qcow2 "
                         "| grep -q 'verification failed'"),
            1);
}

// With 64-bit refcounts a 512 B cluster block covers 64 clusters and the
// starting one-cluster table 64 ranges: the 4352-cluster L1 of a 9G image
// needs 70 new blocks, more than the table has entries, so the table grows
// first (past the ranges the run takes), then the run is laid out.
TEST_F(RefcountsTest, LongRunBeyondTheTableGrowsItFirst) {
  ASSERT_EQ(scratch_->Sh("qemu-img create -f qcow2 -o cluster_size=512,refcount_bits=64 "
                         "img.qcow2 1M"),
            0);
  ASSERT_EQ(scratch_->Sh("qemu-io -c 'write -P 0x5a 0 100k' img.qcow2"), 0);
  testing::MemEnv mem;
  testing::ImportImage(mem, scratch_->path("img.qcow2"), "/w/img.qcow2");
  auto dev = testing::OpenWritableImage(mem);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  Status st = BlockOn((*dev)->Resize(9ull << 30, Preallocation::kOff));
  ASSERT_TRUE(st.ok()) << st.ToString();
  st = BlockOn((*dev)->Resize(18ull << 30, Preallocation::kOff));
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(BlockOn((*dev)->Close()).ok());
  testing::ExportImage(mem, "/w/img.qcow2", scratch_->path("after.qcow2"));
  EXPECT_EQ(QemuLeaks("after.qcow2"), 0u);
  ASSERT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2", /*leaks_allowed=*/false));
  // refcount_table_clusters (header bytes 56..59, big-endian) grew past 1.
  const std::vector<std::byte> bytes = scratch_->Slurp("after.qcow2");
  ASSERT_GT(bytes.size(), 60u);
  EXPECT_GT(LoadBE32(bytes, 56), 1u);
  ASSERT_EQ(scratch_->Sh("qemu-io -c 'read -P 0x5a 0 100k' -c 'read -P 0 17G 64k' after.qcow2 "
                         "| grep -q 'verification failed'"),
            1);
}

}  // namespace
}  // namespace uq::qcow2
