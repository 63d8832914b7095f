#include "uring/uring_env.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "base/task.h"
#include "uring/ring.h"

namespace uq::uring {
namespace {

using qcow2::File;
using qcow2::OpenOptions;

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

std::vector<std::byte> Pattern(size_t size, uint8_t seed) {
  std::vector<std::byte> out(size);
  for (size_t i = 0; i < size; ++i) out[i] = std::byte(static_cast<uint8_t>(seed + i * 7));
  return out;
}

class UringEnvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = TempDir() + "/uring_env_test." + std::to_string(::getpid()) + "." +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    Result<std::unique_ptr<Ring>> ring = Ring::Create({.entries = 32});
    ASSERT_TRUE(ring.ok()) << ring.status().ToString();
    ring_ = std::move(ring).value();
  }
  void TearDown() override { ::unlink(path_.c_str()); }

  std::unique_ptr<File> OpenFile(OpenOptions options = {.create = true}) {
    Result<std::unique_ptr<File>> file = env_.Open(path_, options);
    EXPECT_TRUE(file.ok()) << file.status().ToString();
    return file.ok() ? std::move(file).value() : nullptr;
  }
  // Runs `task` on the ring, bound to this thread.
  template <class T>
  T Run(Task<T> task) {
    Ring::Bind bind(ring_.get());
    T out = BlockOn(std::move(task), ring_.get());
    EXPECT_EQ(ring_->in_flight(), 0u);
    return out;
  }

  UringEnv env_;
  std::string path_;
  std::unique_ptr<Ring> ring_;
};

Task<Status> WriteThenRead(File* f, uint64_t offset, size_t size, uint8_t seed) {
  std::vector<std::byte> data = Pattern(size, seed);
  CO_RETURN_IF_ERROR(co_await f->Write(offset, data));
  std::vector<std::byte> back(size);
  CO_RETURN_IF_ERROR(co_await f->ReadExact(offset, back));
  if (back != data) co_return Status::Corruption("mismatch at " + std::to_string(offset));
  co_return Status::Ok();
}

// 256 coroutines, each writing and reading back its own 4 KiB block, all in
// flight at once on a ring of 32 entries.
TEST_F(UringEnvTest, ConcurrentRoundTrip) {
  auto file = OpenFile();
  constexpr int kTasks = 256;
  constexpr size_t kBlock = 4096;
  int done = 0;
  std::vector<Status> results(kTasks);
  {
    Ring::Bind bind(ring_.get());
    for (int i = 0; i < kTasks; ++i) {
      Spawn([](File* f, int i, Status* out, int* done) -> Task<void> {
        *out = co_await WriteThenRead(f, uint64_t(i) * kBlock, kBlock, uint8_t(i));
        ++*done;
      }(file.get(), i, &results[i], &done));
    }
    EXPECT_EQ(done, 0);  // everything is queued on the ring
    EXPECT_GT(ring_->in_flight(), 32u);
    while (ring_->Poll()) {
    }
  }
  EXPECT_EQ(done, kTasks);
  for (int i = 0; i < kTasks; ++i) EXPECT_TRUE(results[i].ok()) << results[i].ToString();
  EXPECT_EQ(*file->Size(), kTasks * kBlock);
}

// A ring with fewer entries than requests started at once.
TEST_F(UringEnvTest, MoreRequestsThanRingEntries) {
  Result<std::unique_ptr<Ring>> small = Ring::Create({.entries = 4});
  ASSERT_TRUE(small.ok());
  ring_ = std::move(small).value();
  auto file = OpenFile();
  constexpr int kTasks = 100;
  int ok = 0;
  {
    Ring::Bind bind(ring_.get());
    for (int i = 0; i < kTasks; ++i) {
      Spawn([](File* f, int i, int* ok) -> Task<void> {
        Status s = co_await WriteThenRead(f, uint64_t(i) * 512, 512, uint8_t(i));
        EXPECT_TRUE(s.ok()) << s.ToString();
        if (s.ok()) ++*ok;
      }(file.get(), i, &ok));
    }
    EXPECT_EQ(ring_->in_flight(), size_t{kTasks});
    while (ring_->Poll()) {
    }
  }
  EXPECT_EQ(ok, kTasks);
  EXPECT_EQ(*file->Size(), kTasks * 512u);
  Status synced = Run([](File* f) -> Task<Status> { co_return co_await f->Sync(); }(file.get()));
  EXPECT_TRUE(synced.ok()) << synced.ToString();
}

