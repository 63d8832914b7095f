// How allocating writes touch the disk: a new cluster is written whole in one
// write (zeros around the data), also when it reuses a cluster holding old
// bytes; writes queued behind the allocation of their cluster or subcluster
// go in its write (queued_writes.h), or, arriving later, write side by side
// once it is done, not one at a time; a new extended-L2 cluster lets writes
// into its other subclusters go beside its first; and extended-L2
// subcluster allocation never undoes a concurrent in-place write.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/recording_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

using testing::MemEnv;
using testing::MemEnvOptions;
using testing::RecordingEnv;

class AllocatingWriteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<testing::ScratchDir>(
        std::string("alloc-") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(scratch_->ok());
  }
  void Sh(const std::string& cmd) {
    std::string out;
    ASSERT_EQ(scratch_->Sh(cmd, &out), 0) << cmd << "\n" << out;
  }
  // Opens host file `name` of the scratch directory, in `mem`, writable.
  void Open(MemEnv* mem, Env* env, const std::string& name) {
    ASSERT_TRUE(mem->ImportFromHostFile(scratch_->path(name), "/" + name).ok());
    auto opened = BlockOn(
        OpenImage("/" + name, ImageOptions{.env = env, .writable = true, .working_dir = "/"}), mem);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    dev_ = std::move(*opened);
    image_ = static_cast<Qcow2Image*>(dev_.get());
  }
  // Closes the image, puts it back on the host and has qemu-img check it.
  void CloseAndCheck(MemEnv* mem, const std::string& name) {
    ASSERT_TRUE(BlockOn(dev_->Close(), mem).ok());
    dev_.reset();
    ASSERT_TRUE(mem->ExportToHostFile("/" + name, scratch_->path(name)).ok());
    Sh("qemu-img check " + name);
  }
  uint64_t HostOf(MemEnv* mem, uint64_t guest) {
    auto e = BlockOn(image_->LookupEntry(guest), mem);
    EXPECT_TRUE(e.ok());
    return e.ok() ? e->host_cluster() : 0;
  }
  // Runs `count` writes of `size` bytes of `fill` from `offset` on, all at
  // once; or, with `first_alone`, the first until it has started a write of
  // at least `size` bytes (its data) and then the others. Returns the most operations MemEnv
  // held in flight at any one time after that.
  size_t ConcurrentWrites(MemEnv* mem, RecordingEnv* env, uint64_t offset, int count, size_t size,
                          uint8_t fill, bool first_alone) {
    std::vector<std::byte> data(size, std::byte{fill});
    int done = 0, failed = 0;
    auto spawn = [&](int i) {
      Spawn([](BlockDevice* d, uint64_t off, std::span<const std::byte> b, int* done,
               int* failed) -> Task<void> {
        if (!(co_await d->Write(off, b, false)).ok()) ++*failed;
        ++*done;
      }(dev_.get(), offset + i * size, data, &done, &failed));
    };
    int next = 0;
    if (first_alone) {
      spawn(next++);
      auto started = [&] {
        return std::any_of(env->writes.begin(), env->writes.end(),
                           [&](const testing::IoRecord& w) { return w.length >= size; });
      };
      while (!started() && mem->Poll()) {
      }
      EXPECT_TRUE(started());
    }
    while (next < count) spawn(next++);
    size_t peak = mem->pending();
    while (mem->Poll()) peak = std::max(peak, mem->pending());
    EXPECT_EQ(done, count);
    EXPECT_EQ(failed, 0);
    return peak;
  }

  // Asserts that [host, host + length) got exactly one write, of all of it.
  static void ExpectOneWriteOf(const RecordingEnv& env, uint64_t host, uint64_t length) {
    std::vector<testing::IoRecord> writes = env.WritesTouching(host, length);
    ASSERT_EQ(writes.size(), 1u);
    EXPECT_EQ(writes[0].offset, host);
    EXPECT_EQ(writes[0].length, length);
  }
  static MemEnvOptions Deferred(uint64_t seed) {
    return {.completion = MemEnvOptions::Completion::kDeferred,
            .seed = seed,
            .max_completions_per_poll = 1};
  }

  std::unique_ptr<testing::ScratchDir> scratch_;
  std::unique_ptr<BlockDevice> dev_;
  Qcow2Image* image_ = nullptr;
};

