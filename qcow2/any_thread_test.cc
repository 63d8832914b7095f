// Requests served off the image's thread (Qcow2Image::TryAnyThread): which
// clusters qualify, that they read and write the same bytes the engine
// would, and that a mapping change waits for such requests on other threads.
// QEMU is the oracle for the image afterwards.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <optional>
#include <vector>

#include "base/endian.h"
#include "qcow2/format.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;

class AnyThreadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>(
        std::string("anythread-") +
        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(scratch_->ok());
  }
  // StableMetadataPublishesUnwrittenEntriesReadOnly on an image with or
  // without a backing file.
  void PublishesUnwrittenEntriesReadOnly(bool backing);
  void Sh(const std::string& cmd) {
    std::string out;
    ASSERT_EQ(scratch_->Sh(cmd, &out), 0) << cmd << "\n" << out;
  }
  void Open(bool writable = true) {
    auto opened = BlockOn(OpenImage(scratch_->path("img.qcow2"),
                                    ImageOptions{.env = SyncEnv(), .writable = writable}));
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    dev_ = std::move(*opened);
    img_ = static_cast<Qcow2Image*>(dev_.get());
  }
  // The engine's bytes at [offset, offset + length): this also publishes
  // the mappings it meets.
  std::vector<std::byte> EngineRead(uint64_t offset, size_t length) {
    std::vector<std::byte> out(length);
    Status st = BlockOn(img_->Read(offset, out));
    EXPECT_TRUE(st.ok()) << st.ToString();
    return out;
  }
  // The bytes TryAnyThread serves, or nullopt if it declines.
  std::optional<std::vector<std::byte>> HereRead(uint64_t offset, size_t length) {
    std::vector<std::byte> out(length);
    std::optional<Task<Status>> io = img_->TryAnyThread(false, offset, out);
    if (!io) return std::nullopt;
    Status st = BlockOn(std::move(*io));
    EXPECT_TRUE(st.ok()) << st.ToString();
    return out;
  }
  bool HereWrite(uint64_t offset, std::vector<std::byte> data) {
    std::optional<Task<Status>> io = img_->TryAnyThread(true, offset, data);
    if (!io) return false;
    Status st = BlockOn(std::move(*io));
    EXPECT_TRUE(st.ok()) << st.ToString();
    return true;
  }
  void CloseAndCheck() {
    Status st = BlockOn(img_->Close());
    ASSERT_TRUE(st.ok()) << st.ToString();
    dev_.reset();
    img_ = nullptr;
    Sh("qemu-img check img.qcow2");
  }

  std::unique_ptr<testing::ScratchDir> scratch_;
  std::unique_ptr<BlockDevice> dev_;
  Qcow2Image* img_ = nullptr;
};

TEST_F(AnyThreadTest, ServesOnlyPublishedDataClustersWithTheEnginesBytes) {
  Sh("qemu-img create -f qcow2 img.qcow2 4M");
  // Clusters 0-3 data (back to back in the file), 5 data, 8 compressed,
  // 10 zero, 12 unallocated.
  Sh("qemu-io -c 'write -P 0x11 0 256k' -c 'write -P 0x22 320k 64k' "
     "-c 'write -c -P 0x33 512k 64k' -c 'write -z 640k 64k' img.qcow2");
  Open();
  EXPECT_FALSE(HereRead(0, 4096)) << "nothing published before the engine saw it";
  const std::vector<std::byte> all = EngineRead(0, 1 << 20);
  for (auto [offset, length] : std::vector<std::pair<uint64_t, size_t>>{{0, 4096},
                                                                        {4096, 512},
                                                                        {60 * 1024, 8192},
                                                                        {0, 256 * 1024},
                                                                        {100 * 1024, 100 * 1024},
                                                                        {320 * 1024, 64 * 1024}}) {
    std::optional<std::vector<std::byte>> here = HereRead(offset, length);
    ASSERT_TRUE(here) << "offset " << offset;
    EXPECT_TRUE(std::equal(here->begin(), here->end(), all.begin() + offset))
        << "offset " << offset;
  }
  EXPECT_FALSE(HereRead(250 * 1024, 16 * 1024)) << "runs into unallocated cluster 4";
  EXPECT_FALSE(HereRead(512 * 1024, 4096)) << "compressed";
  EXPECT_FALSE(HereRead(640 * 1024, 4096)) << "zero cluster";
  EXPECT_FALSE(HereRead(768 * 1024, 4096)) << "unallocated";
  EXPECT_GE(img_->shared_map().acquired(), 6u);
  CloseAndCheck();
}