TEST_F(UringEnvTest, ReadPastEndOfFileIsShort) {
  auto file = OpenFile();
  auto body = [](File* f) -> Task<Status> {
    std::vector<std::byte> data = Pattern(1000, 1);
    CO_RETURN_IF_ERROR(co_await f->Write(0, data));
    std::vector<std::byte> buf(4096);
    CO_ASSIGN_OR_RETURN(size_t n, co_await f->Read(0, buf));
    EXPECT_EQ(n, 1000u);
    EXPECT_EQ(std::memcmp(buf.data(), data.data(), 1000), 0);
    CO_ASSIGN_OR_RETURN(size_t m, co_await f->Read(500, buf));
    EXPECT_EQ(m, 500u);
    CO_ASSIGN_OR_RETURN(size_t z, co_await f->Read(5000, buf));
    EXPECT_EQ(z, 0u);
    Status exact = co_await f->ReadExact(0, buf);
    EXPECT_TRUE(exact.IsCorruption()) << exact.ToString();
    co_return Status::Ok();
  };
  Status s = Run(body(file.get()));
  EXPECT_TRUE(s.ok()) << s.ToString();
}

// O_DIRECT with unaligned reads (what compressed clusters need): 64 reads at
// odd offsets and lengths, some running past the end of a file whose size is
// not a multiple of 512, all in flight on the ring at once; each gets exactly
// the bytes of the file it asked for (fewer at end of file).
TEST_F(UringEnvTest, UnalignedDirectReadsBounceOnTheRing) {
  constexpr size_t kSize = 3 * 4096 + 1000;
  const std::vector<std::byte> content = Pattern(kSize, 3);
  {
    int fd = ::open(path_.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, content.data(), kSize), static_cast<ssize_t>(kSize));
    ::close(fd);
  }
  auto file = OpenFile({.direct = true});
  if (file == nullptr) GTEST_FAIL() << "O_DIRECT open failed (TEST_TMPDIR on tmpfs?)";
  constexpr int kReads = 64;
  std::vector<Result<size_t>> got(kReads, Status::IoError("not run"));
  std::vector<std::vector<std::byte>> bufs(kReads);
  std::vector<uint64_t> offsets(kReads);
  int done = 0;
  {
    Ring::Bind bind(ring_.get());
    for (int i = 0; i < kReads; ++i) {
      offsets[i] = uint64_t(i) * 200 + 1;
      bufs[i].resize(777 + i * 97);
      Spawn([](File* f, Result<size_t>* out, std::vector<std::byte>* b, uint64_t off,
               int* done) -> Task<void> {
        *out = co_await f->Read(off, *b);
        ++*done;
      }(file.get(), &got[i], &bufs[i], offsets[i], &done));
    }
    // Nothing completed inline (no blocking pread): every read is on the ring.
    EXPECT_EQ(done, 0);
    EXPECT_EQ(ring_->in_flight(), size_t(kReads));
    while (ring_->Poll()) {
    }
  }
  EXPECT_EQ(done, kReads);
  for (int i = 0; i < kReads; ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status().ToString();
    const uint64_t off = offsets[i];
    const size_t want = std::min<size_t>(bufs[i].size(), kSize - off);
    ASSERT_EQ(*got[i], want) << "read " << i;
    EXPECT_EQ(0, std::memcmp(bufs[i].data(), content.data() + off, want)) << "read " << i;
  }
}

TEST_F(UringEnvTest, ZeroLengthCompletesAtOnce) {
  auto file = OpenFile();
  Ring::Bind bind(ring_.get());
  // No loop: a suspension here would abort BlockOn.
  Result<size_t> n = BlockOn(
      [](File* f) -> Task<Result<size_t>> { co_return co_await f->Read(0, {}); }(file.get()));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
}

TEST_F(UringEnvTest, Sync) {
  auto file = OpenFile();
  auto body = [](File* f) -> Task<Status> {
    CO_RETURN_IF_ERROR(co_await f->Write(0, Pattern(8192, 3)));
    co_return co_await f->Sync();
  };
  Status s = Run(body(file.get()));
  EXPECT_TRUE(s.ok()) << s.ToString();
}