// One write for the whole new cluster: a later in-place write into it then
// finds its blocks written (not preallocated-unwritten, which the file
// system would convert on each write).
TEST_F(AllocatingWriteTest, NewClusterIsWrittenWholeOnce) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=64k img.qcow2 4M");
  MemEnv mem;
  RecordingEnv env(&mem);
  Open(&mem, &env, "img.qcow2");
  std::vector<std::byte> data(4096, std::byte{0xa5});
  ASSERT_TRUE(BlockOn(dev_->Write(65536 + 8192, data, false), &mem).ok());
  const uint64_t host = HostOf(&mem, 65536);
  ASSERT_NE(host, 0u);
  ExpectOneWriteOf(env, host, 65536);

  std::vector<std::byte> cluster(65536);
  ASSERT_TRUE(BlockOn(dev_->Read(65536, cluster), &mem).ok());
  std::vector<std::byte> expected(65536);
  std::fill_n(expected.begin() + 8192, 4096, std::byte{0xa5});
  EXPECT_TRUE(cluster == expected);
  CloseAndCheck(&mem, "img.qcow2");
  Sh("qemu-io -c 'read -P 0 0 73728' -c 'read -P 0xa5 73728 4096' -c 'read -P 0 77824 53248' "
     "img.qcow2");
}

// A free cluster inside the file may hold old bytes: allocating it must write
// the zeros around the data.
TEST_F(AllocatingWriteTest, ReusedClusterStillGetsItsZeros) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=64k img.qcow2 4M");
  Sh("qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 64k 64k' -c 'discard 0 64k' img.qcow2");
  // QEMU punched the freed cluster's hole; put stale bytes back into it.
  // Guest 64k lives at 0x60000, the freed cluster is 0x50000.
  Sh("qemu-img map --output=json img.qcow2 | grep -q '\"offset\": 393216'");
  Sh("head -c 65536 /dev/zero | tr '\\0' '\\377' | "
     "dd of=img.qcow2 bs=65536 seek=5 conv=notrunc status=none");  // freed cluster 0x50000
  MemEnv mem;
  RecordingEnv env(&mem);
  Open(&mem, &env, "img.qcow2");
  std::vector<std::byte> data(4096, std::byte{0xa5});
  ASSERT_TRUE(BlockOn(dev_->Write(3 * 65536 + 4096, data, false), &mem).ok());
  ASSERT_EQ(HostOf(&mem, 3 * 65536), 5u * 65536) << "the test needs the freed cluster reused";
  ExpectOneWriteOf(env, 5 * 65536, 65536);
  CloseAndCheck(&mem, "img.qcow2");
  Sh("qemu-io -c 'read -P 0 192k 4k' -c 'read -P 0xa5 196k 4k' -c 'read -P 0 200k 56k' "
     "-c 'read -P 0x22 64k 64k' img.qcow2");
}

// Sixteen 4 KiB writes into one new cluster at once: the first allocates it
// and takes the other fifteen along in its one write. (Its L2 table exists
// but is not cached: all sixteen find the cluster unallocated while the
// slice loads, and queue for the cluster's exclusive lock.)
TEST_F(AllocatingWriteTest, WritesQueuedBehindAnAllocationGoInItsWrite) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=64k img.qcow2 4M");
  Sh("qemu-io -c 'write -P 0x77 0 64k' img.qcow2");
  MemEnv mem(Deferred(3));
  RecordingEnv env(&mem);
  Open(&mem, &env, "img.qcow2");
  ConcurrentWrites(&mem, &env, 2 * 65536, 16, 4096, 0x5c, false);
  const uint64_t host = HostOf(&mem, 2 * 65536);
  ExpectOneWriteOf(env, host, 65536);
  CloseAndCheck(&mem, "img.qcow2");
  Sh("qemu-io -c 'read -P 0x77 0 64k' -c 'read -P 0 64k 64k' -c 'read -P 0x5c 128k 64k' "
     "-c 'read -P 0 192k 64k' img.qcow2");
}

