// Qcow2Image::SetRefcountBits through the in-memory Env: every width to every
// width on images qemu-img and qemu-io make (data and compressed clusters,
// an internal snapshot sharing clusters, 512-byte clusters whose refcount
// table has to grow). After each change:
//   - every cluster's refcount reads back as before, except the old refcount
//     table and blocks (now 0) and the new ones (1);
//   - the guest reads the same bytes, and a write after the change works;
//   - the engine's check and `qemu-img check` find nothing, and `qemu-img
//     info` shows the new refcount-bits.
// A width too narrow for some refcount is refused with qemu-img amend's own
// message (asked of qemu-img amend on a copy), leaving the file unchanged.
// Needs qemu-img and qemu-io (Debian qemu-utils) on the PATH.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <set>
#include <string>
#include <vector>

#include "qcow2/check/check.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/refcount_codec.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

using testing::MemEnv;

constexpr int kWidths[] = {1, 2, 4, 8, 16, 32, 64};
constexpr char kPath[] = "/w/img.qcow2";

struct Shape {
  std::string name;
  std::string create;  // extra qemu-img create options
  uint64_t size;
  std::vector<std::string> before_snapshot;  // qemu-io commands
  bool snapshot = false;
  std::vector<std::string> after_snapshot;
  int min_from_bits = 1;  // narrower widths cannot hold the shape's refcounts
};
std::ostream& operator<<(std::ostream& o, const Shape& s) { return o << s.name; }

// The clusters holding the refcount table and blocks `header` names.
std::set<uint64_t> RefcountStructures(MemEnv& mem, const Header& h) {
  const uint64_t cs = h.cluster_size();
  std::set<uint64_t> out;
  std::vector<std::byte> bytes = mem.Contents(kPath);
  for (uint64_t i = 0; i < h.refcount_table_clusters; i++) {
    out.insert(h.refcount_table_offset / cs + i);
  }
  for (uint64_t i = 0; i < uint64_t{h.refcount_table_clusters} * cs / 8; i++) {
    const uint64_t at = h.refcount_table_offset + i * 8;
    uint64_t e = 0;
    for (int b = 0; b < 8; b++) e = e << 8 | static_cast<uint8_t>(bytes[at + b]);
    if (e & kRefcountTableOffsetMask) out.insert((e & kRefcountTableOffsetMask) / cs);
  }
  return out;
}

