// BlockDevice::BlockStatus on images qemu-img/qemu-io make, opened through
// the in-memory Env: what each kind of L2 entry, a raw file's holes, an
// external data file and metadata preallocation report (QEMU's answers, as
// tests/oracle/map_oracle_test.py checks through `map` against qemu-img map).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <string>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/raw_image.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

using Kind = RangeStatus::Kind;
using testing::MemEnv;
constexpr uint64_t K = 1024;
constexpr uint64_t M = 1024 * K;

class BlockStatusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>(
        std::string("bs-") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(scratch_->ok());
  }
  void Sh(const std::string& cmd) {
    std::string out;
    ASSERT_EQ(scratch_->Sh(cmd, &out), 0) << cmd << "\n" << out;
  }
  // Copies host files `names` of the scratch directory into mem_ and opens
  // the first, read-only.
  void Open(std::initializer_list<std::string> names, std::string format = "") {
    for (const std::string& name : names) {
      ASSERT_TRUE(mem_.ImportFromHostFile(scratch_->path(name), "/" + name).ok()) << name;
    }
    auto opened = BlockOn(
        OpenImage("/" + *names.begin(),
                  ImageOptions{.env = &mem_, .format = format, .lock = false, .working_dir = "/"}),
        &mem_);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    dev_ = std::move(*opened);
  }
  RangeStatus At(uint64_t offset, uint64_t length, BlockDevice* dev = nullptr) {
    if (dev == nullptr) dev = dev_.get();
    auto s = BlockOn(dev->BlockStatus(offset, length), &mem_);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? *s : RangeStatus{};
  }
  uint64_t HostOf(uint64_t guest) {
    auto e = BlockOn(static_cast<Qcow2Image*>(dev_.get())->LookupEntry(guest), &mem_);
    EXPECT_TRUE(e.ok());
    return e.ok() ? e->host_cluster() : 0;
  }

  MemEnv mem_;
  std::unique_ptr<testing::ScratchDir> scratch_;
  std::unique_ptr<BlockDevice> dev_;
};

TEST_F(BlockStatusTest, EachKindOfCluster) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=4096 a.qcow2 1M");
  Sh("qemu-io -c 'write -P 1 0 8k' -c 'write -P 2 16k 4k' -c 'write -z 16k 4k' "
     "-c 'write -z 32k 4k' -c 'write -c -P 3 64k 4k' -c 'write -c -P 4 68k 4k' a.qcow2");
  Open({"a.qcow2"});
  const uint64_t host0 = HostOf(0);
  ASSERT_EQ(HostOf(4 * K), host0 + 4 * K);  // qemu-io allocated them side by side

  RangeStatus s = At(0, 1 * M);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 8 * K);
  EXPECT_TRUE(s.has_offset);
  EXPECT_EQ(s.host_offset, host0);
  ASSERT_NE(s.file, nullptr);
  EXPECT_EQ(*s.file, "/a.qcow2");
  // From inside a cluster, clipped to the length asked for.
  s = At(1000, 3000);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 3000u);
  EXPECT_EQ(s.host_offset, host0 + 1000);
  // Unallocated up to the zero cluster that keeps its host cluster.
  s = At(8 * K, 1 * M - 8 * K);
  EXPECT_EQ(s.kind, Kind::kUnallocated);
  EXPECT_EQ(s.length, 8 * K);
  EXPECT_FALSE(s.has_offset);
  s = At(16 * K, 1 * M - 16 * K);
  EXPECT_EQ(s.kind, Kind::kZero);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_TRUE(s.has_offset);
  EXPECT_EQ(s.host_offset, HostOf(16 * K));
  // A zero cluster that never had a host cluster.
  s = At(32 * K, 1 * M - 32 * K);
  EXPECT_EQ(s.kind, Kind::kZero);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_FALSE(s.has_offset);
  // Two compressed clusters: data without a place, one cluster per answer
  // (as QEMU answers; `compare -s` sees where answers end).
  s = At(64 * K, 1 * M - 64 * K);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_FALSE(s.has_offset);
  s = At(66 * K, 1 * M - 66 * K);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 2 * K);
  EXPECT_FALSE(s.has_offset);
  s = At(72 * K, 1 * M - 72 * K);
  EXPECT_EQ(s.kind, Kind::kUnallocated);
  EXPECT_EQ(s.length, 1 * M - 72 * K);
}

