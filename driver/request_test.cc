#include "driver/request.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>
#include <vector>

#include "base/wait_list.h"
#include "driver/image_host.h"
#include "driver/loop_thread.h"

namespace uq::driver {
namespace {

// A disk in memory that records what it was asked.
class MemDevice final : public qcow2::BlockDevice {
 public:
  explicit MemDevice(uint64_t size, bool read_only = false)
      : data_(size, std::byte{0}), read_only_(read_only) {}
  uint64_t size() const override { return data_.size(); }
  bool read_only() const override { return read_only_; }
  bool marked_corrupt() const override { return corrupt_; }
  const std::string& path() const override { return path_; }

  Task<Status> Read(uint64_t offset, std::span<std::byte> out) override {
    if (fail_) co_return *fail_;
    std::memcpy(out.data(), data_.data() + offset, out.size());
    co_return Status::Ok();
  }
  Task<Status> Write(uint64_t offset, std::span<const std::byte> in, bool fua) override {
    if (fail_) co_return *fail_;
    if (corrupt_) co_return Corrupt();
    std::memcpy(data_.data() + offset, in.data(), in.size());
    last_fua = fua;
    co_return Status::Ok();
  }
  Task<Status> Flush() override {
    if (hold_flushes) co_await held.Wait();
    ++flushes;
    co_return Status::Ok();
  }
  Task<Status> Discard(uint64_t offset, uint64_t length) override {
    if (corrupt_) co_return Corrupt();
    discarded += length;
    co_return Status::Ok();
  }
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length) override {
    if (corrupt_) co_return Corrupt();
    std::memset(data_.data() + offset, 0, length);
    co_return Status::Ok();
  }

  void FailWith(Status s) { fail_ = std::make_unique<Status>(std::move(s)); }
  // As Qcow2Image::MarkCorrupt leaves an image: read-only, changes fail EIO.
  void MarkCorrupt() { read_only_ = corrupt_ = true; }
  std::vector<std::byte>& data() { return data_; }

  bool last_fua = false;
  int flushes = 0;
  bool hold_flushes = false;  // Flush waits for held.NotifyAll()
  WaitList held;
  uint64_t discarded = 0;

 private:
  std::vector<std::byte> data_;
  static Status Corrupt() { return Status::IoError("mem: marked corrupt", EIO); }
  bool read_only_;
  bool corrupt_ = false;
  std::string path_ = "mem";
  std::unique_ptr<Status> fail_;
};

IoDescriptor Req(uint8_t op, uint64_t offset, uint64_t length, uint32_t flags = 0) {
  IoDescriptor d;
  d.op = op;
  d.offset = offset;
  d.length = length;
  d.flags = flags;
  return d;
}

int32_t Serve(MemDevice& dev, IoDescriptor r, std::vector<std::byte>& buffer) {
  return BlockOn(ServeRequest(dev, r, buffer));
}

TEST(ServeRequestTest, WriteThenReadReturnsBytes) {
  MemDevice dev(1 << 20);
  std::vector<std::byte> buf(64 * 1024);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = std::byte(i * 7);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE, 4096, 8192, UBLK_IO_F_FUA), buf), 8192);
  EXPECT_TRUE(dev.last_fua);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE, 0, 512), buf), 512);
  EXPECT_FALSE(dev.last_fua);

  std::vector<std::byte> out(64 * 1024);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_READ, 4096, 8192), out), 8192);
  EXPECT_EQ(std::memcmp(out.data(), buf.data(), 8192), 0);
}

TEST(ServeRequestTest, FlushDiscardWriteZeroesReturnZero) {
  MemDevice dev(1 << 20);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_FLUSH, 0, 0), buf), 0);
  EXPECT_EQ(dev.flushes, 1);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_DISCARD, 65536, 1 << 19), buf), 0);
  EXPECT_EQ(dev.discarded, 1u << 19);
  dev.data()[100] = std::byte{1};
  // Write-zeroes carries no data: its length may exceed the buffer.
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE_ZEROES, 0, 1 << 19), buf), 0);
  EXPECT_EQ(dev.data()[100], std::byte{0});
}

TEST(ServeRequestTest, UnknownOpsAreRefusedNotHung) {
  MemDevice dev(1 << 20);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE_SAME, 0, 512), buf), -EOPNOTSUPP);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_ZONE_APPEND, 0, 512), buf), -EOPNOTSUPP);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_REPORT_ZONES, 0, 0), buf), -EOPNOTSUPP);
}

TEST(ServeRequestTest, BadRequestsFailWithErrno) {
  MemDevice dev(1 << 20);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_READ, (1 << 20) - 512, 1024), buf), -EIO);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE, uint64_t{1} << 40, 512), buf), -EIO);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_READ, 0, 8192), buf), -EINVAL);

  MemDevice ro(1 << 20, /*read_only=*/true);
  EXPECT_EQ(Serve(ro, Req(UBLK_IO_OP_WRITE, 0, 512), buf), -EROFS);
  EXPECT_EQ(Serve(ro, Req(UBLK_IO_OP_DISCARD, 0, 512), buf), -EROFS);
  EXPECT_EQ(Serve(ro, Req(UBLK_IO_OP_READ, 0, 512), buf), 512);
  EXPECT_EQ(Serve(ro, Req(UBLK_IO_OP_FLUSH, 0, 0), buf), 0);
}

