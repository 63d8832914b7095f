// Refcounts' shadow commits (snapshot create and delete): until the header
// switches, nothing the disk's refcount table names is written, clusters
// the commit frees are not handed out, and an abandoned commit leaves the
// refcounts as the disk has them. Images are QEMU-made, worked on in a
// MemEnv.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "base/aligned_buffer.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/refcounts.h"
#include "qcow2/testing/crash_harness.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

class RefcountsShadowTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>(
        std::string("refcounts-shadow-") +
        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(scratch_->ok());
    // 512 B clusters: a refcount block covers 256 clusters, so the data
    // below spans several blocks.
    ASSERT_EQ(scratch_->Sh("qemu-img create -f qcow2 -o cluster_size=512 img.qcow2 4M && "
                           "qemu-io -c 'write -P 0x5a 0 400k' img.qcow2"),
              0);
    testing::ImportImage(mem_, scratch_->path("img.qcow2"), "/w/img.qcow2");
    auto file = mem_.Open("/w/img.qcow2", OpenOptions{.writable = true});
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    file_ = std::move(*file);
    auto header = BlockOn(ReadHeader(*file_));
    ASSERT_TRUE(header.ok()) << header.status().ToString();
    header_ = *header;
    rc_ = std::make_unique<Refcounts>(file_.get(), &header_, 1 << 20);
    ASSERT_TRUE(BlockOn(rc_->Load()).ok());
  }

  std::vector<std::byte> FileBytes() {
    auto size = file_->Size();
    EXPECT_TRUE(size.ok());
    AlignedBuffer buf((*size + 511) / 512 * 512);
    EXPECT_TRUE(BlockOn(file_->ReadZeroPadded(0, buf.span())).ok());
    return {buf.span().begin(), buf.span().begin() + static_cast<ptrdiff_t>(*size)};
  }
  // The bytes of the refcount table and of every block it names.
  std::vector<std::byte> RefcountStructures(const std::vector<std::byte>& file,
                                            const std::vector<uint64_t>& table) {
    const uint64_t cs = header_.cluster_size();
    std::vector<std::byte> out(
        file.begin() + static_cast<ptrdiff_t>(header_.refcount_table_offset),
        file.begin() + static_cast<ptrdiff_t>(header_.refcount_table_offset +
                                              header_.refcount_table_clusters * cs));
    for (uint64_t e : table) {
      const uint64_t block = e & kRefcountTableOffsetMask;
      if (block == 0) continue;
      out.insert(out.end(), file.begin() + static_cast<ptrdiff_t>(block),
                 file.begin() + static_cast<ptrdiff_t>(block + cs));
    }
    return out;
  }
  uint64_t Get(Refcounts& rc, uint64_t cluster) {
    auto got = BlockOn(rc.Get(cluster));
    EXPECT_TRUE(got.ok()) << got.status().ToString();
    return got.ok() ? *got : ~uint64_t{0};
  }
  Status SyncFile() {
    return BlockOn([](File* f) -> Task<Status> { co_return co_await f->Sync(); }(file_.get()));
  }
  Status Flush() {
    Status st = BlockOn(rc_->WriteBlocks());
    if (st.ok()) st = BlockOn(rc_->WriteTable());
    if (st.ok()) st = SyncFile();
    return st;
  }

  testing::MemEnv mem_;
  std::unique_ptr<testing::ScratchDir> scratch_;
  std::unique_ptr<File> file_;
  Header header_;
  std::unique_ptr<Refcounts> rc_;
};

