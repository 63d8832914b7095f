#include "tools/image_copy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <coroutine>
#include <cstring>
#include <deque>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "tools/zero_runs.h"

namespace uq::tools {
namespace {

using qcow2::IoRequest;

// Completes queued work in a shuffled (seeded) order, a few items per Poll(),
// like a real ring with many operations in flight.
class ShuffleLoop final : public EventLoop {
 public:
  explicit ShuffleLoop(uint64_t seed) : rng_(seed) {}
  void Defer(std::function<void()> work) { queue_.push_back(std::move(work)); }
  bool Poll() override {
    if (queue_.empty()) return false;
    size_t n = 1 + rng_() % 3;
    for (size_t i = 0; i < n && !queue_.empty(); ++i) {
      size_t pick = rng_() % queue_.size();
      std::function<void()> work = std::move(queue_[pick]);
      queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(pick));
      work();
    }
    return true;
  }

 private:
  std::mt19937_64 rng_;
  std::deque<std::function<void()>> queue_;
};

// co_await Suspend{loop}: resumes when `loop` gets to it; at once without one.
struct Suspend {
  ShuffleLoop* loop;
  bool await_ready() const noexcept { return loop == nullptr; }
  void await_suspend(std::coroutine_handle<> h) {
    loop->Defer([h] { h.resume(); });
  }
  void await_resume() const noexcept {}
};

class FakeDevice final : public qcow2::BlockDevice {
 public:
  FakeDevice(std::vector<std::byte> data, ShuffleLoop* loop)
      : data_(std::move(data)), loop_(loop) {}
  uint64_t size() const override { return data_.size(); }
  bool read_only() const override { return true; }
  const std::string& path() const override { return path_; }
  Task<Status> Read(uint64_t offset, std::span<std::byte> out) override {
    EXPECT_LE(offset + out.size(), data_.size());
    max_in_flight = std::max(max_in_flight, ++in_flight);
    ++reads;
    co_await Suspend{loop_};
    --in_flight;
    if (fail_at.has_value() && *fail_at >= offset && *fail_at < offset + out.size()) {
      co_return Status::Corruption(path_ + ": L2 table at offset 0x30000 is misaligned");
    }
    std::memcpy(out.data(), data_.data() + offset, out.size());
    co_return Status::Ok();
  }

  int in_flight = 0;
  int max_in_flight = 0;
  int reads = 0;
  std::optional<uint64_t> fail_at;

 private:
  std::vector<std::byte> data_;
  ShuffleLoop* loop_;
  std::string path_ = "src.qcow2";
};

class FakeFile final : public qcow2::File {
 public:
  FakeFile(uint64_t size, std::byte fill, ShuffleLoop* loop) : data_(size, fill), loop_(loop) {}
  Result<uint64_t> Size() override { return data_.size(); }
  Status Truncate(uint64_t size) override {
    data_.resize(size);
    return Status::Ok();
  }
  const std::string& path() const override { return path_; }
  bool Start(IoRequest& req) override {
    if (loop_ == nullptr) {
      Perform(req);
      return true;
    }
    loop_->Defer([this, &req] {
      Perform(req);
      req.waiter.resume();
    });
    return false;
  }

  const std::vector<std::byte>& data() const { return data_; }
  // Each write's bytes were not all zero.
  std::vector<std::pair<uint64_t, uint64_t>> writes;
  std::vector<std::pair<uint64_t, uint64_t>> zeroes;
  int syncs = 0;

 private:
  void Perform(IoRequest& req) {
    switch (req.op) {
      case IoRequest::Op::kWrite:
        EXPECT_FALSE(IsAllZero({req.data, req.length}));
        writes.emplace_back(req.offset, req.length);
        std::memcpy(data_.data() + req.offset, req.data, req.length);
        break;
      case IoRequest::Op::kZero:
        zeroes.emplace_back(req.offset, req.length);
        std::memset(data_.data() + req.offset, 0, req.length);
        break;
      case IoRequest::Op::kSync:
        ++syncs;
        break;
      default:
        ADD_FAILURE() << "unexpected op";
    }
    req.result = static_cast<int64_t>(req.length);
  }