// TryMapAnyThread: the host runs of a published range (what the ublk driver
// moves itself with zero copy). The bytes at those runs of the host file are
// the engine's; clusters back to back in the file make one run; the same
// ranges qualify as for TryAnyThread; the pin holds the clusters.
TEST_F(AnyThreadTest, MapsPublishedRangesToHostRuns) {
  Sh("qemu-img create -f qcow2 img.qcow2 4M");
  // Clusters 0-3 back to back in the file, then 8 (written before 5, so not
  // next to 3), then 5.
  Sh("qemu-io -c 'write -P 0x11 0 256k' -c 'write -c -P 0x33 512k 64k' "
     "-c 'write -P 0x55 576k 64k' -c 'write -P 0x22 320k 64k' img.qcow2");
  Open();
  EXPECT_FALSE(img_->TryMapAnyThread(false, 0, 4096)) << "nothing published yet";
  const std::vector<std::byte> all = EngineRead(0, 1 << 20);
  auto host_bytes = [&](const HostMapping& m, uint64_t length) {
    std::vector<std::byte> out(length);
    for (const HostMapping::Extent& e : m.runs()) {
      EXPECT_EQ(::pread(m.file->fd(), out.data() + e.data_offset, e.length,
                        static_cast<off_t>(e.host_offset)),
                static_cast<ssize_t>(e.length));
    }
    return out;
  };
  std::optional<HostMapping> m = img_->TryMapAnyThread(false, 4096, 200 * 1024);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->count, 1u) << "clusters 0-3 are one run";
  EXPECT_EQ(m->extents[0].data_offset, 0u);
  EXPECT_EQ(m->extents[0].length, 200u * 1024);
  std::vector<std::byte> got = host_bytes(*m, 200 * 1024);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), all.begin() + 4096));
  m.reset();
  // Cluster 9 then nothing published at 10: declined; 5 alone: one run.
  EXPECT_FALSE(img_->TryMapAnyThread(false, 600 * 1024, 64 * 1024));
  EXPECT_FALSE(img_->TryMapAnyThread(false, 512 * 1024, 4096)) << "compressed";
  m = img_->TryMapAnyThread(true, 320 * 1024 + 512, 4096);
  ASSERT_TRUE(m) << "cluster 5 is writable in place";
  EXPECT_EQ(m->count, 1u);
  got = host_bytes(*m, 4096);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), all.begin() + 320 * 1024 + 512));
  m.reset();
  // 192k..384k: clusters 3 (run A), 4 unallocated: declined.
  EXPECT_FALSE(img_->TryMapAnyThread(false, 192 * 1024, 192 * 1024));
  CloseAndCheck();
}