// Writes 64 KiB of pattern, clears [16 KiB, 48 KiB) with `op`, and checks
// that exactly that range reads as zeros and the size is unchanged.
Task<Status> ClearMiddle(File* f, bool discard) {
  std::vector<std::byte> data = Pattern(65536, 9);
  CO_RETURN_IF_ERROR(co_await f->Write(0, data));
  if (discard) {
    CO_RETURN_IF_ERROR(co_await f->Discard(16384, 32768));
  } else {
    CO_RETURN_IF_ERROR(co_await f->Zero(16384, 32768));
  }
  std::vector<std::byte> back(65536);
  CO_RETURN_IF_ERROR(co_await f->ReadExact(0, back));
  for (size_t i = 0; i < back.size(); ++i) {
    bool cleared = i >= 16384 && i < 49152;
    if (back[i] != (cleared ? std::byte{0} : data[i])) {
      co_return Status::Corruption("wrong byte at " + std::to_string(i));
    }
  }
  CO_ASSIGN_OR_RETURN(uint64_t size, f->Size());
  if (size != 65536) co_return Status::Corruption("size changed to " + std::to_string(size));
  co_return Status::Ok();
}

TEST_F(UringEnvTest, DiscardReadsAsZeros) {
  auto file = OpenFile();
  Status s = Run(ClearMiddle(file.get(), /*discard=*/true));
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST_F(UringEnvTest, ZeroRangeReadsAsZeros) {
  auto file = OpenFile();
  Status s = Run(ClearMiddle(file.get(), /*discard=*/false));
  EXPECT_TRUE(s.ok()) << s.ToString();
}

// tmpfs has no FALLOC_FL_ZERO_RANGE: Zero falls back to writing zeros.
TEST_F(UringEnvTest, ZeroRangeFallsBackToWritingZeros) {
  path_ = "/dev/shm/uring_env_test." + std::to_string(::getpid());
  Result<std::unique_ptr<File>> file = env_.Open(path_, {.create = true});
  if (!file.ok()) GTEST_SKIP() << "no writable /dev/shm: " << file.status().ToString();
  if (::fallocate((*file)->fd(), FALLOC_FL_ZERO_RANGE, 0, 4096) == 0 || errno != EOPNOTSUPP) {
    GTEST_SKIP() << "/dev/shm supports FALLOC_FL_ZERO_RANGE; the fallback is not exercised";
  }
  Status s = Run(ClearMiddle(file->get(), /*discard=*/false));
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST_F(UringEnvTest, WriteToReadOnlyFileNamesThePath) {
  OpenFile().reset();  // create it
  auto file = OpenFile({});
  Status s = Run(
      [](File* f) -> Task<Status> { co_return co_await f->Write(0, Pattern(512, 0)); }(file.get()));
  EXPECT_TRUE(s.IsIoError()) << s.ToString();
  EXPECT_EQ(s.error_number(), EBADF);
  EXPECT_NE(s.message().find(path_), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("write of 512 bytes at offset 0"), std::string::npos);
}

TEST_F(UringEnvTest, ReadAtImpossibleOffsetFails) {
  auto file = OpenFile();
  std::vector<std::byte> buf(512);
  Result<size_t> n = Run([](File* f, std::span<std::byte> b) -> Task<Result<size_t>> {
    co_return co_await f->Read(uint64_t{1} << 63, b);  // a negative off_t
  }(file.get(), buf));
  ASSERT_FALSE(n.ok());
  EXPECT_TRUE(n.status().IsIoError()) << n.status().ToString();
  EXPECT_EQ(n.status().error_number(), EINVAL);
  EXPECT_NE(n.status().message().find(path_), std::string::npos);
}

TEST_F(UringEnvTest, OpenMissingFileNamesThePath) {
  Result<std::unique_ptr<File>> file = env_.Open(path_ + ".missing", {});
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().error_number(), ENOENT);
  EXPECT_NE(file.status().message().find(path_ + ".missing"), std::string::npos);
  EXPECT_FALSE(env_.Exists(path_ + ".missing"));
}

// With no ring bound, files complete every operation synchronously, so
// BlockOn needs no loop at all.
TEST_F(UringEnvTest, BlockingFallbackWithoutRing) {
  ASSERT_EQ(Ring::Current(), nullptr);
  auto file = OpenFile();
  Status s = BlockOn(WriteThenRead(file.get(), 4096, 4096, 5));
  EXPECT_TRUE(s.ok()) << s.ToString();
  Status z = BlockOn(ClearMiddle(file.get(), /*discard=*/true));
  EXPECT_TRUE(z.ok()) << z.ToString();
  EXPECT_EQ(ring_->in_flight(), 0u);
}

// A FIFO delivers data in pieces: the read continues after each short
// completion and ends short at end of file (writer closed).
TEST_F(UringEnvTest, ShortReadsContinueUntilEndOfFile) {
  ASSERT_EQ(::mkfifo(path_.c_str(), 0600), 0) << std::strerror(errno);
  int writer = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);  // O_RDWR: open does not block
  ASSERT_GE(writer, 0);
  auto file = OpenFile({});
  ASSERT_NE(file, nullptr);
  std::vector<std::byte> data = Pattern(8192, 4);
  std::vector<std::byte> buf(16384);
  Result<size_t> got = Status::IoError("not done");
  bool done = false;

  Ring::Bind bind(ring_.get());
  Spawn([](File* f, std::span<std::byte> b, Result<size_t>* got, bool* done) -> Task<void> {
    *got = co_await f->Read(0, b);
    *done = true;
  }(file.get(), buf, &got, &done));
  ASSERT_EQ(::write(writer, data.data(), 3000), 3000);
  ASSERT_TRUE(ring_->Poll());  // the first 3000 bytes; the rest is resubmitted
  EXPECT_FALSE(done);
  ASSERT_EQ(::write(writer, data.data() + 3000, 5192), 5192);
  ASSERT_TRUE(ring_->Poll());
  EXPECT_FALSE(done);
  // Only the file's read end stays open once the writer closes: EOF.
  ::close(writer);
  while (!done && ring_->Poll()) {
  }
  ASSERT_TRUE(done);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(*got, 8192u);
  EXPECT_EQ(std::memcmp(buf.data(), data.data(), 8192), 0);
}

}  // namespace
}  // namespace uq::uring

