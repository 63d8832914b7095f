// Reads images that qemu-img/qemu-io make through the engine and compares
// them with `qemu-img convert -O raw`. The exhaustive matrix lives in
// tests/oracle; these cases pin the mapping code paths one at a time.
#include "qcow2/qcow2_image.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>

#include "qcow2/bitmap_directory.h"
#include "qcow2/header.h"
#include "qcow2/open_image.h"
#include "qcow2/sync_env.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/recording_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

class Qcow2ImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>(
        std::string("img-") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(scratch_->ok());
  }
  void Run(const std::string& cmd) {
    std::string out;
    ASSERT_EQ(scratch_->Sh(cmd, &out), 0) << cmd << "\n" << out;
  }
  std::string P(const std::string& name) { return scratch_->path(name); }
  std::vector<std::byte> Slurp(const std::string& path) {
    return scratch_->Slurp(path.substr(scratch_->dir().size() + 1));
  }
  std::unique_ptr<BlockDevice> Open(const std::string& name, ImageOptions o = {}) {
    o.env = SyncEnv();
    auto r = BlockOn(OpenImage(P(name), o));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(*r) : nullptr;
  }
  // Reads the whole image in `chunk`-byte requests and compares with QEMU.
  void ExpectSameAsQemu(const std::string& name, uint64_t chunk = 1 << 20) {
    Run(fmt::format("qemu-img convert -O raw '{}' ref.raw", name));
    auto ref = Slurp(P("ref.raw"));
    auto dev = Open(name);
    ASSERT_TRUE(dev);
    ASSERT_EQ(dev->size(), ref.size());
    std::vector<std::byte> got(ref.size());
    for (uint64_t off = 0; off < got.size(); off += chunk) {
      size_t n = std::min<uint64_t>(chunk, got.size() - off);
      Status st = BlockOn(dev->Read(off, std::span(got).subspan(off, n)));
      ASSERT_TRUE(st.ok()) << st.ToString();
    }
    for (size_t i = 0; i < got.size(); i++) {
      ASSERT_EQ(got[i], ref[i]) << name << ": first difference at byte " << i;
    }
  }
  std::unique_ptr<testing::ScratchDir> scratch_;
};

TEST_F(Qcow2ImageTest, EmptyImageReadsZeros) {
  Run("qemu-img create -f qcow2 a.qcow2 5M");
  ExpectSameAsQemu("a.qcow2");
}

TEST_F(Qcow2ImageTest, SmallClustersAcrossL2Tables) {
  Run("qemu-img create -f qcow2 -o cluster_size=512 a.qcow2 300k");
  Run("qemu-io -c 'write -P 0x11 1000 40000' -c 'write -P 0x22 70000 3' -c 'write -z 2048 1024' "
      "a.qcow2");
  ExpectSameAsQemu("a.qcow2", 4096);
  ExpectSameAsQemu("a.qcow2", 777);
}

TEST_F(Qcow2ImageTest, ZeroClustersOverBacking) {
  Run("qemu-img create -f qcow2 base.qcow2 4M");
  Run("qemu-io -c 'write -P 0xaa 0 4M' base.qcow2");
  Run("qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 4M");
  Run("qemu-io -c 'write -z 65536 131072' -c 'write -P 0x55 300000 5000' -c 'discard 1M 64k' "
      "top.qcow2");
  ExpectSameAsQemu("top.qcow2");
}

TEST_F(Qcow2ImageTest, ExtendedL2Subclusters) {
  Run("qemu-img create -f raw base.raw 2M");
  Run("qemu-io -f raw -c 'write -P 0x33 0 2M' base.raw");
  Run("qemu-img create -f qcow2 -o extended_l2=on,cluster_size=64k -b base.raw -F raw top.qcow2 "
      "2M");
  Run("qemu-io -c 'write -P 0x44 2048 100' -c 'write -z 8192 2048' -c 'write -P 0x66 70000 9000' "
      "top.qcow2");
  ExpectSameAsQemu("top.qcow2", 512);
}

TEST_F(Qcow2ImageTest, CompressedDeflateAndZstd) {
  Run("qemu-img create -f raw src.raw 1M");
  Run("qemu-io -f raw -c 'write -P 0x12 0 300k' -c 'write -P 0x34 400k 100k' src.raw");
  for (std::string type : {"zlib", "zstd"}) {
    Run(fmt::format(
        "qemu-img convert -c -O qcow2 -o compression_type={0},cluster_size=4k src.raw c-{0}.qcow2",
        type));
    ExpectSameAsQemu("c-" + type + ".qcow2", 1000);
  }
}