// Persistent bitmaps: a write from another thread waits for the engine to
// mark the bitmaps in use on disk (TryAnyThread declines until then), and
// then sets its bits itself, which the stored bitmap holds.
TEST_F(AnyThreadTest, WritesHereMarkEnabledBitmaps) {
  Sh("qemu-img create -f qcow2 img.qcow2 4M");
  Sh("qemu-io -c 'write -P 0x44 0 2M' img.qcow2");
  Sh("qemu-img bitmap --add -g 4k img.qcow2 b0");
  Sh("qemu-img bitmap --add --disable img.qcow2 b1");
  Open();
  EngineRead(0, 2 << 20);  // publishes the clusters
  EXPECT_FALSE(HereWrite(8192, std::vector<std::byte>(4096, std::byte{1})))
      << "no write here before the bitmaps are in use on disk";
  // The engine's first write marks them in use (and its own bits).
  std::vector<std::byte> data(512, std::byte{2});
  ASSERT_TRUE(BlockOn(img_->Write(0, data, false)).ok());
  EngineRead(0, 2 << 20);
  // Writes from another thread, each a 4 KiB granule or part of one.
  std::vector<std::pair<uint64_t, size_t>> writes = {
      {100 * 1024, 4096}, {1 << 20, 512}, {(1 << 20) + 65536 + 100, 5000}};
  for (auto [offset, length] : writes) {
    std::future<bool> done = std::async(std::launch::async, [&, offset, length] {
      return HereWrite(offset, std::vector<std::byte>(length, std::byte{3}));
    });
    ASSERT_TRUE(done.get()) << "offset " << offset;
  }
  auto b0 = BlockOn(img_->BitmapContents("b0"));
  ASSERT_TRUE(b0.ok());
  std::vector<std::pair<uint64_t, uint64_t>> got;
  for (const auto& e : (*b0)->DirtyExtents()) got.emplace_back(e.offset, e.length);
  const std::vector<std::pair<uint64_t, uint64_t>> want = {
      {0, 4096}, {100 * 1024, 4096}, {1 << 20, 4096}, {(1 << 20) + 65536, 8192}};
  EXPECT_EQ(got, want);
  CloseAndCheck();
  // Stored, not in use; b1 (disabled) untouched.
  std::string out;
  ASSERT_EQ(scratch_->Sh("qemu-img info img.qcow2", &out), 0);
  EXPECT_EQ(out.find("in-use"), std::string::npos) << out;
  Open(false);
  b0 = BlockOn(img_->BitmapContents("b0"));
  ASSERT_TRUE(b0.ok());
  got.clear();
  for (const auto& e : (*b0)->DirtyExtents()) got.emplace_back(e.offset, e.length);
  EXPECT_EQ(got, want);
  auto b1 = BlockOn(img_->BitmapContents("b1"));
  ASSERT_TRUE(b1.ok());
  EXPECT_FALSE((*b1)->Any());
  ASSERT_TRUE(BlockOn(img_->Close()).ok());
}

// A bitmap added while the image serves (a device's `bitmap -n ID --add`):
// the change is stored at once, the writes from then on, here and in the
// engine, set its bits, and they are on disk after the close.
TEST_F(AnyThreadTest, ABitmapAddedLiveTracksWritesFromThenOn) {
  Sh("qemu-img create -f qcow2 img.qcow2 4M");
  Sh("qemu-io -c 'write -P 0x44 0 2M' img.qcow2");
  Open();
  EngineRead(0, 2 << 20);
  ASSERT_TRUE(HereWrite(0, std::vector<std::byte>(4096, std::byte{1}))) << "no bitmap yet";
  Status st = BlockOn(img_->ChangeBitmapsLive(
      [this]() -> Task<Status> { co_return img_->AddBitmap("live", 4096, true); }));
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::string out;
  ASSERT_EQ(scratch_->Sh("qemu-img info -U img.qcow2", &out), 0);
  EXPECT_NE(out.find("name: live"), std::string::npos) << "stored at once: " << out;
  EXPECT_FALSE(HereWrite(8192, std::vector<std::byte>(4096, std::byte{2})))
      << "mappings revoked, and no write here before the bitmap is in use on disk";
  std::vector<std::byte> data(512, std::byte{3});
  ASSERT_TRUE(BlockOn(img_->Write(1 << 20, data, false)).ok());
  EngineRead(0, 2 << 20);
  std::future<bool> here = std::async(std::launch::async, [&] {
    return HereWrite(200 * 1024, std::vector<std::byte>(4096, std::byte{4}));
  });
  ASSERT_TRUE(here.get()) << "published again after the change";
  const std::vector<std::pair<uint64_t, uint64_t>> want = {{200 * 1024, 4096}, {1 << 20, 4096}};
  CloseAndCheck();
  Open(false);
  auto bits = BlockOn(img_->BitmapContents("live"));
  ASSERT_TRUE(bits.ok()) << bits.status().ToString();
  std::vector<std::pair<uint64_t, uint64_t>> got;
  for (const auto& e : (*bits)->DirtyExtents()) got.emplace_back(e.offset, e.length);
  EXPECT_EQ(got, want);
  ASSERT_TRUE(BlockOn(img_->Close()).ok());
}