TEST_F(RefcountsShadowTest, ChangesReachTheDiskOnlyThroughTheNewTable) {
  const uint64_t cs = header_.cluster_size();
  // Three clusters of our own; the first freed again, so the allocator's
  // scan starts below the other two.
  auto run = BlockOn(rc_->Allocate(3));
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  const uint64_t a = *run / cs;
  rc_->DeferDecrement(a);
  ASSERT_TRUE(BlockOn(rc_->ApplyDeferredDecrements()).ok());
  ASSERT_TRUE(Flush().ok());
  const std::vector<uint64_t> old_table = rc_->table();
  const std::vector<std::byte> before = RefcountStructures(FileBytes(), old_table);
  // One of ours gets a reference more (a cluster of the image's data would
  // be out of step with its COPIED flag, which is the image's business).
  const uint64_t data = a + 2;
  ASSERT_EQ(Get(*rc_, data), 1u);

  ASSERT_TRUE(BlockOn(rc_->BeginShadow(FileBytes().size(), 32)).ok());
  ASSERT_TRUE(BlockOn(rc_->Increment(data)).ok());
  rc_->DeferDecrement(a + 1);
  ASSERT_TRUE(BlockOn(rc_->ApplyDeferredDecrements()).ok());
  EXPECT_EQ(Get(*rc_, a + 1), 0u);
  // The commit's allocations: cluster a (free on disk too), then past a+1,
  // which the disk's state still counts.
  for (int i = 0; i < 4; i++) {
    auto got = BlockOn(rc_->Allocate(1));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_NE(*got / cs, a + 1) << "a cluster the commit freed was handed out";
  }
  auto table_offset = BlockOn(rc_->WriteShadow());
  ASSERT_TRUE(table_offset.ok()) << table_offset.status().ToString();
  ASSERT_NE(*table_offset, header_.refcount_table_offset);
  ASSERT_TRUE(SyncFile().ok());
  // Nothing the old table names was written: the old header's refcounts
  // are intact.
  EXPECT_EQ(RefcountStructures(FileBytes(), old_table), before);
  {
    Refcounts old_view(file_.get(), &header_, 1 << 20);
    ASSERT_TRUE(BlockOn(old_view.Load()).ok());
    EXPECT_EQ(Get(old_view, data), 1u);
    EXPECT_EQ(Get(old_view, a + 1), 1u);
  }
  // The switch, as the image makes it.
  const uint64_t old_offset = header_.refcount_table_offset;
  header_.refcount_table_offset = *table_offset;
  ASSERT_TRUE(BlockOn(WriteHeader(*file_, header_)).ok());
  rc_->AdoptShadow(old_offset, header_.refcount_table_clusters);
  EXPECT_FALSE(rc_->in_shadow());
  // The old table and copied blocks are dropped at the next flush, as the
  // image's flush does it.
  ASSERT_TRUE(BlockOn(rc_->ApplyDeferredDecrements()).ok());
  ASSERT_TRUE(Flush().ok());
  Refcounts new_view(file_.get(), &header_, 1 << 20);
  ASSERT_TRUE(BlockOn(new_view.Load()).ok());
  EXPECT_EQ(Get(new_view, data), 2u);
  EXPECT_EQ(Get(new_view, a + 1), 0u);
  EXPECT_EQ(Get(new_view, old_offset / cs), 0u) << "the old table is freed";
  // Freed on disk now: the allocator may hand it out again.
  bool reused = false;
  for (int i = 0; i < 8 && !reused; i++) {
    auto got = BlockOn(rc_->Allocate(1));
    ASSERT_TRUE(got.ok());
    reused = *got / cs == a + 1;
  }
  EXPECT_TRUE(reused);

  testing::ExportImage(mem_, "/w/img.qcow2", scratch_->path("after.qcow2"));
  std::string out;
  const int st = scratch_->Sh("qemu-img check after.qcow2", &out);
  // Leaks: the clusters allocated above, which nothing references.
  EXPECT_TRUE(st == 0 || st == 3) << out;
  EXPECT_EQ(out.find("ERROR"), std::string::npos) << out;
}

