// L2 entries that QEMU refuses outright although their bits decode: the zero
// flag in a version 2 image, and an external data file entry whose host
// offset is not its guest offset. QEMU fails the request with EIO (and marks
// a writable image corrupt); reading zeros or another cluster's data instead
// hides data or hands it to the wrong guest offset. Each case shows QEMU's
// verdict on the same image first.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "base/endian.h"
#include "qcow2/header.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;

class RefusedEntryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>(
        std::string("refused-") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(scratch_->ok());
  }
  void Run(const std::string& cmd) {
    std::string out;
    ASSERT_EQ(scratch_->Sh(cmd, &out), 0) << cmd << "\n" << out;
  }
  // qemu-io's output for `cmd` on `image` (it exits 0 even when the I/O fails).
  std::string QemuIo(const std::string& cmd, const std::string& image) {
    std::string out;
    scratch_->Sh(fmt::format("qemu-io -c '{}' {}", cmd, image), &out);
    return out;
  }
  // Sets the L2 entry of guest cluster `index` (first L2 table) to `value`.
  void SetL2Entry(const std::string& image, uint64_t index, uint64_t value) {
    std::vector<std::byte> bytes = scratch_->Slurp(image);
    const uint64_t l1 = LoadBE64(bytes, 40);  // header: l1_table_offset
    const uint64_t l2 = LoadBE64(bytes, l1) & kL1OffsetMask;
    ASSERT_NE(l2, 0u) << "no L2 table";
    StoreBE64(std::span<std::byte>(bytes), l2 + index * 8, value);
    scratch_->Spit(image, bytes);
  }
  Result<std::unique_ptr<BlockDevice>> Open(const std::string& image, bool writable) {
    // Relative data file names are relative to the working directory (QEMU's
    // rule), which for qemu-img here is the scratch directory.
    return BlockOn(OpenImage(
        scratch_->path(image),
        ImageOptions{.env = SyncEnv(), .writable = writable, .working_dir = scratch_->dir()}));
  }
  std::unique_ptr<testing::ScratchDir> scratch_;
};

TEST_F(RefusedEntryTest, ZeroFlagInVersion2ImageFailsTheRead) {
  Run("qemu-img create -q -f qcow2 base.qcow2 1M && qemu-io -c 'write -P 0x33 0 1M' base.qcow2");
  Run("qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 v2.qcow2 1M");
  Run("qemu-io -c 'write -P 0x44 0 64k' v2.qcow2");  // allocates the L2 table
  SetL2Entry("v2.qcow2", 1, kEntryZero);             // cluster 1: zero flag, no offset
  ASSERT_NE(QemuIo("read 64k 64k", "-r v2.qcow2").find("Input/output error"), std::string::npos);

  std::vector<std::byte> buf(kCluster);
  {
    auto dev = Open("v2.qcow2", false);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    EXPECT_TRUE(BlockOn((*dev)->Read(0, buf)).ok());  // cluster 0 is fine
    Status st = BlockOn((*dev)->Read(kCluster, buf));
    EXPECT_TRUE(st.IsCorruption()) << st.ToString();
    EXPECT_NE(st.message().find("version 2"), std::string::npos) << st.ToString();
  }
  // The same flag in a version 3 image is a zero cluster.
  Run("qemu-img amend -o compat=1.1 v2.qcow2");
  auto v3 = Open("v2.qcow2", false);
  ASSERT_TRUE(v3.ok()) << v3.status().ToString();
  ASSERT_TRUE(BlockOn((*v3)->Read(kCluster, buf)).ok());
  EXPECT_TRUE(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_F(RefusedEntryTest, DataFileEntryThatIsNotOneToOneFailsReadsAndWrites) {
  Run("qemu-img create -q -f qcow2 -o data_file=img.data img.qcow2 1M");
  Run("qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 64k 64k' img.qcow2");
  // Guest cluster 1 now names host offset 0 (guest cluster 0's data).
  SetL2Entry("img.qcow2", 1, kEntryCopied | 0);
  // QEMU fails the read. (QEMU 7.2 lets a write through to guest cluster 0's
  // data, which we do not follow: the write fails as the read does.)
  ASSERT_NE(QemuIo("read 64k 64k", "-r img.qcow2").find("Input/output error"), std::string::npos);

  {
    auto dev = Open("img.qcow2", false);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    std::vector<std::byte> buf(kCluster);
    Status st = BlockOn((*dev)->Read(kCluster, buf));
    EXPECT_TRUE(st.IsCorruption()) << st.ToString();
    EXPECT_NE(st.message().find("external data file"), std::string::npos) << st.ToString();
  }
  {
    auto dev = Open("img.qcow2", true);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    std::vector<std::byte> buf(kCluster, std::byte{0x99});
    Status st = BlockOn((*dev)->Write(kCluster, buf, false));
    EXPECT_TRUE(st.IsCorruption()) << st.ToString();
    EXPECT_NE(st.message().find("marked corrupt"), std::string::npos) << st.ToString();
    BlockOn((*dev)->Close());
  }
  // Guest cluster 0's data is untouched, and the image is marked corrupt (as
  // QEMU marks it when a writable open reads the entry).
  std::string out;
  ASSERT_EQ(scratch_->Sh("qemu-io -f raw -c 'read -P 0x11 0 64k' img.data", &out), 0);
  EXPECT_EQ(out.find("Pattern verification failed"), std::string::npos) << out;
  Result<Header> h = ParseHeader(scratch_->Slurp("img.qcow2"), 1 << 20, "img.qcow2");
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_TRUE(h->corrupt());
}

// Neighbours: a zero cluster with a host offset (v2), and an extended-L2 entry
// in a data file that is not 1:1 (only its subcluster bits say "data").
TEST_F(RefusedEntryTest, NeighboursAreRefusedToo) {
  Run("qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M");
  Run("qemu-io -c 'write -P 0x44 0 128k' v2.qcow2");
  std::vector<std::byte> bytes = scratch_->Slurp("v2.qcow2");
  const uint64_t l2 = LoadBE64(bytes, LoadBE64(bytes, 40)) & kL1OffsetMask;
  SetL2Entry("v2.qcow2", 1, LoadBE64(bytes, l2 + 8) | kEntryZero);
  ASSERT_NE(QemuIo("read 64k 64k", "-r v2.qcow2").find("Input/output error"), std::string::npos);

  Run("qemu-img create -q -f qcow2 -o data_file=x.data,extended_l2=on x.qcow2 1M");
  Run("qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 64k 4k' x.qcow2");
  bytes = scratch_->Slurp("x.qcow2");
  const uint64_t xl2 = LoadBE64(bytes, LoadBE64(bytes, 40)) & kL1OffsetMask;
  StoreBE64(std::span<std::byte>(bytes), xl2 + 16, kEntryCopied | 0);  // cluster 1: host 0
  scratch_->Spit("x.qcow2", bytes);
  ASSERT_NE(QemuIo("read 64k 4k", "-r x.qcow2").find("Input/output error"), std::string::npos);

  std::vector<std::byte> buf(4096);
  for (const char* image : {"v2.qcow2", "x.qcow2"}) {
    auto dev = Open(image, false);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    EXPECT_TRUE(BlockOn((*dev)->Read(0, buf)).ok()) << image;
    Status st = BlockOn((*dev)->Read(kCluster, buf));
    EXPECT_TRUE(st.IsCorruption()) << image << ": " << st.ToString();
  }
}

}  // namespace
}  // namespace uq::qcow2