TEST_F(AnyThreadTest, AMebibyteAtAnyAlignmentIsServedHere) {
  Sh("qemu-img create -f qcow2 img.qcow2 4M");
  Sh("qemu-io -c 'write -P 0x44 0 3M' img.qcow2");
  Open();
  const std::vector<std::byte> all = EngineRead(0, 3 << 20);
  // The device's default largest request, 4 KiB off a cluster boundary:
  // 17 clusters of 64 KiB.
  std::optional<std::vector<std::byte>> here = HereRead(4096, 1 << 20);
  ASSERT_TRUE(here);
  EXPECT_TRUE(std::equal(here->begin(), here->end(), all.begin() + 4096));
  EXPECT_FALSE(HereRead(0, (SharedMap::kMaxPinned + 1) * 64 * 1024))
      << "more clusters than one request may pin go to the engine";
  CloseAndCheck();
}

TEST_F(AnyThreadTest, OneL2SliceLoadPublishesTheWholeSlice) {
  Sh("qemu-img create -f qcow2 img.qcow2 64M");
  // 4 KiB L2 slices hold 512 entries: clusters 0-511 share one.
  Sh("qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 30M 64k' -c 'write -P 0x33 40M 64k' "
     "img.qcow2");
  Open();
  EngineRead(0, 4096);  // loads the slice of clusters 0-511
  std::optional<std::vector<std::byte>> here = HereRead(30 << 20, 4096);
  ASSERT_TRUE(here) << "cluster 480 shares cluster 0's slice";
  EXPECT_EQ((*here)[0], std::byte{0x22});
  EXPECT_TRUE(HereWrite(kCluster, std::vector<std::byte>(4096, std::byte{0x44})));
  EXPECT_FALSE(HereRead(40 << 20, 4096)) << "cluster 640 is in the next slice, not loaded yet";
  CloseAndCheck();
}

TEST_F(AnyThreadTest, WritesInPlaceAndQemuReadsThem) {
  Sh("qemu-img create -f qcow2 img.qcow2 4M");
  Sh("qemu-io -c 'write -P 0x11 0 1M' img.qcow2");
  Open();
  EngineRead(0, 1 << 20);
  // Spanning clusters 1-3; a single sector in cluster 7.
  ASSERT_TRUE(HereWrite(kCluster + 512, std::vector<std::byte>(2 * kCluster, std::byte{0x44})));
  ASSERT_TRUE(HereWrite(7 * kCluster, std::vector<std::byte>(512, std::byte{0x55})));
  EXPECT_FALSE(HereWrite(2 << 20, std::vector<std::byte>(4096, std::byte{0x66}))) << "unallocated";
  // The engine reads what was written here.
  std::vector<std::byte> back = EngineRead(kCluster, 4096);
  EXPECT_EQ(back[511], std::byte{0x11});
  EXPECT_EQ(back[512], std::byte{0x44});
  CloseAndCheck();
  // qemu-io exits 0 either way; it prints "Pattern verification failed".
  std::string out;
  scratch_->Sh(fmt::format("qemu-io -c 'read -P 0x11 0 {}' -c 'read -P 0x44 {} {}' "
                           "-c 'read -P 0x11 {} {}' -c 'read -P 0x55 {} 512' img.qcow2",
                           kCluster + 512, kCluster + 512, 2 * kCluster, 3 * kCluster + 512,
                           kCluster - 512, 7 * kCluster),
               &out);
  EXPECT_EQ(out.find("fail"), std::string::npos) << out;
}

