// A corruption found while serving turns the whole image read-only, not just
// the request that met it: after a read meets a broken L2 or L1 entry, every
// write, write-zeroes and discard fails with EIO, a flush fails with EIO while
// the caches hold metadata that can no longer be written, the corrupt bit is
// in the header (as QEMU sets it), and reads of intact clusters go on. All on
// the in-memory Env, images made by our own CreateImage.
#include <gtest/gtest.h>

#include <cerrno>
#include <vector>

#include "base/endian.h"
#include "qcow2/create/create.h"
#include "qcow2/format.h"
#include "qcow2/open_image.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

using testing::MemEnv;

constexpr char kPath[] = "/img.qcow2";
constexpr uint64_t kCluster = 4096;  // one L2 table covers 2 MiB

std::vector<std::byte> Filled(size_t n, uint8_t value) {
  return std::vector<std::byte>(n, std::byte{value});
}

class CorruptionWhileServingTest : public ::testing::Test {
 protected:
  // An 8 MiB image whose guest clusters 0 and 2 (first L2 table) and the
  // first cluster at 2 MiB (second L2 table) hold data, closed cleanly.
  void SetUp() override {
    CreateOptions create;
    create.path = kPath;
    create.size = 8 << 20;
    create.cluster_size = kCluster;
    ASSERT_TRUE(BlockOn(CreateImage(&mem_, create), &mem_).ok());
    Open();
    ASSERT_TRUE(BlockOn(dev_->Write(0, Filled(kCluster, 0x11), false), &mem_).ok());
    ASSERT_TRUE(BlockOn(dev_->Write(2 * kCluster, Filled(kCluster, 0x22), false), &mem_).ok());
    ASSERT_TRUE(BlockOn(dev_->Write(2 << 20, Filled(kCluster, 0x33), false), &mem_).ok());
    ASSERT_TRUE(BlockOn(dev_->Close(), &mem_).ok());
    dev_.reset();
  }

  void Open() {
    auto opened = BlockOn(OpenImage(kPath, ImageOptions{.env = &mem_, .writable = true}), &mem_);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    dev_ = std::move(*opened);
  }

  // Rewrites the on-disk L1 entry `index`, or the L2 entry of guest cluster
  // `index` in the first L2 table, to `value`.
  void SetL1Entry(uint64_t index, uint64_t value) {
    std::vector<std::byte> bytes = mem_.Contents(kPath);
    StoreBE64(std::span<std::byte>(bytes), LoadBE64(bytes, 40) + index * 8, value);
    mem_.SetContents(kPath, bytes);
  }
  void SetL2Entry(uint64_t index, uint64_t value) {
    std::vector<std::byte> bytes = mem_.Contents(kPath);
    const uint64_t l2 = LoadBE64(bytes, LoadBE64(bytes, 40)) & kL1OffsetMask;
    ASSERT_NE(l2, 0u);
    StoreBE64(std::span<std::byte>(bytes), l2 + index * 8, value);
    mem_.SetContents(kPath, bytes);
  }
  uint64_t L2Entry(uint64_t index) {
    std::vector<std::byte> bytes = mem_.Contents(kPath);
    return LoadBE64(bytes, (LoadBE64(bytes, LoadBE64(bytes, 40)) & kL1OffsetMask) + index * 8);
  }
  bool CorruptBitOnDisk() { return (LoadBE64(mem_.Contents(kPath), 72) & 2) != 0; }

  Status Read(uint64_t offset, std::vector<std::byte>& out) {
    return BlockOn(dev_->Read(offset, out), &mem_);
  }
  static void ExpectEio(const Status& st) {
    EXPECT_TRUE(st.IsIoError()) << st.ToString();
    EXPECT_EQ(st.ToNegativeErrno(), -EIO) << st.ToString();
  }

  MemEnv mem_;
  std::unique_ptr<BlockDevice> dev_;
};

