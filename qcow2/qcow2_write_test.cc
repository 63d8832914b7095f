// The write path against QEMU as the oracle: a seeded random workload of
// writes, write-zeroes, discards and flushes runs on images qemu-img made,
// mirrored on a plain byte model; afterwards every byte must match the model,
// `qemu-img check` must find no corruption and no leak, and `qemu-img
// compare` must find our image identical to the model.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

struct Case {
  std::string name;
  std::string create;          // qemu-img create options (-o ...)
  uint64_t size;               // virtual size
  std::string backing_create;  // if set: a backing image is made with these options
  std::string prepare;         // qemu-io commands run on the image before us
  bool snapshot = false;       // take an internal snapshot after `prepare`
  bool compress = false;       // make the image by `convert -c` of a patterned raw file
  bool direct = false;         // O_DIRECT (unaligned requests go through bounce buffers)
};

std::ostream& operator<<(std::ostream& o, const Case& c) { return o << c.name; }

class WriteOracleTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>("w-" + GetParam().name);
    ASSERT_TRUE(scratch_->ok());
    dir_ = scratch_->dir();
  }
  void Sh(const std::string& cmd) {
    std::string out;
    ASSERT_EQ(scratch_->Sh(cmd, &out), 0) << cmd << "\n" << out;
  }
  int ShStatus(const std::string& cmd, std::string* out = nullptr) {
    return scratch_->Sh(cmd, out);
  }
  std::vector<std::byte> Slurp(const std::string& name) { return scratch_->Slurp(name); }
  void Spit(const std::string& name, const std::vector<std::byte>& data) {
    scratch_->Spit(name, data);
  }
  std::unique_ptr<testing::ScratchDir> scratch_;
  std::string dir_;
};