// 32 reads of 64 KiB in flight at once, all inside one 2 MiB compressed
// cluster (completions in random order): each gets QEMU's bytes, and the
// cluster is read (and inflated) once, not once per request.
TEST_F(Qcow2ImageTest, ConcurrentReadsOfOneCompressedClusterInflateItOnce) {
  // Text compresses to ~3/4: the cluster is stored compressed, ~1.5 MiB of it.
  Run("head -c 1600000 /dev/urandom | base64 -w 0 | head -c 2097152 >src.raw && truncate -s 4M "
      "src.raw");
  Run("qemu-img convert -c -O qcow2 -o cluster_size=2M src.raw c.qcow2");
  auto ref = Slurp(P("src.raw"));
  testing::MemEnv mem({.completion = testing::MemEnvOptions::Completion::kDeferred, .seed = 7});
  ASSERT_TRUE(mem.ImportFromHostFile(P("c.qcow2"), "/c.qcow2").ok());
  testing::RecordingEnv env(&mem);
  auto opened = BlockOn(OpenImage("/c.qcow2", ImageOptions{.env = &env, .lock = false}), &mem);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<BlockDevice> dev = std::move(*opened);
  env.reads.clear();
  constexpr int kReads = 32;
  constexpr size_t kChunk = 65536;
  std::vector<std::vector<std::byte>> bufs(kReads, std::vector<std::byte>(kChunk));
  std::vector<Status> results(kReads, Status::IoError("not run"));
  int done = 0;
  for (int i = 0; i < kReads; i++) {
    Spawn([](BlockDevice* d, uint64_t off, std::vector<std::byte>* b, Status* out,
             int* done) -> Task<void> {
      *out = co_await d->Read(off, *b);
      ++*done;
    }(dev.get(), uint64_t(i) * kChunk, &bufs[i], &results[i], &done));
  }
  while (done < kReads && mem.Poll()) {
  }
  ASSERT_EQ(done, kReads);
  for (int i = 0; i < kReads; i++) {
    ASSERT_TRUE(results[i].ok()) << results[i].ToString();
    ASSERT_EQ(0, std::memcmp(bufs[i].data(), ref.data() + i * kChunk, kChunk)) << "read " << i;
  }
  // The compressed cluster is the only read longer than a table slice.
  EXPECT_EQ(std::count_if(env.reads.begin(), env.reads.end(),
                          [](const testing::IoRecord& r) { return r.length > 4096; }),
            1);
  EXPECT_TRUE(BlockOn(dev->Close(), &mem).ok());
}

TEST_F(Qcow2ImageTest, ShortBackingReadsZerosPastItsEnd) {
  Run("qemu-img create -f qcow2 base.qcow2 1M");
  Run("qemu-io -c 'write -P 0x77 0 1M' base.qcow2");
  Run("qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 3M");
  ExpectSameAsQemu("top.qcow2", 300000);
}

