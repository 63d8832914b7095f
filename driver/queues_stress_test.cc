// The device's thread model without the kernel: three queue threads (one
// hosting the image) with real rings, serving a random stream of reads,
// writes (some FUA), write-zeroes and flushes on a real qcow2 file the way
// Queue does it: TryServeHere on the queue's own thread when the clusters are
// published, else ImageHost to the image's thread and back. The threads own
// interleaved 4 KiB blocks, so every cluster is shared between them: one
// thread's allocation, copy-on-write or zeroing revokes clusters that another
// is reading or writing in place on its own ring at that moment.
// Each thread checks its reads against its own model; at the end the image
// must read back as the union of the models, close clean, pass `qemu-img
// check` and convert to exactly the same bytes.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <future>
#include <random>
#include <set>

#include "base/aligned_buffer.h"
#include "driver/image_host.h"
#include "driver/loop_thread.h"
#include "driver/request.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/scratch_dir.h"
#include "uring/uring_env.h"

namespace uq::driver {
namespace {

constexpr uint64_t kBlock = 4096;
constexpr int kThreads = 3;
constexpr int kDepth = 16;  // requests in flight per thread
constexpr int kOpsPerThread = 3000;

struct QueuesCase {
  std::string name;
  std::string create;  // qemu-img create -o options (over a backing file)
  uint64_t size;
};
std::ostream& operator<<(std::ostream& o, const QueuesCase& c) { return o << c.name; }

// One queue's client: keeps kDepth requests in flight on its thread.
class Client {
 public:
  Client(int index, LoopThread* loop, ImageHost* host, std::vector<std::byte>* model)
      : index_(index),
        loop_(loop),
        host_(host),
        model_(model),
        rng_(index * 7919 + 1),
        buffers_(kDepth) {
    // Page-aligned, like the tags' buffers: the image is opened O_DIRECT.
    for (int slot = 0; slot < kDepth; slot++) {
      buffers_[slot] = AlignedBuffer(kBlock);
      free_slots_.push_back(slot);
    }
  }

  // Runs the whole stream on the client's thread; the future ends with it.
  std::future<void> Start() {
    loop_->Post([this] { Refill(); });
    return finished_.get_future();
  }
  int failures() const { return failures_.load(); }
  const std::string& first_failure() const { return first_failure_; }
  int served_here() const { return served_here_.load(); }

 private:
  uint64_t blocks() const { return model_->size() / kBlock; }

  void Refill() {
    while (!free_slots_.empty() && issued_ < kOpsPerThread) Issue();
    if (issued_ == kOpsPerThread && free_slots_.size() == kDepth && !done_) {
      done_ = true;
      finished_.set_value();
    }
  }

  void Fail(std::string what) {
    if (failures_.fetch_add(1) == 0) first_failure_ = std::move(what);
  }

  void Issue() {
    const int slot = free_slots_.back();
    free_slots_.pop_back();
    issued_++;
    // A block of ours (block % kThreads == index) that no request of ours is using.
    uint64_t block;
    do {
      block = (rng_() % (blocks() / kThreads)) * kThreads + index_;
    } while (busy_.count(block));
    busy_.insert(block);
    std::span<std::byte> buf = buffers_[slot].span();
    IoDescriptor r;
    r.offset = block * kBlock;
    r.length = kBlock;
    const uint64_t pick = rng_() % 100;
    if (pick < 45) {
      r.op = UBLK_IO_OP_WRITE;
      if (pick < 5) r.flags = UBLK_IO_F_FUA;
      for (auto& b : buf) b = std::byte(rng_());
    } else if (pick < 85) {
      r.op = UBLK_IO_OP_READ;
    } else if (pick < 95) {
      r.op = UBLK_IO_OP_WRITE_ZEROES;
    } else {
      r.op = UBLK_IO_OP_FLUSH;
      r.length = 0;
    }
    auto done = [this, slot, block, r](int32_t result) { Complete(slot, block, r, result); };
    if (std::optional<Task<int32_t>> here = TryServeHere(*host_->device(), r, buf)) {
      served_here_++;
      Spawn([](Task<int32_t> t, std::function<void(int32_t)> d) -> Task<void> {
        d(co_await std::move(t));
      }(std::move(*here), std::move(done)));
    } else {
      host_->Submit(r, buf, loop_, std::move(done));
    }
  }

  void Complete(int slot, uint64_t block, IoDescriptor r, int32_t result) {
    if (!loop_->IsCurrent()) Fail("completion on another thread");
    const int32_t want = r.op == UBLK_IO_OP_READ || r.op == UBLK_IO_OP_WRITE ? kBlock : 0;
    const std::string what = fmt::format("thread {}: {} at {}", index_, OpName(r.op), r.offset);
    std::span<std::byte> buf = buffers_[slot].span();
    std::byte* model = model_->data() + block * kBlock;
    if (result != want) {
      Fail(fmt::format("{}: result {}", what, result));
    } else if (r.op == UBLK_IO_OP_READ) {
      if (std::memcmp(buf.data(), model, kBlock) != 0) Fail(what + ": read other bytes");
    } else if (r.op == UBLK_IO_OP_WRITE) {
      std::memcpy(model, buf.data(), kBlock);
    } else if (r.op == UBLK_IO_OP_WRITE_ZEROES) {
      std::memset(model, 0, kBlock);
    }
    busy_.erase(block);
    free_slots_.push_back(slot);
    Refill();
  }

