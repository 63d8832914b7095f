#include "qcow2/metadata_cache.h"

#include <gtest/gtest.h>

#include <deque>

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

}  // namespace
}  // namespace uq::qcow2
