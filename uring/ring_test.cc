#include "uring/ring.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <coroutine>
#include <thread>
#include <vector>

#include "base/task.h"

namespace uq::uring {
namespace {

std::unique_ptr<Ring> MakeRing(RingOptions options = {}) {
  Result<std::unique_ptr<Ring>> ring = Ring::Create(options);
  EXPECT_TRUE(ring.ok()) << ring.status().ToString();
  return ring.ok() ? std::move(ring).value() : nullptr;
}

// Counts its completions; optionally re-arms itself `rearm` more times.
struct Counter final : Completion {
  Ring* ring = nullptr;
  int count = 0;
  int rearm = 0;
  int32_t last_res = 1;
  void Complete(int32_t res, uint32_t) override {
    ++count;
    last_res = res;
    if (rearm > 0) {
      --rearm;
      Nop(*ring, UserData::ForCompletion(this));
    }
  }
  static void Nop(Ring& ring, uint64_t user_data) {
    io_uring_sqe* sqe = ring.GetSqe();
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, user_data);
  }
};

// Awaiting a NOP from a coroutine: the pattern UringFile uses, reduced.
struct NopAwaiter final : Completion {
  Ring* ring;
  std::coroutine_handle<> waiter;
  int32_t res = 1;
  explicit NopAwaiter(Ring* r) : ring(r) {}
  bool await_ready() { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    waiter = h;
    Counter::Nop(*ring, UserData::ForCompletion(this));
  }
  int32_t await_resume() { return res; }
  void Complete(int32_t r, uint32_t) override {
    res = r;
    waiter.resume();
  }
};

TEST(UserDataTest, RoundTrips) {
  Counter c;
  uint64_t ud = UserData::ForCompletion(&c);
  EXPECT_EQ(UserData::KindOf(ud), UserData::Kind::kCompletion);
  EXPECT_EQ(UserData::CompletionOf(ud), &c);

  EXPECT_EQ(UserData::KindOf(UserData::Ignore()), UserData::Kind::kIgnore);
  EXPECT_EQ(UserData::KindOf(0), UserData::Kind::kIgnore);

  uint64_t cmd = UserData::ForCommand(UserData::kMaxPayload);
  EXPECT_EQ(UserData::KindOf(cmd), UserData::Kind::kCommand);
  EXPECT_EQ(UserData::PayloadOf(cmd), UserData::kMaxPayload);

  CommandId id{.queue = 4095, .tag = 65535, .op = 0x21};
  uint64_t packed = UserData::ForCommand(id);
  EXPECT_EQ(UserData::KindOf(packed), UserData::Kind::kCommand);
  EXPECT_EQ(CommandId::Unpack(UserData::PayloadOf(packed)), id);
}

TEST(RingTest, CreateChecksOptions) {
  EXPECT_TRUE(Ring::Create({.entries = 0}).status().IsInvalidArgument());
  EXPECT_TRUE(Ring::Create({.entries = 64, .cq_entries = 32}).status().IsInvalidArgument());
  auto ring = MakeRing(
      {.entries = 8, .cq_entries = 64, .sqe128 = true, .extra_opcodes = {IORING_OP_URING_CMD}});
  ASSERT_NE(ring, nullptr);
  EXPECT_TRUE(ring->sqe128());
  EXPECT_FALSE(MakeRing()->sqe128());
}

TEST(RingTest, MissingOpcodeIsNamed) {
  Result<std::unique_ptr<Ring>> ring = Ring::Create({.extra_opcodes = {250}});
  ASSERT_FALSE(ring.ok());
  EXPECT_TRUE(ring.status().IsNotSupported());
  EXPECT_NE(ring.status().message().find("io_uring opcode 250"), std::string::npos)
      << ring.status().ToString();
}

TEST(RingTest, PollReturnsFalseWhenIdle) {
  auto ring = MakeRing();
  EXPECT_EQ(ring->in_flight(), 0u);
  EXPECT_FALSE(ring->Poll());
  EXPECT_EQ(ring->PollNoWait(), 0u);

  Counter c;
  Counter::Nop(*ring, UserData::ForCompletion(&c));
  EXPECT_EQ(ring->in_flight(), 1u);
  EXPECT_TRUE(ring->Poll());
  EXPECT_EQ(c.count, 1);
  EXPECT_EQ(c.last_res, 0);
  EXPECT_EQ(ring->in_flight(), 0u);
  EXPECT_FALSE(ring->Poll());
}

// A read of an empty pipe completes when another thread writes to it. The
// pipe's wake-up reaches the reader as task work, which a thread spinning in
// user space only runs because the kernel flags it (IORING_SQ_TASKRUN).
TEST(RingTest, BusyPollingCatchesACompletionWithoutSleeping) {
  auto ring = MakeRing({.spin_us = 5'000'000});
  ASSERT_EQ(ring->spin_us(), 5'000'000u) << "the kernel refused IORING_SETUP_TASKRUN_FLAG";
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  char byte = 0;
  Counter c;
  io_uring_sqe* sqe = ring->GetSqe();
  io_uring_prep_read(sqe, fds[0], &byte, 1, 0);
  io_uring_sqe_set_data64(sqe, UserData::ForCompletion(&c));
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_EQ(::write(fds[1], "x", 1), 1);
  });
  EXPECT_TRUE(ring->Poll());
  writer.join();
  EXPECT_EQ(c.count, 1);
  EXPECT_EQ(c.last_res, 1);
  EXPECT_EQ(byte, 'x');
  EXPECT_EQ(ring->polled_waits(), 1u);
  EXPECT_EQ(ring->slept_waits(), 0u);
  ::close(fds[0]);
  ::close(fds[1]);
}

