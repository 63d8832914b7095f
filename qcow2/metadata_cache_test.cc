#include "qcow2/metadata_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <vector>

#include "qcow2/testing/fault_injection_env.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

// A file whose reads complete only when the test polls, so several requests
// are in flight at once. Byte i of the file reads as (i / 4096) & 0xff.
class DeferredFile final : public File, public EventLoop {
 public:
  Result<uint64_t> Size() override { return uint64_t{1} << 30; }
  Status Truncate(uint64_t) override { return Status::NotSupported("no"); }
  const std::string& path() const override { return path_; }
  bool Start(IoRequest& req) override {
    reads++;
    pending_.push_back(&req);
    return false;
  }
  bool Poll() override {
    if (pending_.empty()) return false;
    IoRequest* r = pending_.front();
    pending_.pop_front();
    if (fail_next) {
      fail_next = false;
      r->result = -EIO;
    } else {
      for (uint64_t i = 0; i < r->length; i++)
        r->data[i] = std::byte((r->offset + i) / 4096 & 0xff);
      r->result = static_cast<int64_t>(r->length);
    }
    r->waiter.resume();
    return true;
  }
  int reads = 0;
  bool fail_next = false;

 private:
  std::string path_ = "deferred.img";
  std::deque<IoRequest*> pending_;
};

TEST(MetadataCacheTest, ConcurrentMissesShareOneLoad) {
  DeferredFile file;
  MetadataCache cache(&file, 4096, 1 << 20);
  int done = 0;
  for (int i = 0; i < 10; i++) {
    Spawn([](MetadataCache* c, int* d) -> Task<void> {
      auto ref = co_await c->Get(8192);
      EXPECT_TRUE(ref.ok());
      EXPECT_EQ(ref->bytes()[0], std::byte{2});
      ++*d;
    }(&cache, &done));
  }
  EXPECT_EQ(file.reads, 1);
  while (file.Poll()) {
  }
  EXPECT_EQ(done, 10);
  EXPECT_EQ(cache.loads(), 1u);
  EXPECT_TRUE(cache.TryGet(8192));
}

TEST(MetadataCacheTest, FailedLoadReachesEveryWaiterAndIsNotCached) {
  DeferredFile file;
  MetadataCache cache(&file, 4096, 1 << 20);
  int failures = 0;
  for (int i = 0; i < 3; i++) {
    Spawn([](MetadataCache* c, int* f) -> Task<void> {
      auto ref = co_await c->Get(0);
      if (!ref.ok()) {
        EXPECT_TRUE(ref.status().IsIoError());
        ++*f;
      }
    }(&cache, &failures));
  }
  file.fail_next = true;
  while (file.Poll()) {
  }
  EXPECT_EQ(failures, 3);
  EXPECT_FALSE(cache.TryGet(0));
  EXPECT_EQ(cache.resident_slices(), 0u);
}

TEST(MetadataCacheTest, StaysWithinCapacityAndKeepsPinnedSlices) {
  DeferredFile file;
  MetadataCache cache(&file, 4096, 8 * 4096);
  MetadataCache::SliceRef pinned;
  Spawn([](MetadataCache* c, MetadataCache::SliceRef* p) -> Task<void> {
    auto ref = co_await c->Get(0);
    *p = std::move(*ref);
  }(&cache, &pinned));
  while (file.Poll()) {
  }
  for (uint64_t i = 1; i < 100; i++) {
    Spawn([](MetadataCache* c, uint64_t off) -> Task<void> { (void)co_await c->Get(off); }(
                                                 &cache, i * 4096));
    while (file.Poll()) {
    }
    EXPECT_LE(cache.resident_slices(), 8u);
  }
  ASSERT_TRUE(pinned);
  EXPECT_EQ(pinned.bytes()[0], std::byte{0});
  EXPECT_TRUE(cache.TryGet(0));  // the pinned slice survived eviction
}

// A file in memory whose reads and writes complete at once, recording each
// write. Byte i starts as (i / 4096) & 0xff.
class RecordingFile final : public File {
 public:
  explicit RecordingFile(size_t size) : bytes(size) {
    for (size_t i = 0; i < size; i++) bytes[i] = std::byte(i / 4096 & 0xff);
  }
  Result<uint64_t> Size() override { return bytes.size(); }
  Status Truncate(uint64_t) override { return Status::NotSupported("no"); }
  const std::string& path() const override { return path_; }
  bool Start(IoRequest& req) override {
    if (req.op == IoRequest::Op::kRead) {
      std::memcpy(req.data, bytes.data() + req.offset, req.length);
    } else if (req.op == IoRequest::Op::kWrite) {
      std::memcpy(bytes.data() + req.offset, req.data, req.length);
      writes.push_back({req.offset, req.length});
    }
    req.result = static_cast<int64_t>(req.length);
    return true;
  }
  std::vector<std::byte> bytes;
  std::vector<std::pair<uint64_t, uint64_t>> writes;  // offset, length

 private:
  std::string path_ = "recording.img";
};

// Loads slices `which` (slice numbers) into the cache and keeps no pin.
void Load(MetadataCache& cache, std::initializer_list<uint64_t> which) {
  for (uint64_t n : which) ASSERT_TRUE(BlockOn(cache.Get(n * 4096)).ok());
}
// Changes the first byte of slice `n` to `value` and marks it dirty.
void Dirty(MetadataCache& cache, uint64_t n, uint8_t value) {
  MetadataCache::SliceRef ref = cache.TryGet(n * 4096);
  ASSERT_TRUE(ref);
  ref.bytes()[0] = std::byte{value};
  cache.MarkDirty(ref);
}