TEST_F(AnyThreadTest, SnapshotSharedClustersAreReadOnlyHereUntilCopied) {
  Sh("qemu-img create -f qcow2 img.qcow2 1M");
  Sh("qemu-io -c 'write -P 0x11 0 1M' img.qcow2");
  Sh("qemu-img snapshot -c s1 img.qcow2");
  Open();
  EngineRead(0, 1 << 20);
  ASSERT_TRUE(HereRead(0, 4096));
  EXPECT_FALSE(HereWrite(0, std::vector<std::byte>(4096, std::byte{0x77}))) << "shared with s1";
  // The engine copies the cluster on write; the old mapping must not serve
  // reads any more, and the new one serves reads and writes.
  std::vector<std::byte> data(4096, std::byte{0x77});
  ASSERT_TRUE(BlockOn(img_->Write(0, data, false)).ok());
  std::optional<std::vector<std::byte>> here = HereRead(0, 4096);
  ASSERT_TRUE(here) << "the new mapping was published by the write";
  EXPECT_EQ((*here)[0], std::byte{0x77});
  EXPECT_TRUE(HereWrite(4096, std::vector<std::byte>(4096, std::byte{0x78})));
  CloseAndCheck();
  std::string out;
  scratch_->Sh("qemu-img snapshot -a s1 img.qcow2 && qemu-io -c 'read -P 0x11 0 1M' img.qcow2",
               &out);
  EXPECT_EQ(out.find("fail"), std::string::npos) << "the snapshot kept its data: " << out;
}

// A snapshot taken while the image serves (`snapshot -n ID -c`) revokes
// every mapping for the change, but only for it: the engine publishes again
// afterwards, so requests are served off its thread again.
TEST_F(AnyThreadTest, ALiveSnapshotDoesNotEndServingHere) {
  Sh("qemu-img create -f qcow2 img.qcow2 1M");
  Sh("qemu-io -c 'write -P 0x11 0 1M' img.qcow2");
  Open();
  EngineRead(0, 1 << 20);
  ASSERT_TRUE(HereWrite(0, std::vector<std::byte>(4096, std::byte{0x22})));
  Snapshot entry;
  entry.name = "s1";
  ASSERT_TRUE(BlockOn(img_->CreateSnapshot(entry)).ok());
  EXPECT_FALSE(HereRead(0, 4096)) << "revoked by the snapshot";
  std::vector<std::byte> data(4096, std::byte{0x33});
  ASSERT_TRUE(BlockOn(img_->Write(0, data, false)).ok());  // copies cluster 0
  EngineRead(0, 1 << 20);
  std::optional<std::vector<std::byte>> here = HereRead(0, 4096);
  ASSERT_TRUE(here) << "the copied cluster is served here again";
  EXPECT_EQ((*here)[0], std::byte{0x33});
  EXPECT_TRUE(HereWrite(4096, std::vector<std::byte>(4096, std::byte{0x44})));
  EXPECT_TRUE(HereRead(512 * 1024, 4096)) << "shared clusters serve reads here";
  CloseAndCheck();
  std::string out;
  scratch_->Sh(
      "qemu-img snapshot -a s1 img.qcow2 && qemu-io -c 'read -P 0x22 0 4k' "
      "-c 'read -P 0x11 4k 1020k' img.qcow2",
      &out);
  EXPECT_EQ(out.find("fail"), std::string::npos) << "the snapshot kept its data: " << out;
}

TEST_F(AnyThreadTest, ExtendedL2PublishesOnlyWhollyAllocatedClusters) {
  Sh("qemu-img create -f qcow2 -o cluster_size=64k,extended_l2=on img.qcow2 1M");
  Sh("qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 64k 8k' img.qcow2");
  Open();
  EngineRead(0, 256 * 1024);
  EXPECT_TRUE(HereRead(0, 4096));
  EXPECT_FALSE(HereRead(kCluster, 4096)) << "only 4 of its 32 subclusters are allocated";
  CloseAndCheck();
}

