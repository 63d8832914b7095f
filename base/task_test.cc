#include "base/task.h"

#include <gtest/gtest.h>

#include <coroutine>
#include <deque>

#include "base/status.h"
#include "base/wait_list.h"

namespace uq {
namespace {

Task<int> Forty() { co_return 40; }
Task<int> FortyTwo() { co_return co_await Forty() + 2; }

TEST(TaskTest, SynchronousChainCompletes) { EXPECT_EQ(BlockOn(FortyTwo()), 42); }

Task<int> Deep(int n) {
  if (n == 0) co_return 0;
  co_return 1 + co_await Deep(n - 1);
}

TEST(TaskTest, DeepChainsDoNotOverflow) { EXPECT_EQ(BlockOn(Deep(100000)), 100000); }

// An event loop that resumes queued coroutines one per Poll().
class ManualLoop : public EventLoop {
 public:
  auto Yield() {
    struct A {
      ManualLoop* l;
      bool await_ready() { return false; }
      void await_suspend(std::coroutine_handle<> h) { l->q.push_back(h); }
      void await_resume() {}
    };
    return A{this};
  }
  bool Poll() override {
    if (q.empty()) return false;
    auto h = q.front();
    q.pop_front();
    h.resume();
    return true;
  }
  std::deque<std::coroutine_handle<>> q;
};

TEST(TaskTest, BlockOnDrivesLoop) {
  ManualLoop loop;
  auto t = [](ManualLoop* l) -> Task<Result<int>> {
    co_await l->Yield();
    co_await l->Yield();
    co_return 7;
  }(&loop);
  Result<int> r = BlockOn(std::move(t), &loop);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 7);
}

TEST(WaitListTest, WaitersResumeOnNotify) {
  WaitList list;
  int woke = 0;
  for (int i = 0; i < 3; i++) {
    Spawn([](WaitList* l, int* w) -> Task<void> {
      co_await l->Wait();
      ++*w;
    }(&list, &woke));
  }
  EXPECT_EQ(woke, 0);
  list.NotifyAll();
  EXPECT_EQ(woke, 3);
}

TEST(AsyncMutexTest, SerialisesAcrossSuspension) {
  ManualLoop loop;
  AsyncMutex mu;
  int inside = 0, max_inside = 0, done = 0;
  for (int i = 0; i < 4; i++) {
    Spawn([](ManualLoop* l, AsyncMutex* m, int* in, int* mx, int* d) -> Task<void> {
      auto lock = co_await m->Acquire();
      ++*in;
      *mx = std::max(*mx, *in);
      co_await l->Yield();
      --*in;
      ++*d;
    }(&loop, &mu, &inside, &max_inside, &done));
  }
  while (loop.Poll()) {
  }
  EXPECT_EQ(done, 4);
  EXPECT_EQ(max_inside, 1);
  EXPECT_FALSE(mu.locked());
}

}  // namespace
}  // namespace uq
