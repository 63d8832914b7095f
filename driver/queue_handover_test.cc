// QueueWorker's handover to a new daemon (upgrade: BeginHandover, QUIESCE_DEV,
// EndHandover; see "Handing over" in queue.h) without ublk.
//
// The test plays the kernel. The worker runs on a real LoopThread, its
// "/dev/ublkcN" a memfd that holds the queue's descriptor area (queue 0's is
// at offset 0, and the worker maps it read-only as it maps the char device).
// Each command the worker issues is a URING_CMD on that memfd, which
// io_uring fails at once (a memfd has no uring_cmd); the failed CQE still
// carries the command's CommandId, so a recorder installed as the ring's
// command handler, in the worker's place, lists exactly what the worker
// asked of the kernel. The kernel's answers (a request on a tag, an abort)
// go to the worker as the ring would give them, through OnCommandComplete
// on the loop thread. Requests are flushes on a device that holds each
// flush until the test lets it go: a request stays "being served" as long
// as the test wants.
//
// No production seam was needed: OnCommandComplete is the worker's public
// CommandHandler interface, Ring::set_command_handler picks who sees the
// command CQEs, and QueueConfig::char_fd takes any mappable fd.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <linux/ublk_cmd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <ostream>
#include <thread>
#include <type_traits>
#include <vector>

#include "base/wait_list.h"
#include "driver/image_host.h"
#include "driver/loop_thread.h"
#include "driver/queue.h"
#include "driver/ublk_abi.h"
#include "qcow2/block_device.h"
#include "uring/user_data.h"

namespace uq::uring {
// For gtest's messages.
inline void PrintTo(const CommandId& id, std::ostream* os) {
  *os << fmt::format("{}(tag {})",
                     id.op == 1   ? "FETCH"
                     : id.op == 2 ? "COMMIT_AND_FETCH"
                                  : "op?",
                     id.tag);
}
}  // namespace uq::uring

namespace uq::driver {
namespace {

using uring::CommandId;

constexpr uint16_t kDepth = 4;
constexpr uint8_t kFetch = static_cast<uint8_t>(IoCommand::kFetch);
constexpr uint8_t kCommit = static_cast<uint8_t>(IoCommand::kCommitAndFetch);

CommandId Fetch(uint16_t tag) { return CommandId{0, tag, kFetch}; }
CommandId Commit(uint16_t tag) { return CommandId{0, tag, kCommit}; }

// A disk whose flushes wait for Release(): a flush request is served until
// the test lets it complete.
class HeldFlushDevice final : public qcow2::BlockDevice {
 public:
  uint64_t size() const override { return 1 << 20; }
  bool read_only() const override { return false; }
  const std::string& path() const override { return path_; }
  Task<Status> Read(uint64_t, std::span<std::byte> out) override {
    std::memset(out.data(), 0, out.size());
    co_return Status::Ok();
  }
  Task<Status> Flush() override {
    if (hold) co_await held_.Wait();
    co_return Status::Ok();
  }
  // Completes the oldest held flush; false if none is held. Loop thread.
  bool Release() { return held_.NotifyOne(); }

  bool hold = false;  // loop thread

 private:
  std::string path_ = "held-flush";
  WaitList held_;
};

// Every command CQE: which command the worker issued.
class Recorder final : public uring::CommandHandler {
 public:
  void OnCommandComplete(uint64_t payload, int32_t, uint32_t) override {
    issued.push_back(CommandId::Unpack(payload));
  }
  std::vector<CommandId> issued;  // loop thread
};

class QueueHandoverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    page_ = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    area_bytes_ = DescriptorAreaSize(kDepth, page_);
    ASSERT_EQ(DescriptorAreaOffset(0, page_), 0u);
    char_fd_ = ::memfd_create("fake-ublkc", MFD_CLOEXEC);
    ASSERT_GE(char_fd_, 0) << std::strerror(errno);
    ASSERT_EQ(::ftruncate(char_fd_, static_cast<off_t>(area_bytes_)), 0) << std::strerror(errno);
    void* area = ::mmap(nullptr, area_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, char_fd_, 0);
    ASSERT_NE(area, MAP_FAILED) << std::strerror(errno);
    descriptors_ = static_cast<ublksrv_io_desc*>(area);

    uring::RingOptions options;
    options.entries = 32;
    options.sqe128 = true;  // PrepUringCmd fills 128-byte SQEs
    Result<std::unique_ptr<LoopThread>> loop = LoopThread::Start("test-q0", options);
    ASSERT_TRUE(loop.ok()) << loop.status().ToString();
    loop_ = std::move(loop).value();
    host_ = std::make_unique<ImageHost>(loop_.get(), &device_);