// A request holding a mapping on another thread delays a discard of that
// cluster until it completes; after it, the cluster is no longer served here.
TEST_F(AnyThreadTest, RemappingWaitsForRequestsOnOtherThreads) {
  Sh("qemu-img create -f qcow2 img.qcow2 1M");
  Sh("qemu-io -c 'write -P 0x11 0 1M' img.qcow2");
  Open();
  EngineRead(0, 1 << 20);
  std::vector<std::byte> data(4096, std::byte{0x99});
  std::optional<Task<Status>> pending = img_->TryAnyThread(true, 2 * kCluster, data);
  ASSERT_TRUE(pending);  // pinned, not started
  // The image's own thread discards cluster 2 (and writes cluster 3, which
  // must not wait).
  auto engine = std::async(std::launch::async, [&] {
    std::vector<std::byte> other(4096, std::byte{0x33});
    EXPECT_TRUE(BlockOn(img_->Write(3 * kCluster, other, false)).ok());
    return BlockOn(img_->Discard(2 * kCluster, kCluster));
  });
  EXPECT_EQ(engine.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout)
      << "the discard did not wait for the request using the cluster";
  ASSERT_TRUE(BlockOn(std::move(*pending)).ok());
  pending.reset();
  ASSERT_EQ(engine.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  ASSERT_TRUE(engine.get().ok());
  EXPECT_FALSE(HereRead(2 * kCluster, 4096)) << "discarded";
  std::vector<std::byte> zeros = EngineRead(2 * kCluster, 4096);
  EXPECT_EQ(zeros[0], std::byte{0});
  CloseAndCheck();
}

TEST_F(AnyThreadTest, BackingFilesPublishNothing) {
  Sh("qemu-img create -f qcow2 base.qcow2 1M");
  Sh("qemu-io -c 'write -P 0x11 0 1M' base.qcow2");
  Sh("qemu-img create -f qcow2 -b base.qcow2 -F qcow2 img.qcow2");
  Sh("qemu-io -c 'write -P 0x22 0 64k' img.qcow2");
  Open();
  EXPECT_EQ(EngineRead(kCluster, 4096)[0], std::byte{0x11});  // from the backing file
  EXPECT_TRUE(HereRead(0, 4096)) << "the top image's own cluster";
  EXPECT_FALSE(HereRead(kCluster, 4096)) << "unallocated in the top image";
  auto* base = static_cast<Qcow2Image*>(img_->backing());
  ASSERT_NE(base, nullptr);
  EXPECT_EQ(base->shared_map().published(), 0u);
  CloseAndCheck();
}

TEST_F(AnyThreadTest, ClosedOrReadOnlyImagesServeNoWritesHere) {
  Sh("qemu-img create -f qcow2 img.qcow2 1M");
  Sh("qemu-io -c 'write -P 0x11 0 1M' img.qcow2");
  Open(/*writable=*/false);
  EngineRead(0, 1 << 20);
  EXPECT_TRUE(HereRead(0, 4096));
  EXPECT_FALSE(HereWrite(0, std::vector<std::byte>(4096, std::byte{0x22}))) << "read-only image";
  ASSERT_TRUE(BlockOn(img_->Close()).ok());
  EXPECT_FALSE(HereRead(0, 4096)) << "closed";
}

// With stable metadata a write is acknowledged once its L2 entry is in the
// file, so that a daemon crash keeps it. A write served here is acknowledged
// without the engine: until the entry of a newly allocated cluster is in the
// file, the cluster must not be writable here, or a crash would unmap data
// that was acknowledged (its L2 entry only in the dead daemon's cache).
TEST_F(AnyThreadTest, StableMetadataPublishesUnwrittenEntriesReadOnly) {
  // Without a backing file the new cluster replaces zeros, and its entry is
  // written beside its data (EntryBesideDataWrite); with one, after it.
  for (bool backing : {false, true}) {
    SCOPED_TRACE(backing ? "with a backing file" : "without");
    PublishesUnwrittenEntriesReadOnly(backing);
  }
}

void AnyThreadTest::PublishesUnwrittenEntriesReadOnly(bool backing) {
  Sh("rm -f img.qcow2 base.qcow2 && qemu-img create -q -f qcow2 base.qcow2 4M");
  Sh(backing ? "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2"
             : "qemu-img create -q -f qcow2 img.qcow2 4M");
  testing::MemEnv mem(testing::MemEnvOptions{
      .completion = testing::MemEnvOptions::Completion::kDeferred, .seed = 7});
  ASSERT_TRUE(mem.ImportFromHostFile(scratch_->path("img.qcow2"), "/w/img.qcow2").ok());
  ASSERT_TRUE(mem.ImportFromHostFile(scratch_->path("base.qcow2"), "/w/base.qcow2").ok());
  auto opened = BlockOn(
      OpenImage("/w/img.qcow2",
                ImageOptions{
                    .env = &mem, .writable = true, .stable_metadata = true, .working_dir = "/w"}),
      &mem);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  dev_ = std::move(*opened);
  img_ = static_cast<Qcow2Image*>(dev_.get());

  // An allocating write of cluster 1, its I/O completed one step at a time;
  // after each step, would a write be served here? (Rounds write entries
  // after releasing the metadata mutex, so lookups run meanwhile.)
  std::vector<std::byte> data(kCluster, std::byte{0x33});
  Status written = Status::IoError("not run");
  bool done = false;
  Spawn([](BlockDevice* d, std::span<const std::byte> b, Status* out, bool* done) -> Task<void> {
    *out = co_await d->Write(kCluster, b, false);
    *done = true;
  }(dev_.get(), data, &written, &done));
  std::vector<std::byte> probe(4096, std::byte{0x44});
  // Engine reads of the cluster all along: each lookup publishes it again,
  // also while the round that writes its entry is in flight.
  std::vector<std::byte> seen(4096);
  bool reading = false;
  int steps = 0;
  // Whether the file holds cluster 1's new entry (the L2 table of L1[0]).
  auto entry_in_file = [&mem] {
    std::vector<std::byte> file = mem.Contents("/w/img.qcow2");
    const uint64_t l1 = LoadBE64(file, 40);
    const uint64_t l2 = LoadBE64(file, l1) & kL1OffsetMask;
    return l2 != 0 && LoadBE64(file, l2 + 8) != 0;
  };
  int served_unwritten = 0;
  while (!done) {
    if (!reading) {
      reading = true;
      Spawn([](Qcow2Image* img, std::span<std::byte> out, bool* reading) -> Task<void> {
        (void)co_await img->Read(kCluster, out);
        *reading = false;
      }(img_, seen, &reading));
    }
    if (!mem.Poll()) break;
    steps++;
    // (Not run: a write served here would land after the entry's write,
    // which is all that matters.)
    if (img_->TryAnyThread(true, kCluster, probe) && !entry_in_file()) served_unwritten++;
  }
  while (reading && mem.Poll()) {
  }
  ASSERT_TRUE(done);
  ASSERT_FALSE(reading);
  ASSERT_TRUE(written.ok()) << written.ToString();
  EXPECT_GT(steps, 1);
  EXPECT_EQ(served_unwritten, 0) << "a write was served in a cluster whose entry was not written";

  // Once the entry is in the file, the next lookup publishes it writable.
  std::vector<std::byte> back(4096);
  ASSERT_TRUE(BlockOn(img_->Read(kCluster, back), &mem).ok());
  EXPECT_EQ(back[0], std::byte{0x33});
  std::optional<Task<Status>> io = img_->TryAnyThread(true, kCluster, probe);
  ASSERT_TRUE(io) << "published writable once stable";
  EXPECT_TRUE(BlockOn(std::move(*io), &mem).ok());
  ASSERT_TRUE(BlockOn(img_->Close(), &mem).ok());
  dev_.reset();
  img_ = nullptr;
}

}  // namespace
}  // namespace uq::qcow2