// Arms a timeout of `ns` and polls the ring once; returns what completed.
Counter PollForTimeout(Ring& ring, long ns) {
  Counter c;
  __kernel_timespec in{.tv_sec = ns / 1'000'000'000, .tv_nsec = ns % 1'000'000'000};
  io_uring_sqe* sqe = ring.GetSqe();
  io_uring_prep_timeout(sqe, &in, 0, 0);
  io_uring_sqe_set_data64(sqe, UserData::ForCompletion(&c));
  EXPECT_TRUE(ring.Poll());
  return c;
}

// A completion later than the window is waited for in the kernel.
TEST(RingTest, BusyPollingSleepsAfterItsWindow) {
  auto ring = MakeRing({.spin_us = 1000});
  ASSERT_EQ(ring->spin_us(), 1000u);
  auto start = std::chrono::steady_clock::now();
  Counter c = PollForTimeout(*ring, 50'000'000);
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(50));
  EXPECT_EQ(c.count, 1);
  EXPECT_EQ(c.last_res, -ETIME);
  EXPECT_EQ(ring->polled_waits(), 0u);
  EXPECT_EQ(ring->slept_waits(), 1u);
  // Polling would not have caught that wait: the window halves.
  EXPECT_EQ(ring->spin_window_ns(), 500'000);
}