    QueueConfig config;
    config.queue = 0;
    config.depth = kDepth;
    config.buffer_bytes = static_cast<uint32_t>(page_);
    config.char_fd = char_fd_;
    worker_ = std::make_unique<QueueWorker>(
        config, loop_.get(), host_.get(), [this] { ++finished_; },
        [this](Status s) { errors_.push_back(s.ToString()); });
    Status started = OnLoop([this] {
      idle_in_flight_ = loop_->ring().in_flight();
      Status s = worker_->Start();
      loop_->ring().set_command_handler(&recorder_);
      return s;
    });
    ASSERT_TRUE(started.ok()) << started.ToString();
    ASSERT_EQ(Issued(), (std::vector<CommandId>{Fetch(0), Fetch(1), Fetch(2), Fetch(3)}));
  }

  void TearDown() override {
    OnLoop([this] {
      device_.hold = false;
      while (device_.Release()) {
      }
    });
    EXPECT_EQ(OnLoop([this] { return errors_; }), std::vector<std::string>{});
    worker_.reset();
    host_.reset();
    loop_.reset();
    if (descriptors_ != nullptr) ::munmap(descriptors_, area_bytes_);
    if (char_fd_ >= 0) ::close(char_fd_);
  }

  template <class F>
  auto OnLoop(F fn) -> std::invoke_result_t<F> {
    return loop_->Call(fn);
  }