// Dirty slices of one table go out as one write through the clean resident
// slices between them; a gap slice that is not resident or is pinned, or
// the end of the table, splits the run.
TEST(MetadataCacheTest, WritesDirtySlicesOfATableAsRuns) {
  RecordingFile file(128 << 10);
  MetadataCache cache(&file, 4096, 1 << 20, 64 << 10);  // two tables of 16 slices
  Load(cache, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19});
  for (uint64_t n : {1, 3, 4, 9, 15, 16, 19}) Dirty(cache, n, static_cast<uint8_t>(0x80 + n));
  MetadataCache::SliceRef pinned = cache.TryGet(12 * 4096);
  ASSERT_TRUE(BlockOn(cache.WriteDirty()).ok());
  using W = std::pair<uint64_t, uint64_t>;
  std::vector<W> writes = file.writes;
  std::sort(writes.begin(), writes.end());
  // [1, 9]; 12 pinned: [15]; table 1: [16], 18 not resident: [19].
  EXPECT_EQ(writes,
            (std::vector<W>{
                {1 * 4096, 9 * 4096}, {15 * 4096, 4096}, {16 * 4096, 4096}, {19 * 4096, 4096}}));
  EXPECT_EQ(cache.run_writes(), 4u);
  EXPECT_EQ(cache.slices_written(), 7u);
  EXPECT_EQ(cache.dirty_slices(), 0u);
  // The file holds the changes, and the clean slices rewritten as they were.
  for (uint64_t n = 0; n < 32; n++) {
    const bool changed = n == 1 || n == 3 || n == 4 || n == 9 || n == 15 || n == 16 || n == 19;
    EXPECT_EQ(file.bytes[n * 4096], std::byte(changed ? 0x80 + n : n)) << "slice " << n;
    EXPECT_EQ(file.bytes[n * 4096 + 1], std::byte(n)) << "slice " << n;
  }
}

// Without a table extent (the default) every dirty slice is its own write.
TEST(MetadataCacheTest, WithoutTableBytesEachSliceIsOneWrite) {
  RecordingFile file(64 << 10);
  MetadataCache cache(&file, 4096, 1 << 20);
  Load(cache, {0, 1, 2, 3});
  Dirty(cache, 0, 1);
  Dirty(cache, 2, 2);
  ASSERT_TRUE(BlockOn(cache.WriteDirty()).ok());
  EXPECT_EQ(file.writes.size(), 2u);
}

// A crash while a run is being written: power loss tears the one write at
// any sector, so each sector ends up old or new. The clean slices the run
// passes through are rewritten with the bytes they had: torn or not, they
// hold them. A run that fails leaves its slices dirty for the next flush.
TEST(MetadataCacheTest, CrashTearingARunKeepsEverySliceOldOrNew) {
  constexpr uint64_t kTable = 64 << 10;
  std::vector<std::byte> start(kTable);
  for (uint64_t i = 0; i < kTable; i++) start[i] = std::byte((i * 7 + i / 512) & 0xff);
  bool any_torn = false;
  for (uint64_t seed = 0; seed < 40; seed++) {
    testing::MemEnv mem;
    mem.SetContents("t", start);
    testing::FaultInjectionEnv env(&mem);
    auto file = env.Open("t", OpenOptions{.writable = true});
    ASSERT_TRUE(file.ok());
    MetadataCache cache(file->get(), 4096, 1 << 20, kTable);
    for (uint64_t n = 0; n < 16; n++) ASSERT_TRUE(BlockOn(cache.Get(n * 4096)).ok());
    std::vector<std::byte> want_new = start;
    for (uint64_t n : {2, 5, 6, 13}) {
      MetadataCache::SliceRef ref = cache.TryGet(n * 4096);
      for (uint64_t i = 0; i < 4096; i++) {
        ref.bytes()[i] = ~ref.bytes()[i];
        want_new[n * 4096 + i] = ref.bytes()[i];
      }
      cache.MarkDirty(ref);
    }
    const uint64_t before = env.operation_count();
    if (seed == 0) {
      // Crash at the run's write: it fails, and its slices are dirty again.
      env.CrashAtOperation(before);
      EXPECT_FALSE(BlockOn(cache.WriteDirty()).ok());
      EXPECT_EQ(cache.dirty_slices(), 4u);
      continue;
    }
    ASSERT_TRUE(BlockOn(cache.WriteDirty()).ok());
    // Slices 2..13 went out as one write: one boundary.
    EXPECT_EQ(env.operation_count() - before, 1u);
    EXPECT_EQ(cache.run_writes(), 1u);
    ASSERT_TRUE(env.SimulateCrash(testing::CrashMode::kKeepRandomSectors, seed).ok());
    std::vector<std::byte> got = mem.Contents("t");
    ASSERT_EQ(got.size(), kTable);
    int kept = 0;  // changed sectors that reached the disk
    for (uint64_t sector = 0; sector < kTable / 512; sector++) {
      const auto at = [&](const std::vector<std::byte>& v) {
        return std::vector<std::byte>(v.begin() + sector * 512, v.begin() + sector * 512 + 512);
      };
      const bool is_old = at(got) == at(start), is_new = at(got) == at(want_new);
      EXPECT_TRUE(is_old || is_new) << "seed " << seed << " sector " << sector;
      if (is_new && !is_old) kept++;
    }
    any_torn = any_torn || (kept > 0 && kept < 32);
  }
  // Some seeds kept part of the run's changed sectors and dropped the rest.
  EXPECT_TRUE(any_torn);
}

}  // namespace
}  // namespace uq::qcow2