TEST_F(BlockStatusTest, NoL2TableIsUnallocatedToTheTableEnd) {
  // 512-byte clusters: one L2 table covers 32 KiB.
  Sh("qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 1M");
  Sh("qemu-io -c 'write -P 1 100k 512' a.qcow2");
  Open({"a.qcow2"});
  RangeStatus s = At(1000, 1 * M - 1000);
  EXPECT_EQ(s.kind, Kind::kUnallocated);
  EXPECT_EQ(s.length, 32 * K - 1000);
  s = At(96 * K, 1 * M - 96 * K);  // the table exists; the entries are empty
  EXPECT_EQ(s.kind, Kind::kUnallocated);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_EQ(At(100 * K, 1 * M - 100 * K).kind, Kind::kData);
}

TEST_F(BlockStatusTest, AnswersStayUnderTwoGiB) {
  // 2 MiB clusters: one L2 table covers 512 GiB; QEMU's driver answers in
  // an int, so at most 2^31 - 1 bytes, from any offset.
  Sh("qemu-img create -q -f qcow2 -o cluster_size=2M a.qcow2 4G");
  Open({"a.qcow2"});
  constexpr uint64_t kMax = (uint64_t{1} << 31) - 1;
  RangeStatus s = At(0, 4096 * M);
  EXPECT_EQ(s.kind, Kind::kUnallocated);
  EXPECT_EQ(s.length, kMax);
  EXPECT_EQ(At(kMax, 4096 * M - kMax).length, kMax);
  EXPECT_EQ(At(2 * kMax, 4096 * M - 2 * kMax).length, 2u);
}

TEST_F(BlockStatusTest, ExtendedL2Subclusters) {
  // 64 KiB clusters of 32 subclusters of 2 KiB.
  Sh("qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on a.qcow2 1M");
  Sh("qemu-io -c 'write -P 1 4k 2k' -c 'write -z 8k 4k' a.qcow2");
  Open({"a.qcow2"});
  const uint64_t host = HostOf(0);
  ASSERT_NE(host, 0u);
  // Unallocated subclusters of a mapped cluster keep its place.
  RangeStatus s = At(0, 1 * M);
  EXPECT_EQ(s.kind, Kind::kUnallocated);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_TRUE(s.has_offset);
  EXPECT_EQ(s.host_offset, host);
  s = At(4 * K, 1 * M - 4 * K);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 2 * K);
  EXPECT_EQ(s.host_offset, host + 4 * K);
  s = At(6 * K, 1 * M - 6 * K);
  EXPECT_EQ(s.kind, Kind::kUnallocated);
  EXPECT_EQ(s.length, 2 * K);
  s = At(8 * K, 1 * M - 8 * K);
  EXPECT_EQ(s.kind, Kind::kZero);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_TRUE(s.has_offset);
  EXPECT_EQ(s.host_offset, host + 8 * K);
  s = At(12 * K, 1 * M - 12 * K);
  EXPECT_EQ(s.kind, Kind::kUnallocated);
  EXPECT_EQ(s.length, 64 * K - 12 * K);  // the next cluster has no place
}