  // The commands issued since the last call, once the ring has handed
  // every one of them back (only the mailbox's read is left in flight).
  std::vector<CommandId> Issued() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (OnLoop([this] { return loop_->ring().in_flight(); }) > idle_in_flight_) {
      if (std::chrono::steady_clock::now() > deadline) {
        ADD_FAILURE() << "commands still in flight after 10 s";
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return OnLoop([this] {
      std::vector<CommandId> out(recorder_.issued.begin() + seen_, recorder_.issued.end());
      seen_ = recorder_.issued.size();
      return out;
    });
  }

  // The kernel: a flush request on `tag` completes its pending command.
  void Request(uint16_t tag) {
    descriptors_[tag] = ublksrv_io_desc{};
    descriptors_[tag].op_flags = UBLK_IO_OP_FLUSH;
    Complete(tag, UBLK_IO_RES_OK);
  }
  // The kernel: `tag`'s pending command is aborted (STOP_DEV, QUIESCE_DEV).
  void Abort(uint16_t tag) { Complete(tag, UBLK_IO_RES_ABORT); }
  void Complete(uint16_t tag, int32_t res) {
    // The op of the tag's last command, as the kernel's CQE would carry it.
    uint8_t op = kFetch;
    OnLoop([&] {
      for (const CommandId& id : recorder_.issued) {
        if (id.tag == tag) op = id.op;
      }
      worker_->OnCommandComplete(CommandId{0, tag, op}.Pack(), res, 0);
    });
  }

  void HoldFlushes() {
    OnLoop([this] { device_.hold = true; });
  }
  // Completes the oldest request being served.
  bool FinishOneRequest() {
    return OnLoop([this] { return device_.Release(); });
  }

  int finished() {
    return OnLoop([this] { return finished_; });
  }
  uint64_t requests() {
    return OnLoop([this] { return worker_->requests(); });
  }
  uint64_t left() {
    return OnLoop([this] { return worker_->left(); });
  }
  uint64_t not_aborted() {
    return OnLoop([this] { return worker_->not_aborted(); });
  }

  HeldFlushDevice device_;
  Recorder recorder_;
  uint64_t page_ = 0;
  size_t area_bytes_ = 0;
  int char_fd_ = -1;
  ublksrv_io_desc* descriptors_ = nullptr;
  std::unique_ptr<LoopThread> loop_;
  std::unique_ptr<ImageHost> host_;
  std::unique_ptr<QueueWorker> worker_;
  size_t idle_in_flight_ = 0;
  size_t seen_ = 0;                  // loop thread
  int finished_ = 0;                 // loop thread
  std::vector<std::string> errors_;  // loop thread
};

// Without a handover, the ground rules: a served request is committed with
// COMMIT_AND_FETCH, which re-arms its tag; on STOP_DEV the worker is done
// only once the kernel has aborted every pending fetch.
TEST_F(QueueHandoverTest, StopWaitsForEveryFetch) {
  Request(1);
  EXPECT_EQ(requests(), 1u);
  EXPECT_EQ(Issued(), std::vector<CommandId>{Commit(1)});
  for (uint16_t tag : {0, 1, 2}) Abort(tag);
  EXPECT_EQ(finished(), 0) << "tag 3's fetch is still pending";
  Abort(3);
  EXPECT_EQ(finished(), 1);
  EXPECT_EQ(not_aborted(), 0u);
  EXPECT_EQ(Issued(), std::vector<CommandId>{});
}

// Case 1: during a handover a request's COMMIT_AND_FETCH (the only way to
// commit it) releases its tag: the worker does not wait for that fetch, nor
// count it among the fetches QUIESCE_DEV left, and asks nothing more of the
// kernel for it. A request the kernel still hands the released tag before
// the worker is done is served; one after that is left to the next daemon.
// The worker is never done before QUIESCE_DEV has returned.
TEST_F(QueueHandoverTest, CommitDuringHandoverReleasesTheTag) {
  OnLoop([this] { worker_->BeginHandover(); });
  Request(0);
  EXPECT_EQ(Issued(), std::vector<CommandId>{Commit(0)}) << "the commit, and nothing else";
  // QUIESCE_DEV aborts the idle fetches; tag 0's stays with the kernel.
  for (uint16_t tag : {1, 2, 3}) Abort(tag);
  EXPECT_EQ(finished(), 0) << "QUIESCE_DEV has not returned";
  Request(0);
  EXPECT_EQ(requests(), 2u);
  EXPECT_EQ(Issued(), std::vector<CommandId>{Commit(0)});

  OnLoop([this] { worker_->EndHandover(); });  // QUIESCE_DEV returned
  EXPECT_EQ(finished(), 1);
  EXPECT_EQ(not_aborted(), 0u) << "tag 0's fetch was released, not left unaborted";

  Request(0);
  EXPECT_EQ(requests(), 2u);
  EXPECT_EQ(left(), 1u);
  EXPECT_EQ(finished(), 1);
  EXPECT_EQ(Issued(), std::vector<CommandId>{});
}

// Case 2: after a QUIESCE_DEV that returned, the worker is done as soon as the
// requests it serves are committed, though a fetch is still outstanding
// (QUIESCE_DEV does not abort a fetch whose tag's request is still started
// in the kernel: zero copy's late completion, queue.h).
TEST_F(QueueHandoverTest, QuiescedHandoverEndsOnceNothingIsServed) {
  HoldFlushes();
  OnLoop([this] { worker_->BeginHandover(); });
  Request(0);
  Request(1);
  EXPECT_EQ(requests(), 2u);
  Abort(2);  // tag 3's fetch is never aborted
  OnLoop([this] { worker_->EndHandover(); });  // QUIESCE_DEV returned
  EXPECT_EQ(finished(), 0) << "two requests are being served";

  ASSERT_TRUE(FinishOneRequest());
  EXPECT_EQ(Issued(), std::vector<CommandId>{Commit(0)});
  EXPECT_EQ(finished(), 0) << "tag 1's request is being served";

  ASSERT_TRUE(FinishOneRequest());
  EXPECT_EQ(Issued(), std::vector<CommandId>{Commit(1)});
  EXPECT_EQ(finished(), 1) << "done while tag 3's fetch is outstanding";
  EXPECT_EQ(not_aborted(), 1u);

  Request(3);
  EXPECT_EQ(requests(), 2u);
  EXPECT_EQ(left(), 1u);
  EXPECT_EQ(Issued(), std::vector<CommandId>{});
}

// Case 3: EndHandover after a QUIESCE_DEV that timed out or was
// interrupted: new requests are held back but no fetch was aborted) ends the
// same way, once nothing is served, not when the fetches come back: none of
// them may ever be aborted (device_upgrade.cc).
TEST_F(QueueHandoverTest, UnquiescedHandoverEndsOnceNothingIsServed) {
  HoldFlushes();
  OnLoop([this] { worker_->BeginHandover(); });
  Request(2);
  OnLoop([this] { worker_->EndHandover(); });  // QUIESCE_DEV gave up
  EXPECT_EQ(finished(), 0) << "tag 2's request is being served";
  ASSERT_TRUE(FinishOneRequest());
  EXPECT_EQ(Issued(), std::vector<CommandId>{Commit(2)});
  EXPECT_EQ(finished(), 1);
  EXPECT_EQ(not_aborted(), 3u);
}

// QUIESCE_DEV refused (AbortHandover): the device is served on, and the tags
// released meanwhile are fetching again: a request on one is served as
// usual, and a later stop waits for their fetches too.
TEST_F(QueueHandoverTest, RefusedHandoverWaitsForReleasedTagsAgain) {
  OnLoop([this] { worker_->BeginHandover(); });
  Request(0);
  EXPECT_EQ(Issued(), std::vector<CommandId>{Commit(0)});
  OnLoop([this] { worker_->AbortHandover(); });

  Request(0);
  EXPECT_EQ(requests(), 2u);
  EXPECT_EQ(Issued(), std::vector<CommandId>{Commit(0)});
  for (uint16_t tag : {1, 2, 3}) Abort(tag);
  EXPECT_EQ(finished(), 0) << "tag 0's fetch is waited for again";
  Abort(0);
  EXPECT_EQ(finished(), 1);
}

}  // namespace
}  // namespace uq::driver