class RefcountWidthTest : public ::testing::TestWithParam<Shape> {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>("refcount-width-" + GetParam().name);
    ASSERT_TRUE(scratch_->ok());
  }
  void Run(const std::string& cmd) {
    std::string out;
    ASSERT_EQ(scratch_->Sh(cmd, &out), 0) << cmd << "\n" << out;
  }
  // Makes from<bits>.qcow2 in the scratch dir.
  void MakeImage(int bits) {
    const Shape& s = GetParam();
    const std::string name = fmt::format("from{}.qcow2", bits);
    Run(fmt::format("qemu-img create -q -f qcow2 -o refcount_bits={}{} {} {}", bits, s.create, name,
                    s.size));
    auto io = [&](const std::vector<std::string>& cmds) {
      if (cmds.empty()) return;
      std::string args;
      for (const std::string& c : cmds) args += fmt::format(" -c '{}'", c);
      Run(fmt::format("qemu-io{} {}", args, name));
    };
    io(s.before_snapshot);
    if (s.snapshot) Run(fmt::format("qemu-img snapshot -c snap {}", name));
    io(s.after_snapshot);
  }

  // One width change on a fresh in-memory copy of from<from>.qcow2.
  void Change(int from, int to) {
    SCOPED_TRACE(fmt::format("{} bits -> {} bits", from, to));
    const std::string src = scratch_->path(fmt::format("from{}.qcow2", from));
    MemEnv mem;
    ASSERT_TRUE(mem.ImportFromHostFile(src, kPath).ok());
    auto opened = BlockOn(OpenImage(kPath, ImageOptions{.env = &mem, .writable = true}));
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    std::unique_ptr<BlockDevice> dev = std::move(*opened);
    auto* img = dynamic_cast<Qcow2Image*>(dev.get());
    ASSERT_NE(img, nullptr);
    const uint64_t cs = img->geometry().cluster_size;

    // Before: every cluster's refcount, the guest's bytes, the file's bytes.
    const Header old_header = img->header();
    const std::set<uint64_t> old_structures = RefcountStructures(mem, old_header);
    const uint64_t old_clusters = (*mem.FileSize(kPath) + cs - 1) / cs;
    std::vector<uint64_t> before(old_clusters);
    uint64_t max_refcount = 0, max_at = 0;
    for (uint64_t c = 0; c < old_clusters; c++) {
      auto r = BlockOn(img->refcounts()->Get(c));
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      before[c] = *r;
      if (*r > max_refcount) max_refcount = *r, max_at = c;
    }
    std::vector<std::byte> guest(img->size());
    ASSERT_TRUE(BlockOn(img->Read(0, guest)).ok());
    const std::vector<std::byte> file_before = mem.Contents(kPath);

    Status st = BlockOn(img->SetRefcountBits(to));
    if (max_refcount > MaxRefcount(std::countr_zero(static_cast<unsigned>(to)))) {
      // Refused with qemu-img amend's message, nothing written.
      ASSERT_EQ(st.code(), Code::kInvalidArgument) << st.ToString();
      std::string out;
      Run(fmt::format("cp {} amend.qcow2", src));
      ASSERT_EQ(
          scratch_->Sh(fmt::format("qemu-img amend -o refcount_bits={} amend.qcow2", to), &out), 1);
      ASSERT_EQ(out.rfind("qemu-img: ", 0), 0u) << out;
      const std::string qemu = out.substr(10, out.find('\n') - 10);
      EXPECT_EQ(st.message(), fmt::format("{}: {}", kPath, qemu));
      EXPECT_NE(st.message().find(fmt::format("{:#x}", max_at * cs)), std::string::npos);
      EXPECT_EQ(img->header().refcount_order, old_header.refcount_order);
      EXPECT_TRUE(mem.Contents(kPath) == file_before);
      ASSERT_TRUE(BlockOn(dev->Close()).ok());
      refused_++;
      return;
    }
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_EQ(img->header().refcount_bits(), static_cast<uint32_t>(to));

    // Cluster by cluster.
    const std::set<uint64_t> new_structures = RefcountStructures(mem, img->header());
    const uint64_t new_clusters = (*mem.FileSize(kPath) + cs - 1) / cs;
    for (uint64_t c = 0; c < std::max(old_clusters, new_clusters); c++) {
      uint64_t want = c < old_clusters ? before[c] : 0;
      if (old_structures.count(c)) want = 0;
      if (new_structures.count(c)) want = 1;
      auto r = BlockOn(img->refcounts()->Get(c));
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      ASSERT_EQ(*r, want) << "cluster " << c;
    }
    if (to == from) {
      EXPECT_TRUE(mem.Contents(kPath) == file_before);
    }

    // The guest sees the same bytes, and new refcounts serve a write.
    std::vector<std::byte> got(guest.size());
    ASSERT_TRUE(BlockOn(img->Read(0, got)).ok());
    ASSERT_TRUE(got == guest);
    std::vector<std::byte> tail(3 * cs, std::byte{0x5a});
    const uint64_t at = guest.size() - tail.size();
    ASSERT_TRUE(BlockOn(img->Write(at, tail, false)).ok());
    std::copy(tail.begin(), tail.end(), guest.begin() + at);
    ASSERT_TRUE(BlockOn(dev->Close()).ok());

    // The engine's check, then QEMU's view of it.
    {
      auto file = mem.Open(kPath, OpenOptions{});
      ASSERT_TRUE(file.ok());
      auto checked = BlockOn(CheckImage(**file));
      ASSERT_TRUE(checked.ok()) << checked.status().ToString();
      EXPECT_EQ(checked->corruptions, 0u);
      EXPECT_EQ(checked->leaks, 0u);
      EXPECT_TRUE(checked->error.empty()) << checked->error;
    }
    ASSERT_TRUE(mem.ExportToHostFile(kPath, scratch_->path("after.qcow2")).ok());
    std::string out;
    EXPECT_EQ(scratch_->Sh("qemu-img check after.qcow2", &out), 0) << out;
    ASSERT_EQ(scratch_->Sh("qemu-img info --output=json after.qcow2", &out), 0) << out;
    EXPECT_NE(out.find(fmt::format("\"refcount-bits\": {},", to)), std::string::npos) << out;
    Run("qemu-img convert -O raw after.qcow2 after.raw");
    EXPECT_TRUE(scratch_->Slurp("after.raw") == guest);
    changed_++;
    if (img->header().refcount_table_clusters > old_header.refcount_table_clusters) grown_++;
  }

  std::unique_ptr<testing::ScratchDir> scratch_;
  int changed_ = 0, refused_ = 0, grown_ = 0;  // width changes done, refused; tables grown
};