TEST_P(WriteOracleTest, RandomWorkloadMatchesModelAndChecksClean) {
  const Case& c = GetParam();
  const std::string img = "img.qcow2";
  std::vector<std::byte> backing_model;
  if (!c.backing_create.empty()) {
    Sh(fmt::format("qemu-img create -f qcow2 {} base.qcow2 {}", c.backing_create, c.size * 3 / 4));
    Sh("qemu-io -c 'write -P 0xb1 0 " + std::to_string(c.size / 2) + "' base.qcow2");
    Sh(fmt::format("qemu-img create -f qcow2 {} -b base.qcow2 -F qcow2 {} {}", c.create, img,
                   c.size));
  } else if (c.compress) {
    Sh(fmt::format("qemu-img create -f raw src.raw {}", c.size));
    Sh(fmt::format("qemu-io -f raw -c 'write -P 0x3c 0 {}' src.raw", c.size / 2));
    Sh(fmt::format("qemu-img convert -c -O qcow2 {} src.raw {}", c.create, img));
  } else {
    Sh(fmt::format("qemu-img create -f qcow2 {} {} {}", c.create, img, c.size));
  }
  if (!c.prepare.empty()) Sh(fmt::format("qemu-io {} {}", c.prepare, img));
  if (c.snapshot) Sh("qemu-img snapshot -c before " + img);
  if (!c.backing_create.empty()) {
    Sh("qemu-img convert -O raw base.qcow2 base.raw");
    backing_model = Slurp("base.raw");
    backing_model.resize(c.size);  // a short backing file reads zeros past its end
  }
  Sh(fmt::format("qemu-img convert -O raw {} model.raw", img));
  std::vector<std::byte> model = Slurp("model.raw");
  ASSERT_EQ(model.size(), c.size);

  // A relative data file name is relative to the working directory, which
  // for qemu-img here was dir_.
  ImageOptions options{.env = SyncEnv(), .writable = true, .direct = c.direct, .working_dir = dir_};
  auto opened = BlockOn(OpenImage(dir_ + "/" + img, options));
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<BlockDevice> dev = std::move(*opened);
  auto* image = static_cast<Qcow2Image*>(dev.get());
  const uint64_t cs = image->geometry().cluster_size;
  const bool v3 = image->header().version >= 3;

  std::mt19937_64 rng(std::hash<std::string>()(c.name));
  auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  for (int op = 0; op < 300; op++) {
    uint64_t len = 1 + pick(std::min<uint64_t>(c.size, 3 * cs + 1000));
    uint64_t off = pick(c.size - len + 1);
    switch (pick(10)) {
      case 0:
      case 1:
      case 2:
      case 3:
      case 4: {
        std::vector<std::byte> data(len);
        uint8_t pattern = static_cast<uint8_t>(1 + pick(250));
        for (uint64_t i = 0; i < len; i++) data[i] = std::byte(pattern + i * 7);
        Status st = BlockOn(dev->Write(off, data, pick(20) == 0));
        ASSERT_TRUE(st.ok()) << "write " << off << "+" << len << ": " << st.ToString();
        std::memcpy(model.data() + off, data.data(), len);
        break;
      }
      case 5:
      case 6: {
        Status st = BlockOn(dev->WriteZeroes(off, len));
        ASSERT_TRUE(st.ok()) << "zero " << off << "+" << len << ": " << st.ToString();
        std::memset(model.data() + off, 0, len);
        break;
      }
      case 7: {
        Status st = BlockOn(dev->Discard(off, len));
        ASSERT_TRUE(st.ok()) << "discard " << off << "+" << len << ": " << st.ToString();
        uint64_t start = (off + cs - 1) / cs * cs;
        uint64_t end = off + len == c.size ? c.size : (off + len) / cs * cs;
        for (uint64_t p = start; p < end; p++) {
          // v3 marks discarded clusters zero; v2 lets the backing file show.
          model[p] = v3 || backing_model.empty() ? std::byte{0} : backing_model[p];
        }
        break;
      }
      case 8: {
        Status st = BlockOn(dev->Flush());
        ASSERT_TRUE(st.ok()) << st.ToString();
        break;
      }
      case 9: {
        std::vector<std::byte> got(len);
        Status st = BlockOn(dev->Read(off, got));
        ASSERT_TRUE(st.ok()) << st.ToString();
        ASSERT_TRUE(std::equal(got.begin(), got.end(), model.begin() + off))
            << "read " << off << "+" << len << " differs from the model after op " << op;
        break;
      }
    }
  }
  Status closed = BlockOn(dev->Close());
  ASSERT_TRUE(closed.ok()) << closed.ToString();
  dev.reset();

  std::string out;
  EXPECT_EQ(ShStatus("qemu-img check " + img, &out), 0) << out;
  Spit("expected.raw", model);
  EXPECT_EQ(ShStatus("qemu-img compare -f qcow2 -F raw " + img + " expected.raw", &out), 0) << out;
  // Our own read path agrees too, after reopening.
  auto reopened =
      BlockOn(OpenImage(dir_ + "/" + img, ImageOptions{.env = SyncEnv(), .working_dir = dir_}));
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  std::vector<std::byte> all(c.size);
  ASSERT_TRUE(BlockOn((*reopened)->Read(0, all)).ok());
  EXPECT_TRUE(all == model);
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, WriteOracleTest,
    ::testing::Values(
        Case{"default_64k", "", 8 << 20}, Case{"c512", "-o cluster_size=512", 2 << 20},
        Case{"c4k_refcount1", "-o cluster_size=4k,refcount_bits=1", 4 << 20},
        Case{"c4k_refcount64", "-o cluster_size=4k,refcount_bits=64", 4 << 20},
        Case{"c2m", "-o cluster_size=2M", 16 << 20}, Case{"v2", "-o compat=0.10", 4 << 20},
        Case{"v2_backing", "-o compat=0.10", 4 << 20, "-o compat=0.10"},
        Case{"extl2_16k", "-o extended_l2=on,cluster_size=16k", 4 << 20},
        Case{"extl2_backing", "-o extended_l2=on,cluster_size=64k", 8 << 20, "-o cluster_size=4k"},
        Case{"backing_short", "", 8 << 20, "-o cluster_size=64k"},
        Case{"snapshot_shared", "-o cluster_size=4k", 4 << 20, "", "-c 'write -P 0x21 0 3M'", true},
        Case{"snapshot_extl2", "-o cluster_size=32k,extended_l2=on", 4 << 20, "",
             "-c 'write -P 0x21 0 2M'", true},
        Case{"compressed_zlib", "-o cluster_size=4k", 4 << 20, "", "", false, true},
        Case{"compressed_zstd", "-o cluster_size=64k,compression_type=zstd", 8 << 20, "", "", false,
             true},
        Case{"data_file", "-o data_file=img.data", 4 << 20},
        Case{"data_file_raw", "-o data_file=img.data,data_file_raw=on", 4 << 20},
        Case{"prealloc_metadata", "-o preallocation=metadata,cluster_size=4k", 4 << 20},
        Case{"refcount_growth_512", "-o cluster_size=512,refcount_bits=64", 24 << 20},
        Case{"direct_compressed", "-o cluster_size=4k", 4 << 20, "", "", false, true, true},
        Case{"direct_extl2_backing", "-o extended_l2=on,cluster_size=64k", 8 << 20,
             "-o cluster_size=4k", "", false, false, true},
        Case{"direct_c512_snapshot", "-o cluster_size=512", 2 << 20, "", "-c 'write -P 0x21 0 1M'",
             true, false, true}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2

namespace uq::qcow2 {
namespace {

// Compressed clusters share a host cluster, each appended after the last.
// When the one cluster holding that host cluster's only reference is
// overwritten and a flush frees the host cluster, an ordinary write may be
// given it; the next compressed cluster must not be appended there, over
// that write's data (found by stress_test).
TEST(WriteCompressedTest, FreedHostClusterIsNotAppendedTo) {
  testing::ScratchDir scratch("wc-freed");
  std::string out;
  ASSERT_EQ(scratch.Sh("qemu-img create -q -f qcow2 -o cluster_size=64k c.qcow2 1M", &out), 0)
      << out;
  auto opened =
      BlockOn(OpenImage(scratch.path("c.qcow2"), ImageOptions{.env = SyncEnv(), .writable = true}));
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  auto* img = static_cast<Qcow2Image*>(opened->get());
  constexpr uint64_t kCluster = 65536;
  const std::vector<std::byte> zeros(kCluster), ones(kCluster, std::byte{1});
  std::vector<std::byte> data(kCluster);
  std::mt19937_64 rng(3);
  for (auto& b : data) b = std::byte(rng());
  // Guest cluster 0: compressed, a few sectors at the start of a new host cluster.
  ASSERT_TRUE(BlockOn(img->WriteCompressed(0, zeros)).ok());
  // Overwritten: its host cluster loses its only reference, and is free after the flush.
  ASSERT_TRUE(BlockOn(img->Write(0, ones, false)).ok());
  ASSERT_TRUE(BlockOn(img->Flush()).ok());
  // Guest clusters 1-3 take new host clusters, the freed one among them.
  for (uint64_t c = 1; c <= 3; c++) {
    ASSERT_TRUE(BlockOn(img->Write(c * kCluster, data, false)).ok());
  }
  // Another compressed cluster: not in the tail of the freed host cluster.
  ASSERT_TRUE(BlockOn(img->WriteCompressed(4 * kCluster, zeros)).ok());
  std::vector<std::byte> back(kCluster);
  for (uint64_t c = 1; c <= 3; c++) {
    ASSERT_TRUE(BlockOn(img->Read(c * kCluster, back)).ok());
    EXPECT_TRUE(back == data) << "guest cluster " << c;
  }
  ASSERT_TRUE(BlockOn(img->Read(4 * kCluster, back)).ok());
  EXPECT_TRUE(back == zeros);
  ASSERT_TRUE(BlockOn(img->Close()).ok());
  opened->reset();
  EXPECT_EQ(scratch.Sh("qemu-img check c.qcow2", &out), 0) << out;
}

// Compressed clusters we write read back right in QEMU, pass its check, and
// survive being overwritten, zeroed and discarded afterwards.
TEST(WriteCompressedTest, QemuReadsWhatWeCompress) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  for (std::string opts : {"cluster_size=4k", "cluster_size=64k,compression_type=zstd",
                           "cluster_size=512", "cluster_size=2M"}) {
    std::string dir = fmt::format("{}/wc-{}", tmp ? tmp : "/tmp", std::hash<std::string>()(opts));
    ASSERT_EQ(std::system(fmt::format("rm -rf {0} && mkdir -p {0} && qemu-img create -q -f qcow2 "
                                      "-o {1} {0}/c.qcow2 9000000",
                                      dir, opts)
                              .c_str()),
              0);
    auto opened =
        BlockOn(OpenImage(dir + "/c.qcow2", ImageOptions{.env = SyncEnv(), .writable = true}));
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    auto* img = static_cast<Qcow2Image*>(opened->get());
    const uint64_t cs = img->geometry().cluster_size;
    const uint64_t size = img->size();
    std::vector<std::byte> model(size);
    std::mt19937_64 rng(7);
    for (uint64_t off = 0; off < size; off += cs) {
      uint64_t len = std::min(cs, size - off);
      // Mostly compressible text-like data, every fifth cluster random.
      for (uint64_t i = 0; i < len; i++) {
        model[off + i] = (off / cs) % 5 == 4 ? std::byte(rng())
                                             : std::byte("qcow2 compressed "[(i + off / cs) % 17]);
      }
      Status st = BlockOn(img->WriteCompressed(off, std::span(model).subspan(off, len)));
      ASSERT_TRUE(st.ok()) << opts << " at " << off << ": " << st.ToString();
    }
    // Mix in ordinary writes over compressed clusters.
    std::vector<std::byte> patch(cs + 100, std::byte{0x77});
    ASSERT_TRUE(BlockOn(img->Write(cs / 2, patch, false)).ok());
    std::copy(patch.begin(), patch.end(), model.begin() + cs / 2);
    ASSERT_TRUE(BlockOn(img->WriteZeroes(3 * cs, cs)).ok());
    std::fill_n(model.begin() + 3 * cs, cs, std::byte{0});
    ASSERT_TRUE(BlockOn(img->Close()).ok());
    opened->reset();
    std::ofstream(dir + "/model.raw", std::ios::binary)
        .write(reinterpret_cast<const char*>(model.data()), model.size());
    EXPECT_EQ(std::system(fmt::format("qemu-img check -q {}/c.qcow2", dir).c_str()), 0) << opts;
    EXPECT_EQ(std::system(
                  fmt::format("qemu-img compare -q -f qcow2 -F raw {0}/c.qcow2 {0}/model.raw", dir)
                      .c_str()),
              0)
        << opts;
    // Most clusters really are compressed: the file is much smaller than the
    // data (not measurable with 512 B clusters, where a compressed cluster
    // still takes a whole sector, nor with 2 MiB ones, where metadata dominates).
    if (cs >= 4096 && cs <= 65536)
      EXPECT_EQ(
          std::system(fmt::format("test $(stat -c %s {0}/c.qcow2) -lt {1}", dir, size / 2).c_str()),
          0)
          << opts;
  }
}

}  // namespace
}  // namespace uq::qcow2

namespace uq::qcow2 {
namespace {

std::string TempDir(const std::string& name) {
  testing::ScratchDir scratch(name);
  EXPECT_TRUE(scratch.ok());
  return scratch.dir();
}

TEST(RefcountTest, OverflowIsRefusedClearly) {
  std::string dir = TempDir("overflow");
  ASSERT_EQ(
      std::system(
          fmt::format("qemu-img create -q -f qcow2 -o refcount_bits=1 {}/a.qcow2 1M", dir).c_str()),
      0);
  auto opened =
      BlockOn(OpenImage(dir + "/a.qcow2", ImageOptions{.env = SyncEnv(), .writable = true}));
  ASSERT_TRUE(opened.ok());
  auto* img = static_cast<Qcow2Image*>(opened->get());
  Status st = BlockOn(img->refcounts()->Increment(0));  // the header cluster already has refcount 1
  ASSERT_TRUE(st.IsNoSpace()) << st.ToString();
  EXPECT_NE(st.message().find("overflow"), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find("a.qcow2"), std::string::npos) << st.ToString();
  // Compressed writes still work: they stop sharing host clusters.
  std::vector<std::byte> text(65536, std::byte{'a'});
  ASSERT_TRUE(BlockOn(img->WriteCompressed(0, text)).ok());
  ASSERT_TRUE(BlockOn(img->WriteCompressed(65536, text)).ok());
  ASSERT_TRUE(BlockOn(img->Close()).ok());
  opened->reset();
  EXPECT_EQ(std::system(fmt::format("qemu-img check -q {}/a.qcow2", dir).c_str()), 0);
}

TEST(CorruptionTest, DataWriteOntoMetadataMarksTheImageCorrupt) {
  std::string dir = TempDir("corrupt");
  ASSERT_EQ(std::system(fmt::format("qemu-img create -q -f qcow2 {0}/a.qcow2 1M && qemu-io -c "
                                    "'write 0 64k' {0}/a.qcow2 >/dev/null",
                                    dir)
                            .c_str()),
            0);
  // Point guest cluster 0's L2 entry at the L1 table's cluster (COPIED set).
  ASSERT_EQ(std::system(fmt::format(R"(python3 - <<'PY'
import struct
p = "{}/a.qcow2"
f = open(p, "r+b")
h = f.read(104)
l1 = struct.unpack(">Q", h[40:48])[0]
f.seek(l1); l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2); f.write(struct.pack(">Q", (1 << 63) | l1))
PY)",
                                    dir)
                            .c_str()),
            0);
  auto opened =
      BlockOn(OpenImage(dir + "/a.qcow2", ImageOptions{.env = SyncEnv(), .writable = true}));
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::vector<std::byte> data(512, std::byte{0xee});
  Status st = BlockOn((*opened)->Write(0, data, false));
  ASSERT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("marked corrupt"), std::string::npos) << st.ToString();
  EXPECT_TRUE((*opened)->read_only());
  opened->reset();
  // The L1 table was not overwritten, and QEMU sees the corrupt bit.
  EXPECT_EQ(
      std::system(fmt::format("qemu-img info {}/a.qcow2 | grep -q 'corrupt: true'", dir).c_str()),
      0);
}

}  // namespace
}  // namespace uq::qcow2