TEST_F(BlockStatusTest, RawHolesThroughTheEnv) {
  // MemEnv calls an all-zero 4 KiB block a hole.
  std::vector<std::byte> bytes(40 * K);
  bytes[5 * K] = std::byte{1};
  bytes[13 * K] = std::byte{1};
  mem_.SetContents("/disk.raw", bytes);
  auto opened = BlockOn(OpenImage("/disk.raw", ImageOptions{.env = &mem_, .lock = false}), &mem_);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  dev_ = std::move(*opened);
  RangeStatus s = At(0, 40 * K);
  EXPECT_EQ(s.kind, Kind::kZero);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_TRUE(s.has_offset);
  EXPECT_EQ(s.host_offset, 0u);
  s = At(4 * K + 7, 40 * K - 4 * K - 7);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 4 * K - 7);
  EXPECT_EQ(s.host_offset, 4 * K + 7);
  EXPECT_EQ(*s.file, "/disk.raw");
  s = At(8 * K, 32 * K);
  EXPECT_EQ(s.kind, Kind::kZero);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_EQ(At(12 * K, 28 * K).length, 4 * K);
  // The trailing hole lasts to the end asked for.
  s = At(16 * K, 24 * K);
  EXPECT_EQ(s.kind, Kind::kZero);
  EXPECT_EQ(s.length, 24 * K);
}

TEST_F(BlockStatusTest, ExternalDataFileOffsetsAreInIt) {
  Sh("qemu-img create -q -f qcow2 -o data_file=a.data,data_file_raw=on a.qcow2 1M");
  Sh("qemu-io -c 'write -P 1 128k 64k' a.qcow2");
  Open({"a.qcow2", "a.data"});
  RangeStatus s = At(128 * K, 1 * M - 128 * K);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 64 * K);
  EXPECT_EQ(s.host_offset, 128 * K);
  ASSERT_NE(s.file, nullptr);
  EXPECT_EQ(*s.file, "/a.data");
}

TEST_F(BlockStatusTest, MetadataPreallocationReportsHolesAsZeros) {
  Sh("qemu-img create -q -f qcow2 -o preallocation=metadata a.qcow2 1M");
  Sh("qemu-io -c 'write -P 1 64k 4k' a.qcow2");
  Open({"a.qcow2"});
  // Mapped, but zeros in the file (holes to MemEnv): data reading as zeros.
  RangeStatus s = At(0, 1 * M);
  EXPECT_EQ(s.kind, Kind::kDataZeros);
  EXPECT_EQ(s.length, 64 * K);
  EXPECT_TRUE(s.has_offset);
  EXPECT_EQ(s.host_offset, HostOf(0));
  s = At(64 * K, 1 * M - 64 * K);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 4 * K);
  EXPECT_EQ(At(68 * K, 1 * M - 68 * K).kind, Kind::kDataZeros);
}

TEST_F(BlockStatusTest, WrittenImageIsNotTakenForPreallocated) {
  // Every cluster in use but one holds bytes (4 KiB clusters: one MemEnv
  // block each), so QEMU's guess says "not preallocated" and the cluster of
  // zeros written as data stays data, unlike the case above.
  Sh("qemu-img create -q -f qcow2 -o cluster_size=4096 a.qcow2 1M");
  Sh("qemu-io -c 'write -P 1 0 4k' -c 'write -P 0 4k 4k' -c 'write -P 2 8k 4k' a.qcow2");
  Open({"a.qcow2"});
  RangeStatus s = At(0, 1 * M);
  EXPECT_EQ(s.kind, Kind::kData);
  EXPECT_EQ(s.length, 12 * K);
}

TEST_F(BlockStatusTest, BackingDeviceIsExposed) {
  Sh("qemu-img create -q -f raw base.raw 64k");
  Sh("qemu-img create -q -f qcow2 -b base.raw -F raw a.qcow2 1M");
  Open({"a.qcow2", "base.raw"});
  ASSERT_NE(dev_->backing(), nullptr);
  EXPECT_EQ(dev_->backing()->path(), "/base.raw");
  EXPECT_EQ(dev_->backing()->backing(), nullptr);
}

}  // namespace
}  // namespace uq::qcow2