TEST_P(RefcountWidthTest, EveryWidthToEveryWidth) {
  for (int from : kWidths) {
    if (from < GetParam().min_from_bits) continue;
    MakeImage(from);
    if (HasFatalFailure()) return;
    for (int to : kWidths) {
      Change(from, to);
      if (HasFatalFailure()) return;
    }
  }
  std::printf("%s: %d changes (%d grew the table), %d refused\n", GetParam().name.c_str(), changed_,
              grown_, refused_);
  EXPECT_GT(changed_, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RefcountWidthTest,
    ::testing::Values(
        // Data, compressed clusters packed several to a host cluster (their
        // refcounts pass 1 where the width allows), zero clusters.
        Shape{"data_compressed",
              ",cluster_size=4k",
              4 << 20,
              {"write -P 0x11 0 300k", "write -c -P 0x22 1M 64k", "write -c -P 0x23 2M 8k",
               "write -z 3M 64k", "write -P 0x24 3800k 20k"}},
        // An internal snapshot: clusters and L2 tables at refcount 2 (so 1
        // bit is refused), some copied after it.
        Shape{"snapshot",
              "",
              8 << 20,
              {"write -P 0x31 0 1M", "write -P 0x32 5M 200k"},
              true,
              {"write -P 0x33 64k 64k", "write -P 0x34 6M 128k"},
              2},
        // 512-byte clusters and 3 MiB of data: at 64 bits a refcount block
        // covers 64 clusters, so the table grows from one cluster to several
        // (and shrinks back).
        Shape{"table_grows", ",cluster_size=512", 4 << 20, {"write -P 0x41 0 3M"}}),
    [](const ::testing::TestParamInfo<Shape>& info) { return info.param.name; });

TEST(RefcountWidthRefusals, BadWidthsVersion2AndReadOnly) {
  testing::ScratchDir scratch("refcount-width-refusals");
  ASSERT_TRUE(scratch.ok());
  ASSERT_EQ(scratch.Sh("qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M"), 0);
  ASSERT_EQ(scratch.Sh("qemu-img create -q -f qcow2 v3.qcow2 1M"), 0);
  MemEnv mem;
  ASSERT_TRUE(mem.ImportFromHostFile(scratch.path("v2.qcow2"), "/w/v2.qcow2").ok());
  ASSERT_TRUE(mem.ImportFromHostFile(scratch.path("v3.qcow2"), "/w/v3.qcow2").ok());
  auto open = [&](const std::string& path, bool writable) {
    auto r = BlockOn(OpenImage(path, ImageOptions{.env = &mem, .writable = writable}));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(*r) : nullptr;
  };
  {
    auto dev = open("/w/v3.qcow2", true);
    ASSERT_TRUE(dev);
    auto* img = dynamic_cast<Qcow2Image*>(dev.get());
    const std::vector<std::byte> before = mem.Contents("/w/v3.qcow2");
    for (int bits : {0, 3, 12, 128, -16}) {
      Status st = BlockOn(img->SetRefcountBits(bits));
      EXPECT_EQ(st.code(), Code::kInvalidArgument) << bits;
      EXPECT_EQ(st.message(),
                "/w/v3.qcow2: Refcount width must be a power of two and may not exceed 64 bits");
    }
    EXPECT_TRUE(mem.Contents("/w/v3.qcow2") == before);
    ASSERT_TRUE(BlockOn(dev->Close()).ok());
  }
  {
    auto dev = open("/w/v2.qcow2", true);
    ASSERT_TRUE(dev);
    auto* img = dynamic_cast<Qcow2Image*>(dev.get());
    EXPECT_TRUE(BlockOn(img->SetRefcountBits(16)).ok());  // its width already
    Status st = BlockOn(img->SetRefcountBits(8));
    EXPECT_EQ(st.code(), Code::kInvalidArgument);
    EXPECT_EQ(st.message(),
              "/w/v2.qcow2: Different refcount widths than 16 bits require compatibility level "
              "1.1 or above (use compat=1.1 or greater)");
    ASSERT_TRUE(BlockOn(dev->Close()).ok());
  }
  {
    auto dev = open("/w/v3.qcow2", false);
    ASSERT_TRUE(dev);
    auto* img = dynamic_cast<Qcow2Image*>(dev.get());
    EXPECT_EQ(BlockOn(img->SetRefcountBits(8)).code(), Code::kNotSupported);
  }
}

// With the file grown ahead of need (ImageOptions::preallocate), the new
// structures go right after the clusters in use, inside the grown tail, and
// Close still cuts what was grown and not used.
TEST(RefcountWidthPreallocate, NewStructuresFollowTheClustersInUse) {
  testing::ScratchDir scratch("refcount-width-preallocate");
  ASSERT_TRUE(scratch.ok());
  ASSERT_EQ(scratch.Sh("qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 8M"), 0);
  MemEnv mem;
  ASSERT_TRUE(mem.ImportFromHostFile(scratch.path("img.qcow2"), kPath).ok());
  auto opened = BlockOn(
      OpenImage(kPath, ImageOptions{.env = &mem, .writable = true, .preallocate = 4 << 20}));
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<BlockDevice> dev = std::move(*opened);
  auto* img = dynamic_cast<Qcow2Image*>(dev.get());
  std::vector<std::byte> data(256 << 10, std::byte{0x77});
  ASSERT_TRUE(BlockOn(img->Write(0, data, false)).ok());
  ASSERT_TRUE(BlockOn(img->Flush()).ok());
  const uint64_t grown = *mem.FileSize(kPath);
  ASSERT_GE(grown, 4u << 20);  // grown ahead
  ASSERT_TRUE(BlockOn(img->SetRefcountBits(4)).ok());
  EXPECT_LT(img->header().refcount_table_offset, 1u << 20);
  ASSERT_TRUE(BlockOn(img->Write(1 << 20, data, false)).ok());
  ASSERT_TRUE(BlockOn(dev->Close()).ok());
  EXPECT_LT(*mem.FileSize(kPath), 1u << 20);
  ASSERT_TRUE(mem.ExportToHostFile(kPath, scratch.path("after.qcow2")).ok());
  std::string out;
  EXPECT_EQ(scratch.Sh("qemu-img check after.qcow2", &out), 0) << out;
  ASSERT_EQ(scratch.Sh("qemu-img convert -O raw after.qcow2 after.raw"), 0);
  std::vector<std::byte> raw = scratch.Slurp("after.raw");
  ASSERT_EQ(raw.size(), 8u << 20);
  for (uint64_t i = 0; i < raw.size(); i++) {
    const bool written = i < data.size() || (i >= (1 << 20) && i < (1 << 20) + data.size());
    ASSERT_EQ(raw[i], written ? std::byte{0x77} : std::byte{0}) << "byte " << i;
  }
}

}  // namespace
}  // namespace uq::qcow2
