// Busy-polling on a kernel that predates IORING_SETUP_COOP_TASKRUN and
// IORING_SETUP_TASKRUN_FLAG (Linux < 5.19). Both kernels here have them, so
// the test stands in for an old one: the link wraps liburing's
// io_uring_queue_init_params (-Wl,--wrap, see BUILD.bazel) and rejects those
// flags with EINVAL, as io_uring_setup does on such a kernel. Asked to poll,
// a ring must then come up without polling and serve as usual, and `bench
// --poll-us` must say that the flag was ignored and still run.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <liburing.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "tools/bench_command.h"
#include "uring/ring.h"

namespace {

// Every setup the wrapper saw, and what it answered.
struct SetupCall {
  uint32_t flags;
  int result;
};
std::vector<SetupCall> setup_calls;

constexpr uint32_t kNewFlags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;

}  // namespace

extern "C" int __real_io_uring_queue_init_params(unsigned entries, io_uring* ring,
                                                 io_uring_params* params);

extern "C" int __wrap_io_uring_queue_init_params(unsigned entries, io_uring* ring,
                                                 io_uring_params* params) {
  int result = (params->flags & kNewFlags) != 0
                   ? -EINVAL
                   : __real_io_uring_queue_init_params(entries, ring, params);
  setup_calls.push_back({params->flags, result});
  return result;
}

namespace uq {
namespace {

TEST(OldKernelTest, RingAskedToPollComesUpWithoutPolling) {
  setup_calls.clear();
  Result<std::unique_ptr<uring::Ring>> created = uring::Ring::Create({.spin_us = 500});
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  uring::Ring& ring = **created;
  // First with the new flags (refused), then without them.
  ASSERT_EQ(setup_calls.size(), 2u);
  EXPECT_EQ(setup_calls[0].flags & kNewFlags, kNewFlags);
  EXPECT_EQ(setup_calls[0].result, -EINVAL);
  EXPECT_EQ(setup_calls[1].flags & kNewFlags, 0u);
  EXPECT_EQ(setup_calls[1].result, 0);
  EXPECT_EQ(ring.spin_us(), 0u);
  EXPECT_EQ(ring.spin_window_ns(), 0);

  // A completion that comes later is slept for, not spun for, and arrives.
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  char byte = 0;
  struct Done final : uring::Completion {
    int count = 0;
    int32_t res = 0;
    void Complete(int32_t r, uint32_t) override {
      ++count;
      res = r;
    }
  } done;
  io_uring_sqe* sqe = ring.GetSqe();
  io_uring_prep_read(sqe, fds[0], &byte, 1, 0);
  io_uring_sqe_set_data64(sqe, uring::UserData::ForCompletion(&done));
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_EQ(::write(fds[1], "x", 1), 1);
  });
  EXPECT_TRUE(ring.Poll());
  writer.join();
  EXPECT_EQ(done.count, 1);
  EXPECT_EQ(done.res, 1);
  EXPECT_EQ(byte, 'x');
  EXPECT_EQ(ring.polled_waits(), 0u);
  EXPECT_EQ(ring.slept_waits(), 1u);
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST(OldKernelTest, BenchSaysPollingIsIgnoredAndRuns) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string image = std::string(tmp ? tmp : "/tmp") + "/old-kernel.raw";
  {
    int fd = ::open(image.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, 1 << 20), 0);
    ::close(fd);
  }
  tools::BenchOptions options;
  options.image = image;
  options.format = "raw";
  options.count = 200;
  options.depth = 4;
  options.write = true;
  options.quiet = true;
  options.poll_us = 50;
  setup_calls.clear();
  ::testing::internal::CaptureStderr();
  ::testing::internal::CaptureStdout();
  Status st = tools::RunBench(options);
  std::string out = ::testing::internal::GetCapturedStdout();
  std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_NE(err.find("--poll-us ignored: the kernel lacks IORING_SETUP_TASKRUN_FLAG"),
            std::string::npos)
      << err;
  EXPECT_NE(out.find("IOPS: "), std::string::npos) << out;
  // The bench's ring was refused the flags once and made without them.
  ASSERT_GE(setup_calls.size(), 2u);
  EXPECT_EQ(setup_calls[0].result, -EINVAL);
  EXPECT_EQ(setup_calls[1].result, 0);
}

}  // namespace
}  // namespace uq