  std::vector<std::byte> data_;
  ShuffleLoop* loop_;
  std::string path_ = "out.raw";
};

// 10.5 MiB: data in some places, zeros elsewhere, an odd tail.
std::vector<std::byte> SampleImage() {
  std::vector<std::byte> data((21u << 19) + 1000, std::byte{0});
  auto fill = [&](uint64_t offset, uint64_t length, uint8_t value) {
    std::memset(data.data() + offset, value, length);
  };
  fill(0, 4096, 0x11);                 // first block
  fill((1u << 20) - 10, 20, 0x22);     // across a chunk boundary
  fill(3u << 20, 3u << 20, 0x33);      // three whole chunks
  fill((8u << 20) + 12345, 1, 0x44);   // a lone byte
  fill(data.size() - 700, 700, 0x55);  // the partial last block
  return data;
}

TEST(ZeroRunsTest, SplitsAndMerges) {
  std::vector<std::byte> data(10 * 4, std::byte{0});
  data[5] = std::byte{1};   // block 1
  data[9] = std::byte{1};   // block 2
  data[39] = std::byte{1};  // block 9 (last)
  EXPECT_EQ(SplitZeroRuns(data, 4),
            (std::vector<ZeroRun>{{0, 4, true}, {4, 8, false}, {12, 24, true}, {36, 4, false}}));
  EXPECT_EQ(SplitZeroRuns(std::span(data).first(3), 4), (std::vector<ZeroRun>{{0, 3, true}}));
  EXPECT_EQ(SplitZeroRuns(std::span(data).first(38), 4).back(), (ZeroRun{12, 26, true}));
  EXPECT_TRUE(SplitZeroRuns({}, 4).empty());
  EXPECT_TRUE(IsAllZero(std::span(data).first(5)));
  EXPECT_FALSE(IsAllZero(data));
  std::vector<std::byte> big(10000, std::byte{0});
  EXPECT_TRUE(IsAllZero(big));
  big[9999] = std::byte{7};
  EXPECT_FALSE(IsAllZero(big));
}

TEST(ImageCopyTest, ManyChunksInFlightAndSparseOutput) {
  for (uint64_t seed : {1, 2, 3}) {
    ShuffleLoop loop(seed);
    std::vector<std::byte> image = SampleImage();
    FakeDevice source(image, &loop);
    FakeFile target(image.size(), std::byte{0}, &loop);
    std::vector<uint64_t> progress;
    CopyOptions options;
    options.parallel = 8;
    options.on_progress = [&](uint64_t done, uint64_t total) {
      EXPECT_EQ(total, image.size());
      progress.push_back(done);
    };
    Result<CopyStats> stats = BlockOn(CopyToFile(source, target, options), &loop);
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
    EXPECT_TRUE(target.data() == image) << "seed " << seed;
    EXPECT_EQ(source.max_in_flight, 8);
    EXPECT_EQ(stats->max_in_flight, 8);
    EXPECT_EQ(source.reads, 11);
    EXPECT_EQ(stats->bytes_total, image.size());
    EXPECT_EQ(stats->bytes_written, 4096u + 2 * 4096 + (3u << 20) + 4096 + 1000);
    EXPECT_EQ(stats->bytes_written + stats->bytes_zero, image.size());
    EXPECT_TRUE(target.zeroes.empty());
    EXPECT_EQ(target.syncs, 1);
    ASSERT_EQ(progress.size(), 11u);
    EXPECT_TRUE(std::is_sorted(progress.begin(), progress.end()));
    EXPECT_EQ(progress.back(), image.size());
  }
}

TEST(ImageCopyTest, ZeroesTargetThatIsNotZeroedAndMaySkipSync) {
  ShuffleLoop loop(7);
  std::vector<std::byte> image = SampleImage();
  FakeDevice source(image, &loop);
  FakeFile target(image.size(), std::byte{0xff}, &loop);
  CopyOptions options;
  options.target_zeroed = false;
  options.sync = false;
  Result<CopyStats> stats = BlockOn(CopyToFile(source, target, options), &loop);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_TRUE(target.data() == image);
  EXPECT_FALSE(target.zeroes.empty());
  EXPECT_EQ(target.syncs, 0);
}

TEST(ImageCopyTest, SynchronousIoRunsOneChunkAtATime) {
  std::vector<std::byte> image = SampleImage();
  FakeDevice source(image, nullptr);
  FakeFile target(image.size(), std::byte{0}, nullptr);
  Result<CopyStats> stats = BlockOn(CopyToFile(source, target, CopyOptions{}));
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_TRUE(target.data() == image);
  EXPECT_EQ(source.max_in_flight, 1);
  EXPECT_EQ(target.syncs, 1);
}

TEST(ImageCopyTest, FirstErrorStopsTheCopy) {
  ShuffleLoop loop(11);
  std::vector<std::byte> image = SampleImage();
  FakeDevice source(image, &loop);
  source.fail_at = 2u << 20;
  FakeFile target(image.size(), std::byte{0}, &loop);
  CopyOptions options;
  options.parallel = 2;
  Result<CopyStats> stats = BlockOn(CopyToFile(source, target, options), &loop);
  ASSERT_FALSE(stats.ok());
  EXPECT_TRUE(stats.status().IsCorruption());
  EXPECT_EQ(stats.status().ToString(), "src.qcow2: L2 table at offset 0x30000 is misaligned");
  EXPECT_LT(source.reads, 11);  // no new chunk after the failure
  EXPECT_EQ(source.in_flight, 0);
  EXPECT_EQ(target.syncs, 0);
}

TEST(ImageCopyTest, EmptyAndTinyDevices) {
  for (size_t size : {size_t{0}, size_t{1}, size_t{4097}}) {
    ShuffleLoop loop(5);
    std::vector<std::byte> image(size, std::byte{9});
    FakeDevice source(image, &loop);
    FakeFile target(size, std::byte{0}, &loop);
    CopyOptions options;
    options.parallel = 32;
    Result<CopyStats> stats = BlockOn(CopyToFile(source, target, options), &loop);
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
    EXPECT_TRUE(target.data() == image);
    EXPECT_EQ(source.max_in_flight, size == 0 ? 0 : 1);
    EXPECT_EQ(target.syncs, 1);
  }
}

}  // namespace
}  // namespace uq::tools