namespace uq::uring {
namespace {

// Work handed to RunOffThread runs on worker threads, several at once, and
// every caller resumes on the ring's thread; once all are back nothing stays
// in flight on the ring (no eventfd read left armed).
TEST(OffloadTest, WorkRunsOnWorkersAndResumesOnTheRingThread) {
  Result<std::unique_ptr<Ring>> created = Ring::Create({.entries = 8});
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  std::unique_ptr<Ring> ring = std::move(created).value();
  UringEnv env;
  constexpr int kJobs = 24;
  const std::thread::id me = std::this_thread::get_id();
  std::atomic<int> running{0}, peak{0};
  std::vector<std::thread::id> ran_on(kJobs), resumed_on(kJobs);
  int done = 0;
  {
    Ring::Bind bind(ring.get());
    for (int i = 0; i < kJobs; i++) {
      Spawn([](UringEnv* env, int i, auto* ran_on, auto* resumed_on, auto* running, auto* peak,
               int* done) -> Task<void> {
        co_await env->RunOffThread([&] {
          int now = ++*running;
          int p = peak->load();
          while (now > p && !peak->compare_exchange_weak(p, now)) {
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
          (*ran_on)[i] = std::this_thread::get_id();
          --*running;
        });
        (*resumed_on)[i] = std::this_thread::get_id();
        ++*done;
      }(&env, i, &ran_on, &resumed_on, &running, &peak, &done));
    }
    EXPECT_EQ(done, 0);
    EXPECT_EQ(ring->in_flight(), 1u);  // one eventfd read for all of them
    while (ring->Poll()) {
    }
  }
  EXPECT_EQ(done, kJobs);
  EXPECT_EQ(ring->in_flight(), 0u);
  EXPECT_GE(peak.load(), 2) << "workers ran one at a time";
  for (int i = 0; i < kJobs; i++) {
    EXPECT_NE(ran_on[i], me) << "job " << i << " ran on the ring's thread";
    EXPECT_EQ(resumed_on[i], me) << "job " << i << " resumed elsewhere";
  }
  // Without a ring the work runs inline.
  std::thread::id inline_on;
  BlockOn([](UringEnv* env, std::thread::id* on) -> Task<void> {
    co_await env->RunOffThread([on] { *on = std::this_thread::get_id(); });
  }(&env, &inline_on));
  EXPECT_EQ(inline_on, me);
}

}  // namespace
}  // namespace uq::uring