TEST_F(Qcow2ImageTest, MissingBackingFileIsAClearError) {
  Run("qemu-img create -f qcow2 base.qcow2 1M");
  Run("qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 1M");
  Run("rm base.qcow2");
  auto r = BlockOn(OpenImage(P("top.qcow2"), ImageOptions{.env = SyncEnv()}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("top.qcow2: backing file"), std::string::npos)
      << r.status().ToString();
  EXPECT_NE(r.status().message().find("No such file"), std::string::npos) << r.status().ToString();
}

TEST_F(Qcow2ImageTest, BackingLoopIsRefused) {
  Run("qemu-img create -f qcow2 a.qcow2 1M && qemu-img create -f qcow2 b.qcow2 1M");
  Run("qemu-img rebase -u -b b.qcow2 -F qcow2 a.qcow2 && qemu-img rebase -u -b a.qcow2 -F qcow2 "
      "b.qcow2");
  auto r = BlockOn(OpenImage(P("a.qcow2"), ImageOptions{.env = SyncEnv()}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("loop"), std::string::npos) << r.status().ToString();
}

TEST_F(Qcow2ImageTest, L2CacheLoadsEachSliceOnce) {
  Run("qemu-img create -f qcow2 a.qcow2 64M");
  Run("qemu-io -c 'write -P 1 0 64M' a.qcow2");
  auto dev = Open("a.qcow2");
  auto* img = static_cast<Qcow2Image*>(dev.get());
  std::vector<std::byte> buf(65536);
  for (int pass = 0; pass < 3; pass++) {
    for (uint64_t off = 0; off < (64u << 20); off += buf.size()) {
      ASSERT_TRUE(BlockOn(img->Read(off, buf)).ok());
    }
  }
  // 1024 clusters = 8 KiB of L2 entries = two 4 KiB slices, each read once.
  EXPECT_EQ(img->l2_cache().loads(), 2u);
}

// QEMU's open reads the table of every consistent bitmap; a writable open also needs each
// table to protect its clusters and load the bits. One read of each table serves all three.
TEST_F(Qcow2ImageTest, WritableOpenReadsEachBitmapTableOnce) {
  Run("qemu-img create -f qcow2 a.qcow2 64M");
  Run("qemu-io -c 'write -P 1 0 1M' a.qcow2");
  Run("qemu-img bitmap --add a.qcow2 b0 && qemu-img bitmap --add a.qcow2 b1");
  Run("qemu-img bitmap --add --disable a.qcow2 off");
  testing::MemEnv mem;
  ASSERT_TRUE(mem.ImportFromHostFile(P("a.qcow2"), "/a.qcow2").ok());
  testing::RecordingEnv env(&mem);
  std::vector<BitmapDirEntry> dir;
  {
    auto file = env.Open("/a.qcow2", OpenOptions{});
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    auto header = BlockOn(ReadHeader(**file));
    ASSERT_TRUE(header.ok()) << header.status().ToString();
    auto read = BlockOn(ReadBitmapDirectory(**file, *header));
    ASSERT_TRUE(read.ok()) << read.status().ToString();
    dir = std::move(*read);
  }
  ASSERT_EQ(dir.size(), 3u);
  env.reads.clear();
  auto opened =
      BlockOn(OpenImage("/a.qcow2", ImageOptions{.env = &env, .writable = true, .lock = false}));
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  for (const BitmapDirEntry& e : dir) {
    const auto table_reads = std::count_if(env.reads.begin(), env.reads.end(),
                                           [&](auto& r) { return r.offset == e.table_offset; });
    EXPECT_EQ(table_reads, 1) << "bitmap " << e.name;
  }
  // And the bits were loaded from it: a write marks the enabled bitmaps, and QEMU finds
  // the image clean and the written range dirty in both, not in the disabled one.
  std::vector<std::byte> data(65536, std::byte{2});
  ASSERT_TRUE(BlockOn((*opened)->Write(8 << 20, data, false)).ok());
  ASSERT_TRUE(BlockOn((*opened)->Close()).ok());
  const std::vector<std::byte> bytes = mem.Contents("/a.qcow2");
  std::ofstream(P("after.qcow2"), std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  Run("qemu-img check after.qcow2");
  for (const char* name : {"b0", "b1", "off"}) {
    std::string out;
    scratch_->Sh(fmt::format("nbdinfo --map=qemu:dirty-bitmap:{} -- "
                             "[ qemu-nbd -r -f qcow2 -B {} after.qcow2 ] | grep dirty",
                             name, name),
                 &out);
    const bool dirty = out.find("8388608       65536    1  dirty") != std::string::npos;
    EXPECT_EQ(dirty, std::string(name) != "off") << name << ": " << out;
  }
}

}  // namespace
}  // namespace uq::qcow2

namespace uq::qcow2 {
namespace {

TEST_F(Qcow2ImageTest, LocksExcludeQemuAndUs) {
  Run("qemu-img create -f qcow2 a.qcow2 1M");
  {
    // We hold it for writing: QEMU may neither write nor read it.
    auto dev = Open("a.qcow2", ImageOptions{.writable = true});
    ASSERT_TRUE(dev);
    EXPECT_NE(std::system(
                  fmt::format("qemu-io -c 'write 0 512' '{}' 2>/dev/null >/dev/null", P("a.qcow2"))
                      .c_str()),
              0);
    EXPECT_NE(std::system(fmt::format("qemu-io -r -c 'read 0 512' '{}' 2>/dev/null >/dev/null",
                                      P("a.qcow2"))
                              .c_str()),
              0);
    // A second writer of ours is refused too, with a clear Busy error.
    auto second =
        BlockOn(OpenImage(P("a.qcow2"), ImageOptions{.env = SyncEnv(), .writable = true}));
    ASSERT_FALSE(second.ok());
    EXPECT_TRUE(second.status().IsBusy()) << second.status().ToString();
    EXPECT_NE(second.status().message().find("in use"), std::string::npos);
  }
  // Closed: QEMU may write again.
  EXPECT_EQ(
      std::system(fmt::format("qemu-io -c 'write 0 512' '{}' >/dev/null", P("a.qcow2")).c_str()),
      0);
  // QEMU holds it: we refuse to write it.
  ASSERT_EQ(
      std::system(fmt::format("(qemu-io -c 'sleep 3000' '{}' >/dev/null &) ; sleep 1", P("a.qcow2"))
                      .c_str()),
      0);
  auto busy = BlockOn(OpenImage(P("a.qcow2"), ImageOptions{.env = SyncEnv(), .writable = true}));
  ASSERT_FALSE(busy.ok());
  EXPECT_TRUE(busy.status().IsBusy()) << busy.status().ToString();
  std::system("sleep 2.5");
}

}  // namespace
}  // namespace uq::qcow2