// A device that turned read-only because its image was found corrupt while
// serving: changes fail as I/O errors (the engine's EIO), not as EROFS, and
// reads go on.
TEST(ServeRequestTest, ChangesToADeviceMarkedCorruptFailWithEio) {
  MemDevice dev(1 << 20);
  std::vector<std::byte> buf(4096);
  dev.MarkCorrupt();
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE, 0, 512), buf), -EIO);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE_ZEROES, 0, 512), buf), -EIO);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_DISCARD, 0, 512), buf), -EIO);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_READ, 0, 512), buf), 512);
}

TEST(ServeRequestTest, EngineErrorsBecomeNegativeErrno) {
  MemDevice dev(1 << 20);
  std::vector<std::byte> buf(4096);
  Status io = Status::IoError("mem: boom", EIO);
  dev.FailWith(io);
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE, 0, 512), buf), io.ToNegativeErrno());
  EXPECT_EQ(io.ToNegativeErrno(), -EIO);
  dev.FailWith(Status::Corruption("mem: bad L2 entry"));
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_READ, 0, 512), buf), -EIO);
  dev.FailWith(Status::NoSpace("mem: full"));
  EXPECT_EQ(Serve(dev, Req(UBLK_IO_OP_WRITE, 0, 512), buf), -ENOSPC);
}

uring::RingOptions SmallRing() {
  uring::RingOptions options;
  options.entries = 16;
  return options;
}

TEST(ImageHostTest, RequestsFromAnotherQueueRunOnTheImageThreadAndComeBack) {
  Result<std::unique_ptr<LoopThread>> home = LoopThread::Start("test-q0", SmallRing());
  Result<std::unique_ptr<LoopThread>> other = LoopThread::Start("test-q1", SmallRing());
  ASSERT_TRUE(home.ok() && other.ok());
  MemDevice dev(1 << 20);
  ImageHost host(home->get(), &dev);

  constexpr int kRequests = 500;
  std::vector<std::vector<std::byte>> buffers(kRequests, std::vector<std::byte>(512));
  std::atomic<int> done{0};
  std::atomic<bool> wrong_thread{false};
  std::atomic<int> bad_result{0};
  for (int i = 0; i < kRequests; ++i) std::memset(buffers[i].data(), i & 0xff, 512);

  LoopThread* q1 = other->get();
  q1->Call([&] {
    for (int i = 0; i < kRequests; ++i) {
      host.Submit(Req(UBLK_IO_OP_WRITE, uint64_t(i) * 512, 512), buffers[i], q1,
                  [&, q1](int32_t result) {
                    if (!q1->IsCurrent()) wrong_thread = true;
                    if (result != 512) bad_result.fetch_add(1);
                    done.fetch_add(1);
                  });
    }
  });
  // And from the image's own thread: the result comes back at once.
  LoopThread* q0 = home->get();
  int32_t own = -1;
  q0->Call([&] {
    host.Submit(Req(UBLK_IO_OP_READ, 0, 512), buffers[0], q0, [&](int32_t r) { own = r; });
  });
  while (done.load() < kRequests) std::this_thread::yield();
  EXPECT_FALSE(wrong_thread.load());
  EXPECT_EQ(bad_result.load(), 0);
  EXPECT_EQ(own, 512);
  for (int i = 0; i < kRequests; ++i) ASSERT_EQ(dev.data()[uint64_t(i) * 512], std::byte(i & 0xff));
  EXPECT_EQ(q0->Call([&] { return host.in_flight(); }), 0u);
}

// A live resize runs through Exclusive(): after the request in the engine,
// before the one submitted while it waited.
TEST(ImageHostTest, ExclusiveWorkRunsBetweenRequests) {
  Result<std::unique_ptr<LoopThread>> home = LoopThread::Start("test-q0", SmallRing());
  ASSERT_TRUE(home.ok());
  LoopThread* q0 = home->get();
  MemDevice dev(1 << 20);
  ImageHost host(q0, &dev);
  std::vector<std::byte> buffer(512);
  std::vector<std::string> order;
  Status exclusive_result = Status::IoError("not run");

  q0->Call([&] {
    dev.hold_flushes = true;
    host.Submit(Req(UBLK_IO_OP_FLUSH, 0, 0), {}, q0, [&](int32_t) { order.push_back("flush"); });
    Spawn([](ImageHost* host, MemDevice* dev, std::vector<std::string>* order,
             Status* out) -> Task<void> {
      *out = co_await host->Exclusive([host, dev, order]() -> Task<Status> {
        order->push_back(fmt::format("exclusive: {} flush(es) done, {} in flight", dev->flushes,
                                     host->in_flight()));
        co_return Status::Ok();
      });
    }(&host, &dev, &order, &exclusive_result));
    host.Submit(Req(UBLK_IO_OP_READ, 0, 512), buffer, q0,
                [&](int32_t) { order.push_back("read"); });
    // The flush holds the engine: nothing else has run.
    EXPECT_TRUE(order.empty());
    dev.hold_flushes = false;
    dev.held.NotifyAll();
  });
  // (The flush's answer may come after: the gate opens before it is sent.)
  ASSERT_EQ(order.size(), 3u);
  std::vector<std::string> without_flush;
  for (const std::string& s : order) {
    if (s != "flush") without_flush.push_back(s);
  }
  EXPECT_EQ(without_flush,
            (std::vector<std::string>{"exclusive: 1 flush(es) done, 0 in flight", "read"}));
  EXPECT_TRUE(exclusive_result.ok()) << exclusive_result.ToString();
}

}  // namespace
}  // namespace uq::driver