TEST_F(CorruptionWhileServingTest, BrokenL2EntryStopsEveryChangeButNotReadsOfIntactClusters) {
  // Guest cluster 1 names guest cluster 0's data, one sector in: unaligned.
  SetL2Entry(1, kEntryCopied | ((L2Entry(0) & kL2OffsetMask) + 512));
  Open();
  std::vector<std::byte> buf(kCluster);
  // Before the corruption is met, the image takes writes.
  ASSERT_TRUE(BlockOn(dev_->Write(3 * kCluster, Filled(512, 0x44), false), &mem_).ok());
  ASSERT_TRUE(BlockOn(dev_->Flush(), &mem_).ok());
  EXPECT_FALSE(dev_->marked_corrupt());

  Status st = Read(kCluster, buf);
  ASSERT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("marked corrupt"), std::string::npos) << st.ToString();
  EXPECT_TRUE(dev_->marked_corrupt());
  EXPECT_TRUE(CorruptBitOnDisk());

  // Every change elsewhere fails with EIO: in place, allocating, zeroes, discard.
  ExpectEio(BlockOn(dev_->Write(0, Filled(512, 0x55), false), &mem_));
  ExpectEio(BlockOn(dev_->Write(5 * kCluster, Filled(512, 0x55), false), &mem_));
  ExpectEio(BlockOn(dev_->Write(5 * kCluster, Filled(512, 0x55), true), &mem_));
  ExpectEio(BlockOn(dev_->WriteZeroes(2 * kCluster, kCluster), &mem_));
  ExpectEio(BlockOn(dev_->Discard(2 * kCluster, kCluster), &mem_));
  // Nothing was dirty: a flush succeeds (it syncs what was written before).
  EXPECT_TRUE(BlockOn(dev_->Flush(), &mem_).ok());

  // Reads of intact clusters are served, with their data unchanged.
  ASSERT_TRUE(Read(0, buf).ok());
  EXPECT_EQ(buf, Filled(kCluster, 0x11));
  ASSERT_TRUE(Read(2 * kCluster, buf).ok());
  EXPECT_EQ(buf, Filled(kCluster, 0x22));
  ASSERT_TRUE(Read(2 << 20, buf).ok());
  EXPECT_EQ(buf, Filled(kCluster, 0x33));
  // The broken cluster stays an error, not data from elsewhere.
  EXPECT_TRUE(Read(kCluster, buf).IsCorruption());
  (void)BlockOn(dev_->Close(), &mem_);
}

TEST_F(CorruptionWhileServingTest, FlushFailsWhenMetadataCanNoLongerBeWritten) {
  SetL2Entry(1, kEntryCopied | ((L2Entry(0) & kL2OffsetMask) + 512));
  Open();
  // An allocating write: its L2 entry is in the cache, not yet in the file.
  ASSERT_TRUE(BlockOn(dev_->Write(6 * kCluster, Filled(512, 0x66), false), &mem_).ok());
  std::vector<std::byte> buf(kCluster);
  ASSERT_TRUE(Read(kCluster, buf).IsCorruption());
  ExpectEio(BlockOn(dev_->Flush(), &mem_));
  EXPECT_EQ(L2Entry(6), 0u) << "no metadata is written into a corrupt image";
  ExpectEio(BlockOn(dev_->Close(), &mem_));
}

TEST_F(CorruptionWhileServingTest, BrokenL1EntryStopsChangesToo) {
  // The second L2 table's L1 entry, made unaligned.
  std::vector<std::byte> bytes = mem_.Contents(kPath);
  const uint64_t l1_1 = LoadBE64(bytes, LoadBE64(bytes, 40) + 8);
  ASSERT_NE(l1_1 & kL1OffsetMask, 0u);
  SetL1Entry(1, l1_1 + 512);
  Open();
  std::vector<std::byte> buf(kCluster);
  Status st = Read(2 << 20, buf);
  ASSERT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("L1 entry 1"), std::string::npos) << st.ToString();
  EXPECT_TRUE(CorruptBitOnDisk());
  ExpectEio(BlockOn(dev_->Write(0, Filled(512, 0x55), false), &mem_));
  ASSERT_TRUE(Read(0, buf).ok());
  EXPECT_EQ(buf, Filled(kCluster, 0x11));
  (void)BlockOn(dev_->Close(), &mem_);
}

// An image opened read-only meets the same entry: the request fails, nothing
// is marked (there is nothing to write the bit with), and it is no change of
// state: the device was read-only all along.
TEST_F(CorruptionWhileServingTest, ReadOnlyImageIsNotMarked) {
  SetL2Entry(1, kEntryCopied | ((L2Entry(0) & kL2OffsetMask) + 512));
  auto opened = BlockOn(OpenImage(kPath, ImageOptions{.env = &mem_, .writable = false}), &mem_);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  dev_ = std::move(*opened);
  std::vector<std::byte> buf(kCluster);
  EXPECT_TRUE(Read(kCluster, buf).IsCorruption());
  EXPECT_FALSE(dev_->marked_corrupt());
  EXPECT_FALSE(CorruptBitOnDisk());
  ASSERT_TRUE(Read(0, buf).ok());
}

}  // namespace
}  // namespace uq::qcow2