// The same for one new 64 KiB subcluster of an allocated 2 MiB cluster.
TEST_F(AllocatingWriteTest, WritesQueuedBehindASubclusterAllocationGoInItsWrite) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=2M,extended_l2=on img.qcow2 8M");
  Sh("qemu-io -c 'write -P 0x77 0 64k' img.qcow2");
  MemEnv mem(Deferred(5));
  RecordingEnv env(&mem);
  Open(&mem, &env, "img.qcow2");
  ConcurrentWrites(&mem, &env, 3 * 65536, 16, 4096, 0x5d, false);
  const uint64_t host = HostOf(&mem, 0) + 3 * 65536;
  ExpectOneWriteOf(env, host, 65536);
  CloseAndCheck(&mem, "img.qcow2");
  Sh("qemu-io -c 'read -P 0x77 0 64k' -c 'read -P 0 64k 128k' -c 'read -P 0x5d 192k 64k' "
     "-c 'read -P 0 256k 1792k' img.qcow2");
}

// Over a backing file: writes taken along that cover the whole cluster leave
// nothing to copy from the backing file; covering half of it, only the other
// half is read.
TEST_F(AllocatingWriteTest, WritesTakenAlongSpareTheCopyTheyCover) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=64k base.qcow2 4M");
  Sh("qemu-io -c 'write -P 0xb1 0 4M' base.qcow2");
  for (int writes : {16, 8}) {
    SCOPED_TRACE(fmt::format("{} writes of 4 KiB", writes));
    Sh("rm -f img.qcow2 && qemu-img create -q -f qcow2 -o cluster_size=64k -b base.qcow2 "
       "-F qcow2 img.qcow2 4M");
    MemEnv mem(Deferred(11));
    ASSERT_TRUE(mem.ImportFromHostFile(scratch_->path("base.qcow2"), "/base.qcow2").ok());
    RecordingEnv env(&mem);
    // Load cluster 1's L2 slice of both images first, so that only the copy
    // can read the backing file afterwards.
    Open(&mem, &env, "img.qcow2");
    std::vector<std::byte> probe(512);
    ASSERT_TRUE(BlockOn(dev_->Read(65536, probe), &mem).ok());
    env.reads.clear();
    ConcurrentWrites(&mem, &env, 65536, writes, 4096, 0x5c, false);
    std::vector<testing::IoRecord> copies = env.ReadsOf("/base.qcow2");
    if (writes == 16) {
      EXPECT_EQ(copies.size(), 0u);
    } else {
      ASSERT_EQ(copies.size(), 1u);
      EXPECT_EQ(copies[0].length, 32768u);
    }
    CloseAndCheck(&mem, "img.qcow2");
    Sh(
        fmt::format("qemu-io -c 'read -P 0xb1 0 64k' -c 'read -P 0x5c 64k {0}' "
                    "-c 'read -P 0xb1 {1} {2}' img.qcow2",
                    writes * 4096, 65536 + writes * 4096, 4 * 1048576 - 65536 - writes * 4096));
  }
}

// Writes that arrive once the allocation has made its write cannot go in it:
// they wait for it, then must be in flight together, not one at a time.
TEST_F(AllocatingWriteTest, WritesArrivingAfterTheAllocationsWriteGoTogether) {
  for (const char* options : {"cluster_size=64k", "cluster_size=2M,extended_l2=on"}) {
    SCOPED_TRACE(options);
    Sh(fmt::format("qemu-img create -q -f qcow2 -o {} img.qcow2 8M", options));
    Sh("qemu-io -c 'write -P 0x77 0 64k' img.qcow2");
    MemEnv mem(Deferred(7));
    RecordingEnv env(&mem);
    Open(&mem, &env, "img.qcow2");
    EXPECT_GE(ConcurrentWrites(&mem, &env, 3 * 65536, 16, 4096, 0x5e, true), 15u);
    CloseAndCheck(&mem, "img.qcow2");
    Sh("qemu-io -c 'read -P 0x77 0 64k' -c 'read -P 0 64k 128k' -c 'read -P 0x5e 192k 64k' "
       "-c 'read -P 0 256k 1792k' img.qcow2");
  }
}