namespace uq::qcow2 {
namespace {

// A writer using lazy refcounts died: the image is dirty and its refcounts
// are stale. Opening it for writing rebuilds them first.
TEST(DirtyImageTest, WritableOpenRebuildsRefcounts) {
  std::string dir = TempDir("dirty");
  ASSERT_EQ(
      std::system(
          fmt::format(
              "qemu-img create -q -f qcow2 -o lazy_refcounts=on {0}/a.qcow2 4M && "
              "(qemu-io -c 'write -P 0x61 0 1M' -c 'sigraise 9' {0}/a.qcow2 >/dev/null 2>&1; true)",
              dir)
              .c_str()),
      0);
  ASSERT_EQ(std::system(fmt::format("qemu-img info {}/a.qcow2 | grep -q 'dirty'", dir).c_str()), 0)
      << "precondition";
  ASSERT_NE(std::system(fmt::format("qemu-img check -q {}/a.qcow2 2>/dev/null", dir).c_str()), 0)
      << "precondition: stale";
  auto opened =
      BlockOn(OpenImage(dir + "/a.qcow2", ImageOptions{.env = SyncEnv(), .writable = true}));
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::vector<std::byte> data(65536, std::byte{0x62});
  ASSERT_TRUE(BlockOn((*opened)->Write(2 << 20, data, false)).ok());
  std::vector<std::byte> back(65536);
  ASSERT_TRUE(BlockOn((*opened)->Read(0, back)).ok());
  EXPECT_EQ(back[0], std::byte{0x61});  // the dead writer's data is kept
  ASSERT_TRUE(BlockOn((*opened)->Close()).ok());
  opened->reset();
  EXPECT_EQ(std::system(fmt::format("qemu-img check -q {}/a.qcow2", dir).c_str()), 0);
  EXPECT_NE(std::system(
                fmt::format(
                    "qemu-img info --output=json {}/a.qcow2 | grep -q '\"dirty-flag\": true'", dir)
                    .c_str()),
            0);
}

}  // namespace
}  // namespace uq::qcow2