TEST_F(RefcountsShadowTest, AnAbandonedCommitLeavesTheRefcountsAsTheDiskHasThem) {
  const uint64_t cs = header_.cluster_size();
  const std::vector<uint64_t> old_table = rc_->table();
  const std::vector<std::byte> before = RefcountStructures(FileBytes(), old_table);
  const uint64_t data = 300;
  ASSERT_TRUE(BlockOn(rc_->BeginShadow(FileBytes().size(), 32)).ok());
  ASSERT_TRUE(BlockOn(rc_->Increment(data)).ok());
  rc_->DeferDecrement(data + 1);
  ASSERT_TRUE(BlockOn(rc_->ApplyDeferredDecrements()).ok());
  auto got = BlockOn(rc_->Allocate(2));
  ASSERT_TRUE(got.ok());
  ASSERT_TRUE(BlockOn(rc_->WriteShadow()).ok());
  rc_->AbandonShadow();
  EXPECT_FALSE(rc_->in_shadow());
  EXPECT_EQ(Get(*rc_, data), 1u);
  EXPECT_EQ(Get(*rc_, data + 1), 1u);
  EXPECT_EQ(Get(*rc_, *got / cs), 0u) << "an allocation of the abandoned commit";
  EXPECT_EQ(rc_->table(), old_table);
  EXPECT_EQ(RefcountStructures(FileBytes(), old_table), before);
  // And the refcounts go on as before: a change flushed in place.
  ASSERT_TRUE(BlockOn(rc_->Increment(data)).ok());
  ASSERT_TRUE(Flush().ok());
  Refcounts view(file_.get(), &header_, 1 << 20);
  ASSERT_TRUE(BlockOn(view.Load()).ok());
  EXPECT_EQ(Get(view, data), 2u);
}

TEST_F(RefcountsShadowTest, TheTableGrowsBeforeTheCommitNotDuringIt) {
  const uint64_t cs = header_.cluster_size();
  auto mine = BlockOn(rc_->Allocate(1));
  ASSERT_TRUE(mine.ok());
  ASSERT_TRUE(Flush().ok());
  const uint64_t entries = rc_->table().size();
  const uint64_t grown_from = header_.refcount_table_offset;
  // More than the table can describe past the end of the file: it moves now
  // (a header write of its own), before any change of the commit.
  const uint64_t reach = entries * rc_->entries_per_block();
  ASSERT_TRUE(BlockOn(rc_->BeginShadow(FileBytes().size(), reach)).ok());
  EXPECT_GT(rc_->table().size(), entries);
  EXPECT_NE(header_.refcount_table_offset, grown_from);
  auto on_disk = BlockOn(ReadHeader(*file_));
  ASSERT_TRUE(on_disk.ok());
  EXPECT_EQ(on_disk->refcount_table_offset, header_.refcount_table_offset);
  ASSERT_TRUE(BlockOn(rc_->Increment(*mine / cs)).ok());
  auto table_offset = BlockOn(rc_->WriteShadow());
  ASSERT_TRUE(table_offset.ok()) << table_offset.status().ToString();
  ASSERT_TRUE(SyncFile().ok());
  const uint64_t old_offset = header_.refcount_table_offset;
  header_.refcount_table_offset = *table_offset;
  ASSERT_TRUE(BlockOn(WriteHeader(*file_, header_)).ok());
  rc_->AdoptShadow(old_offset, header_.refcount_table_clusters);
  ASSERT_TRUE(BlockOn(rc_->ApplyDeferredDecrements()).ok());
  ASSERT_TRUE(Flush().ok());
  Refcounts view(file_.get(), &header_, 1 << 20);
  ASSERT_TRUE(BlockOn(view.Load()).ok());
  EXPECT_EQ(Get(view, *mine / cs), 2u);
  EXPECT_EQ(Get(view, grown_from / cs), 0u) << "the table before the growth is freed";
  testing::ExportImage(mem_, "/w/img.qcow2", scratch_->path("after.qcow2"));
  std::string out;
  const int st = scratch_->Sh("qemu-img check after.qcow2", &out);
  EXPECT_TRUE(st == 0 || st == 3) << out;
  EXPECT_EQ(out.find("ERROR"), std::string::npos) << out;
}

}  // namespace
}  // namespace uq::qcow2