// Long waits shrink the window (a slow or idle device is not polled for);
// short ones grow it back to cover them.
TEST(RingTest, BusyPollingWindowFollowsTheWaits) {
  auto ring = MakeRing({.spin_us = 5000});
  ASSERT_EQ(ring->spin_window_ns(), 5'000'000);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(PollForTimeout(*ring, 50'000'000).count, 1);
  EXPECT_EQ(ring->spin_window_ns(), 78'125);  // 5 ms halved six times
  EXPECT_EQ(ring->polled_waits(), 0u);
  EXPECT_EQ(ring->slept_waits(), 6u);
  // 300 µs waits: the first outlasts the 78 µs window and sleeps, and the
  // window grows to twice it; the next ones are polled for.
  for (int i = 0; i < 5; ++i) EXPECT_EQ(PollForTimeout(*ring, 300'000).count, 1);
  EXPECT_GE(ring->spin_window_ns(), 600'000);
  EXPECT_GE(ring->polled_waits(), 1u);
}

TEST(RingTest, WithoutBusyPollingEveryWaitSleeps) {
  auto ring = MakeRing();
  EXPECT_EQ(ring->spin_us(), 0u);
  EXPECT_EQ(PollForTimeout(*ring, 1'000'000).count, 1);
  EXPECT_EQ(ring->polled_waits(), 0u);
  EXPECT_EQ(ring->slept_waits(), 1u);
}

TEST(RingTest, IgnoredCompletionsAreCounted) {
  auto ring = MakeRing();
  Counter::Nop(*ring, UserData::Ignore());
  EXPECT_EQ(ring->in_flight(), 1u);
  EXPECT_TRUE(ring->Poll());
  EXPECT_EQ(ring->in_flight(), 0u);
}

TEST(RingTest, PollNoWaitDispatchesWhatIsReady) {
  auto ring = MakeRing();
  Counter c;
  for (int i = 0; i < 3; ++i) Counter::Nop(*ring, UserData::ForCompletion(&c));
  size_t dispatched = 0;
  // NOPs complete inline during submission; allow a few rounds regardless.
  for (int round = 0; round < 100 && dispatched < 3; ++round) dispatched += ring->PollNoWait();
  EXPECT_EQ(dispatched, 3u);
  EXPECT_EQ(c.count, 3);
  EXPECT_EQ(ring->in_flight(), 0u);
}

TEST(RingTest, CommandCompletionsGoToTheHandler) {
  struct Handler final : CommandHandler {
    std::vector<CommandId> seen;
    void OnCommandComplete(uint64_t payload, int32_t res, uint32_t) override {
      EXPECT_EQ(res, 0);
      seen.push_back(CommandId::Unpack(payload));
    }
  } handler;
  auto ring = MakeRing({.sqe128 = true});
  ring->set_command_handler(&handler);
  Counter::Nop(*ring, UserData::ForCommand(CommandId{.queue = 2, .tag = 17, .op = 0x20}));
  Counter::Nop(*ring, UserData::ForCommand(CommandId{.queue = 2, .tag = 18, .op = 0x21}));
  while (ring->Poll()) {
  }
  ASSERT_EQ(handler.seen.size(), 2u);
  EXPECT_EQ(handler.seen[0], (CommandId{.queue = 2, .tag = 17, .op = 0x20}));
  EXPECT_EQ(handler.seen[1], (CommandId{.queue = 2, .tag = 18, .op = 0x21}));
}

// More SQEs than the SQ holds, and more completions than the CQ holds: GetSqe
// submits when full, the kernel's overflow list keeps the excess CQEs.
TEST(RingTest, MoreRequestsThanEntries) {
  auto ring = MakeRing({.entries = 4});
  Counter c;
  constexpr int kOps = 1000;
  for (int i = 0; i < kOps; ++i) Counter::Nop(*ring, UserData::ForCompletion(&c));
  EXPECT_EQ(ring->in_flight(), size_t{kOps});
  while (ring->Poll()) {
  }
  EXPECT_EQ(c.count, kOps);
  EXPECT_EQ(ring->in_flight(), 0u);
}

TEST(RingTest, CompletionsMayStartMoreWork) {
  auto ring = MakeRing({.entries = 2});
  Counter c;
  c.ring = ring.get();
  c.rearm = 99;
  Counter::Nop(*ring, UserData::ForCompletion(&c));
  while (ring->Poll()) {
  }
  EXPECT_EQ(c.count, 100);
}

TEST(RingTest, ManyCoroutinesUnderBlockOn) {
  auto ring = MakeRing({.entries = 16});
  Ring* r = ring.get();
  int finished = 0;
  auto worker = [](Ring* r, int* finished) -> Task<void> {
    for (int i = 0; i < 4; ++i) {
      int32_t res = co_await NopAwaiter(r);
      EXPECT_EQ(res, 0);
    }
    ++*finished;
  };
  auto all = [&]() -> Task<int> {
    for (int i = 0; i < 256; ++i) Spawn(worker(r, &finished));
    // The NOPs are only prepared; one more await makes the loop run them all.
    while (finished < 256) co_await NopAwaiter(r);
    co_return finished;
  };
  EXPECT_EQ(BlockOn(all(), r), 256);
  EXPECT_EQ(ring->in_flight(), 0u);
}

// A coroutine deferred while a batch of completions is dispatched resumes
// after every completion of that batch (and whatever they started up to
// their first wait), before the ring waits again.
TEST(RingTest, DeferredCoroutinesRunAfterTheBatch) {
  auto ring = MakeRing();
  ASSERT_NE(ring, nullptr);
  Ring* r = ring.get();
  std::vector<int> order;
  struct DeferAwaiter {
    Ring* ring;
    bool await_ready() { return false; }
    void await_suspend(std::coroutine_handle<> h) { ring->Defer(h); }
    void await_resume() {}
  };
  auto worker = [](Ring* r, int id, bool defer, std::vector<int>* order) -> Task<void> {
    co_await NopAwaiter(r);
    if (defer) {
      co_await DeferAwaiter{r};
      order->push_back(100 + id);
    } else {
      order->push_back(id);
    }
  };
  for (int i = 0; i < 4; ++i) Spawn(worker(r, i, i == 0, &order));
  EXPECT_TRUE(r->Poll());  // one batch: the four NOPs
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 100}));

  // With nothing in flight, Poll() runs what is deferred instead of giving up.
  bool resumed = false;
  Spawn([](Ring* r, bool* resumed) -> Task<void> {
    co_await DeferAwaiter{r};
    *resumed = true;
  }(r, &resumed));
  EXPECT_EQ(r->in_flight(), 0u);
  EXPECT_TRUE(r->Poll());
  EXPECT_TRUE(resumed);
  EXPECT_FALSE(r->Poll());
}

TEST(RingTest, BindNestsAndRestores) {
  auto a = MakeRing();
  auto b = MakeRing();
  EXPECT_EQ(Ring::Current(), nullptr);
  {
    Ring::Bind bind_a(a.get());
    EXPECT_EQ(Ring::Current(), a.get());
    {
      Ring::Bind bind_b(b.get());
      EXPECT_EQ(Ring::Current(), b.get());
      {
        Ring::Bind none(nullptr);
        EXPECT_EQ(Ring::Current(), nullptr);
      }
      EXPECT_EQ(Ring::Current(), b.get());
    }
    EXPECT_EQ(Ring::Current(), a.get());
  }
  EXPECT_EQ(Ring::Current(), nullptr);
}

TEST(RingTest, CreateDoesNotBind) {
  auto ring = MakeRing();
  EXPECT_EQ(Ring::Current(), nullptr);
}

}  // namespace
}  // namespace uq::uring