  const int index_;
  LoopThread* const loop_;
  ImageHost* const host_;
  std::vector<std::byte>* const model_;  // this client touches its own blocks only
  std::mt19937_64 rng_;
  std::vector<AlignedBuffer> buffers_;
  std::vector<int> free_slots_;
  std::set<uint64_t> busy_;
  int issued_ = 0;
  bool done_ = false;
  std::promise<void> finished_;
  std::atomic<int> failures_{0};
  std::string first_failure_;
  std::atomic<int> served_here_{0};
};

class QueuesStressTest : public ::testing::TestWithParam<QueuesCase> {};

TEST_P(QueuesStressTest, SharedClustersAcrossQueueThreadsMatchTheModel) {
  const QueuesCase& c = GetParam();
  qcow2::testing::ScratchDir scratch("queues-" + c.name);
  ASSERT_TRUE(scratch.ok());
  std::string out;
  // Base: random data; the image: empty over it but for a few clusters.
  std::vector<std::byte> base(c.size);
  std::mt19937_64 rng(5);
  for (auto& b : base) b = std::byte(rng());
  scratch.Spit("base.raw", base);
  ASSERT_EQ(scratch.Sh(fmt::format("qemu-img convert -f raw -O qcow2 base.raw base.qcow2 && "
                                   "qemu-img create -q -f qcow2 -o {} -b base.qcow2 -F qcow2 "
                                   "img.qcow2 && qemu-io -f qcow2 -c 'write -P 0x21 0 1M' "
                                   "-c 'write -z 2M 1M' img.qcow2 && "
                                   "qemu-img convert -O raw img.qcow2 start.raw",
                                   c.create),
                       &out),
            0)
      << out;
  std::vector<std::byte> model = scratch.Slurp("start.raw");
  ASSERT_EQ(model.size(), c.size);

  uring::RingOptions ring;
  ring.entries = 256;
  std::vector<std::unique_ptr<LoopThread>> loops;
  for (int t = 0; t < kThreads; t++) {
    Result<std::unique_ptr<LoopThread>> loop = LoopThread::Start(fmt::format("test-q{}", t), ring);
    ASSERT_TRUE(loop.ok()) << loop.status().ToString();
    loops.push_back(std::move(*loop));
  }
  qcow2::ImageOptions options;
  options.env = uring::UringEnv::Default();
  options.writable = true;
  options.direct = true;
  options.preallocate = 1 << 20;
  using Opened = Result<std::unique_ptr<qcow2::BlockDevice>>;
  Opened opened = loops[0]->RunTask<Opened>(
      [&] { return qcow2::OpenImage(scratch.path("img.qcow2"), options); });
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<qcow2::BlockDevice> image = std::move(*opened);
  ImageHost host(loops[0].get(), image.get());

  std::vector<std::unique_ptr<Client>> clients;
  std::vector<std::future<void>> finished;
  for (int t = 0; t < kThreads; t++) {
    clients.push_back(std::make_unique<Client>(t, loops[t].get(), &host, &model));
  }
  for (auto& client : clients) finished.push_back(client->Start());
  for (int t = 0; t < kThreads; t++) {
    ASSERT_EQ(finished[t].wait_for(std::chrono::seconds(120)), std::future_status::ready)
        << "thread " << t << " is stuck";
  }
  int served_here = 0;
  for (int t = 0; t < kThreads; t++) {
    EXPECT_EQ(clients[t]->failures(), 0) << clients[t]->first_failure();
    served_here += clients[t]->served_here();
    std::printf("thread %d: %d of %d requests served on its own thread\n", t,
                clients[t]->served_here(), kOpsPerThread);
  }
  // Both paths were taken, on every thread.
  EXPECT_GT(served_here, kThreads * kOpsPerThread / 10);
  EXPECT_LT(served_here, kThreads * kOpsPerThread);

  AlignedBuffer back(c.size);
  Status read = loops[0]->RunTask<Status>([&] { return image->Read(0, back.span()); });
  ASSERT_TRUE(read.ok()) << read.ToString();
  EXPECT_TRUE(std::equal(model.begin(), model.end(), back.span().begin()))
      << "read back after the run";
  Status closed = loops[0]->RunTask<Status>([&] { return image->Close(); });
  ASSERT_TRUE(closed.ok()) << closed.ToString();
  loops[0]->Call([&] { image.reset(); });
  loops.clear();
  ASSERT_EQ(scratch.Sh("qemu-img check img.qcow2", &out), 0) << out;
  ASSERT_EQ(scratch.Sh("qemu-img convert -O raw img.qcow2 end.raw", &out), 0) << out;
  EXPECT_TRUE(scratch.Slurp("end.raw") == model) << "qemu-img reads other bytes";
}

INSTANTIATE_TEST_SUITE_P(
    Images, QueuesStressTest,
    ::testing::Values(QueuesCase{"c64k", "cluster_size=64k", 8 << 20},
                      QueuesCase{"extl2_16k", "cluster_size=16k,extended_l2=on", 8 << 20},
                      QueuesCase{"c4k_refcount1", "cluster_size=4k,refcount_bits=1", 8 << 20}),
    [](const ::testing::TestParamInfo<QueuesCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::driver