// Extended L2, a cluster with no host cluster yet: its first write maps it
// empty and then writes like any other, so writes into its other
// subclusters arriving meanwhile are in flight together with it, not held
// back until its data is on disk (a sequential writer's queue drained at
// every new cluster).
TEST_F(AllocatingWriteTest, NewExtendedL2ClusterTakesWritesBesideItsFirst) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=2M,extended_l2=on img.qcow2 8M");
  Sh("qemu-io -c 'write -P 0x77 4M 64k' img.qcow2");  // the L2 table exists; cluster 0 does not
  MemEnv mem(Deferred(13));
  RecordingEnv env(&mem);
  Open(&mem, &env, "img.qcow2");
  EXPECT_EQ(ConcurrentWrites(&mem, &env, 0, 16, 65536, 0x6a, true), 16u);
  CloseAndCheck(&mem, "img.qcow2");
  Sh("qemu-io -c 'read -P 0x6a 0 1M' -c 'read -P 0 1M 3M' -c 'read -P 0x77 4M 64k' img.qcow2");
}

// The same with an external data file, where the cluster's place is fixed
// (the guest offset) and mapping it allocates nothing.
TEST_F(AllocatingWriteTest, NewExtendedL2ClusterInADataFileTakesWritesBesideItsFirst) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=2M,extended_l2=on,data_file=img.data "
     "img.qcow2 8M");
  Sh("qemu-io -c 'write -P 0x77 4M 64k' img.qcow2");
  MemEnv mem(Deferred(14));
  ASSERT_TRUE(mem.ImportFromHostFile(scratch_->path("img.data"), "/img.data").ok());
  RecordingEnv env(&mem);
  Open(&mem, &env, "img.qcow2");
  EXPECT_EQ(ConcurrentWrites(&mem, &env, 2 << 20, 16, 65536, 0x6b, true), 16u);
  ASSERT_TRUE(mem.ExportToHostFile("/img.data", scratch_->path("img.data")).ok());
  CloseAndCheck(&mem, "img.qcow2");
  Sh("qemu-io -c 'read -P 0 0 2M' -c 'read -P 0x6b 2M 1M' -c 'read -P 0 3M 1M' "
     "-c 'read -P 0x77 4M 64k' img.qcow2");
}

// A write spanning an allocated and an unallocated subcluster allocates the
// second; meanwhile another request writes in place into the allocated one,
// outside the first request's bytes. Neither may lose the other's data,
// whatever order the I/O completes in.
TEST_F(AllocatingWriteTest, SubclusterAllocationKeepsConcurrentInPlaceWrites) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=2M,extended_l2=on img.qcow2 8M");
  Sh("qemu-io -c 'write -P 0x77 0 64k' img.qcow2");
  for (uint64_t seed = 1; seed <= 20; seed++) {
    SCOPED_TRACE(fmt::format("seed {}", seed));
    Sh("cp img.qcow2 run.qcow2");
    MemEnv mem(Deferred(seed));
    Open(&mem, &mem, "run.qcow2");
    std::vector<std::byte> spanning(65536, std::byte{0xa1}), in_place(4096, std::byte{0xb2});
    int done = 0;
    auto write = [](BlockDevice* d, uint64_t off, std::span<const std::byte> b,
                    int* done) -> Task<void> {
      EXPECT_TRUE((co_await d->Write(off, b, false)).ok());
      ++*done;
    };
    Spawn(write(dev_.get(), 32768, spanning, &done));  // second half of sc 0, first of sc 1
    Spawn(write(dev_.get(), 0, in_place, &done));      // sc 0, allocated
    while (mem.Poll()) {
    }
    ASSERT_EQ(done, 2);
    CloseAndCheck(&mem, "run.qcow2");
    Sh("qemu-io -c 'read -P 0xb2 0 4k' -c 'read -P 0x77 4k 28k' -c 'read -P 0xa1 32k 64k' "
       "-c 'read -P 0 96k 32k' run.qcow2");
  }
}

}  // namespace
}  // namespace uq::qcow2
