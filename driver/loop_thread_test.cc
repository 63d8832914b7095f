#include "driver/loop_thread.h"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <thread>
#include <vector>

#include "driver/mailbox.h"

namespace uq::driver {
namespace {

uring::RingOptions SmallRing() {
  uring::RingOptions options;
  options.entries = 16;
  return options;
}

std::unique_ptr<LoopThread> StartLoop(const char* name) {
  Result<std::unique_ptr<LoopThread>> loop = LoopThread::Start(name, SmallRing());
  EXPECT_TRUE(loop.ok()) << loop.status().ToString();
  return loop.ok() ? std::move(loop).value() : nullptr;
}

TEST(MailboxTest, DeliversEveryItemInOrderPerProducer) {
  Result<std::unique_ptr<uring::Ring>> ring = uring::Ring::Create(SmallRing());
  ASSERT_TRUE(ring.ok()) << ring.status().ToString();
  Result<std::unique_ptr<Mailbox<std::pair<int, int>>>> box =
      Mailbox<std::pair<int, int>>::Create();
  ASSERT_TRUE(box.ok());
  std::map<int, int> next;  // producer -> next expected sequence number
  int received = 0;
  bool in_order = true;
  (*box)->Watch(**ring, [&] {
    for (auto [producer, seq] : (*box)->TakeAll()) {
      if (next[producer] != seq) in_order = false;
      next[producer] = seq + 1;
      ++received;
    }
  });

  constexpr int kProducers = 4;
  constexpr int kItems = 5000;
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < kItems; ++i) (*box)->Post({p, i});
    });
  }
  while (received < kProducers * kItems) ASSERT_TRUE((*ring)->Poll());
  for (std::thread& t : producers) t.join();
  EXPECT_TRUE(in_order);
  EXPECT_EQ(received, kProducers * kItems);
  // The read stays armed: one operation in flight.
  EXPECT_EQ((*ring)->in_flight(), 1u);
}

TEST(MailboxTest, ItemPostedBeforeWatchIsDelivered) {
  Result<std::unique_ptr<uring::Ring>> ring = uring::Ring::Create(SmallRing());
  ASSERT_TRUE(ring.ok());
  Result<std::unique_ptr<Mailbox<int>>> box = Mailbox<int>::Create();
  ASSERT_TRUE(box.ok());
  (*box)->Post(7);
  int got = 0;
  (*box)->Watch(**ring, [&] {
    for (int v : (*box)->TakeAll()) got = v;
  });
  while (got == 0) ASSERT_TRUE((*ring)->Poll());
  EXPECT_EQ(got, 7);
}

TEST(LoopThreadTest, CallRunsOnTheLoopThreadWithItsRingBound) {
  std::unique_ptr<LoopThread> loop = StartLoop("test-loop");
  ASSERT_NE(loop, nullptr);
  EXPECT_FALSE(loop->IsCurrent());
  bool current = loop->Call([&] { return loop->IsCurrent(); });
  EXPECT_TRUE(current);
  uring::Ring* bound = loop->Call([] { return uring::Ring::Current(); });
  uring::Ring* own = loop->Call([&] { return &loop->ring(); });
  EXPECT_NE(bound, nullptr);
  EXPECT_EQ(bound, own);
  EXPECT_EQ(uring::Ring::Current(), nullptr);  // not bound here
}

// A task that suspends on the loop's ring and resumes from its Poll().
struct NopOnRing final : uring::Completion {
  std::coroutine_handle<> waiter;
  int32_t res = -1;
  bool await_ready() { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    waiter = h;
    io_uring_sqe* sqe = uring::Ring::Current()->GetSqe();
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, uring::UserData::ForCompletion(this));
  }
  int32_t await_resume() { return res; }
  void Complete(int32_t r, uint32_t) override {
    res = r;
    waiter.resume();
  }
};

TEST(LoopThreadTest, RunTaskWaitsForAnAsynchronousTask) {
  std::unique_ptr<LoopThread> loop = StartLoop("test-task");
  ASSERT_NE(loop, nullptr);
  int result = loop->RunTask<int>([]() -> Task<int> {
    int sum = 0;
    for (int i = 0; i < 10; ++i) {
      NopOnRing nop;
      sum += co_await nop + 1;
    }
    co_return sum;
  });
  EXPECT_EQ(result, 10);
}

TEST(LoopThreadTest, PingPongBetweenTwoLoops) {
  // The shape of a request from queue N: posted to the image's loop, its
  // result posted back.
  std::unique_ptr<LoopThread> a = StartLoop("test-a");
  std::unique_ptr<LoopThread> b = StartLoop("test-b");
  ASSERT_TRUE(a && b);
  std::atomic<int> done{0};
  std::atomic<bool> wrong_thread{false};
  constexpr int kRounds = 2000;
  b->Call([&] {
    for (int i = 0; i < kRounds; ++i) {
      a->Post([&, i] {
        if (!a->IsCurrent()) wrong_thread = true;
        b->Post([&, i] {
          if (!b->IsCurrent()) wrong_thread = true;
          done.fetch_add(1);
        });
      });
    }
  });
  while (done.load() < kRounds) std::this_thread::yield();
  EXPECT_FALSE(wrong_thread.load());
}

TEST(LoopThreadTest, DestructorQuitsAndJoins) {
  std::atomic<int> ran{0};
  {
    std::unique_ptr<LoopThread> loop = StartLoop("test-quit");
    ASSERT_NE(loop, nullptr);
    for (int i = 0; i < 100; ++i) loop->Post([&] { ran.fetch_add(1); });
  }
  EXPECT_EQ(ran.load(), 100);  // posted before Quit: all ran
}

}  // namespace
}  // namespace uq::driver
