// SharedMap on its own: publishing, pinning all-or-nothing, revocation that
// waits for the pins, and many threads pinning while one revokes.
#include "qcow2/shared_map.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <random>
#include <thread>
#include <vector>

namespace uq::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;

TEST(SharedMapTest, AcquireReturnsPublishedHostsAndHonoursWritability) {
  SharedMap map(64);
  map.Publish(3, 10 * kCluster, /*writable=*/true);
  map.Publish(4, 20 * kCluster, /*writable=*/false);
  uint64_t hosts[2] = {};
  SharedMap::Pin pin;
  ASSERT_TRUE(map.Acquire(3, 2, /*write=*/false, hosts, &pin));
  EXPECT_EQ(hosts[0], 10 * kCluster);
  EXPECT_EQ(hosts[1], 20 * kCluster);
  SharedMap::Pin write_pin;
  EXPECT_FALSE(map.Acquire(3, 2, /*write=*/true, hosts, &write_pin)) << "cluster 4 is read-only";
  EXPECT_TRUE(map.Acquire(3, 1, /*write=*/true, hosts, &write_pin));
  EXPECT_FALSE(map.Acquire(5, 1, false, hosts, &write_pin)) << "never published";
  EXPECT_EQ(map.acquired(), 2u);
}

TEST(SharedMapTest, AcquireIsAllOrNothing) {
  SharedMap map(64);
  map.Publish(0, kCluster, true);
  map.Publish(2, 3 * kCluster, true);
  uint64_t hosts[3];
  SharedMap::Pin pin;
  EXPECT_FALSE(map.Acquire(0, 3, false, hosts, &pin));  // cluster 1 missing
  // Nothing stayed pinned: revoking needs no wait.
  EXPECT_FALSE(map.Revoke(0));
  EXPECT_FALSE(map.Revoke(2));
}

TEST(SharedMapTest, RevokeOfAnUnpinnedMappingIsImmediate) {
  SharedMap map(64);
  map.Publish(7, kCluster, true);
  EXPECT_FALSE(map.Revoke(7));
  uint64_t host;
  SharedMap::Pin pin;
  EXPECT_FALSE(map.Acquire(7, 1, false, &host, &pin));
  EXPECT_EQ(map.published(), 0u);
}

TEST(SharedMapTest, RevokeAllForAChangeLetsTheEnginePublishAgain) {
  SharedMap map(64);
  map.Publish(1, kCluster, true);
  uint64_t host;
  SharedMap::Pin pin;
  ASSERT_TRUE(map.Acquire(1, 1, false, &host, &pin));
  EXPECT_TRUE(map.RevokeAll(SharedMap::After::kPublish));
  EXPECT_FALSE(map.Acquire(1, 1, false, &host, &pin)) << "revoked";
  pin.Release();
  map.WaitUnpinned();
  map.Publish(2, 2 * kCluster, true);
  ASSERT_TRUE(map.Acquire(2, 1, false, &host, &pin));
  EXPECT_EQ(host, 2 * kCluster);
}

TEST(SharedMapTest, RevokeOfAPinnedMappingWaitsForTheUnpin) {
  SharedMap map(64);
  map.Publish(7, kCluster, true);
  uint64_t host;
  auto pin = std::make_unique<SharedMap::Pin>();
  ASSERT_TRUE(map.Acquire(7, 1, true, &host, pin.get()));
  ASSERT_TRUE(map.Revoke(7)) << "a pin is held";
  // No new request may start on the revoked mapping...
  SharedMap::Pin other;
  EXPECT_FALSE(map.Acquire(7, 1, false, &host, &other));
  // ...nor may a new mapping take the draining slot.
  map.Publish(7, 2 * kCluster, true);
  EXPECT_FALSE(map.Acquire(7, 1, false, &host, &other));

  auto waiter = std::async(std::launch::async, [&] { map.WaitUnpinned(); });
  EXPECT_EQ(waiter.wait_for(std::chrono::milliseconds(100)), std::future_status::timeout)
      << "WaitUnpinned returned while the pin was still held";
  pin.reset();
  EXPECT_EQ(waiter.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  // Drained: the slot takes new mappings again.
  map.Publish(7, 2 * kCluster, true);
  ASSERT_TRUE(map.Acquire(7, 1, false, &host, &other));
  EXPECT_EQ(host, 2 * kCluster);
}

TEST(SharedMapTest, PublishingEvictsOnlyUnpinnedSlots) {
  SharedMap map(4);  // clusters 1 and 5 share slot 1
  map.Publish(1, kCluster, true);
  uint64_t host;
  SharedMap::Pin pin;
  ASSERT_TRUE(map.Acquire(1, 1, false, &host, &pin));
  map.Publish(5, 5 * kCluster, true);  // slot pinned: ignored
  SharedMap::Pin other;
  EXPECT_FALSE(map.Acquire(5, 1, false, &host, &other));
  pin.Release();
  map.Publish(5, 5 * kCluster, true);  // now it evicts cluster 1
  EXPECT_TRUE(map.Acquire(5, 1, false, &host, &other));
  EXPECT_FALSE(map.Acquire(1, 1, false, &host, &pin));
}

TEST(SharedMapTest, RevokeAllDisablesTheMap) {
  SharedMap map(64);
  map.Publish(1, kCluster, true);
  uint64_t host;
  SharedMap::Pin pin;
  ASSERT_TRUE(map.Acquire(1, 1, false, &host, &pin));
  EXPECT_TRUE(map.RevokeAll(SharedMap::After::kStop));
  pin.Release();
  map.WaitUnpinned();
  map.Publish(2, kCluster, true);
  EXPECT_FALSE(map.Acquire(2, 1, false, &host, &pin));
  EXPECT_EQ(map.published(), 0u);
}

// Four threads pin random runs of clusters and mark them in use while they
// hold them; the main thread revokes clusters at random and, after waiting,
// checks that nobody uses them any more, then republishes them.
TEST(SharedMapTest, NoPinSurvivesARevocationUnderContention) {
  constexpr uint64_t kClusters = 64;
  SharedMap map(256);
  std::vector<std::atomic<int>> in_use(kClusters);
  for (uint64_t c = 0; c < kClusters; c++) map.Publish(c, c * kCluster, true);
  std::atomic<bool> stop = false;
  std::atomic<uint64_t> served = 0;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      uint64_t hosts[4];
      while (!stop) {
        const uint64_t first = rng() % (kClusters - 4), count = 1 + rng() % 4;
        SharedMap::Pin pin;
        if (!map.Acquire(first, count, true, hosts, &pin)) continue;
        for (uint64_t i = 0; i < count; i++) {
          EXPECT_EQ(hosts[i], (first + i) * kCluster);
          in_use[first + i]++;
        }
        std::this_thread::yield();
        for (uint64_t i = 0; i < count; i++) in_use[first + i]--;
        served++;
      }
    });
  }
  std::mt19937_64 rng(99);
  // At least 3000 revocations, and go on until the threads have served 2000
  // requests meanwhile (they may start late), within a minute.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(1);
  for (int round = 0;
       round < 3000 || (served < 2000 && std::chrono::steady_clock::now() < deadline); round++) {
    const uint64_t c = rng() % kClusters;
    if (map.Revoke(c)) map.WaitUnpinned();
    ASSERT_EQ(in_use[c].load(), 0) << "cluster " << c << " still in use after its revocation";
    map.Publish(c, c * kCluster, true);
  }
  stop = true;
  for (auto& th : threads) th.join();
  EXPECT_GE(served.load(), 2000u);
}

}  // namespace
}  // namespace uq::qcow2
