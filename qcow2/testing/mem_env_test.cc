#include "qcow2/testing/mem_env.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"

namespace uq::qcow2::testing {
namespace {

std::vector<std::byte> Bytes(std::string_view s) {
  std::vector<std::byte> out(s.size());
  std::transform(s.begin(), s.end(), out.begin(), [](char c) { return std::byte(c); });
  return out;
}

std::vector<std::byte> Filled(size_t n, uint8_t value) {
  return std::vector<std::byte>(n, std::byte{value});
}

// File operations as Tasks, so BlockOn can run them on either completion mode.
Task<Status> WriteAt(File* f, uint64_t offset, std::span<const std::byte> data) {
  co_return co_await f->Write(offset, data);
}
Task<Result<size_t>> ReadAt(File* f, uint64_t offset, std::span<std::byte> out) {
  co_return co_await f->Read(offset, out);
}
Task<Status> DiscardAt(File* f, uint64_t offset, uint64_t length) {
  co_return co_await f->Discard(offset, length);
}
Task<Status> ZeroAt(File* f, uint64_t offset, uint64_t length) {
  co_return co_await f->Zero(offset, length);
}
Task<Status> SyncOf(File* f) { co_return co_await f->Sync(); }

std::unique_ptr<File> MustOpen(MemEnv& env, const std::string& path, OpenOptions options) {
  Result<std::unique_ptr<File>> file = env.Open(path, options);
  EXPECT_TRUE(file.ok()) << file.status().ToString();
  return file.ok() ? std::move(file).value() : nullptr;
}

constexpr OpenOptions kCreate{.writable = true, .create = true};
constexpr OpenOptions kReadOnly{};

TEST(MemEnvTest, OpeningAMissingFileWithoutCreateIsEnoentNamingThePath) {
  MemEnv env;
  Result<std::unique_ptr<File>> file = env.Open("/img/missing.qcow2", {.writable = true});
  ASSERT_FALSE(file.ok());
  EXPECT_TRUE(file.status().IsIoError());
  EXPECT_EQ(file.status().error_number(), ENOENT);
  EXPECT_NE(file.status().message().find("/img/missing.qcow2"), std::string::npos);
  EXPECT_FALSE(env.Exists("/img/missing.qcow2"));
}

TEST(MemEnvTest, CreateKeepsAnExistingFileAndTruncateEmptiesIt) {
  MemEnv env;
  env.SetContents("a", Bytes("hello"));
  MustOpen(env, "a", kCreate);
  EXPECT_EQ(env.Contents("a"), Bytes("hello"));
  MustOpen(env, "a", {.writable = true, .create = true, .truncate = true});
  EXPECT_TRUE(env.Exists("a"));
  EXPECT_TRUE(env.Contents("a").empty());
  // Truncating through a read-only open is a contradiction, not a no-op.
  Result<std::unique_ptr<File>> ro = env.Open("a", {.truncate = true});
  EXPECT_TRUE(ro.status().IsInvalidArgument());
}

TEST(MemEnvTest, ReadsPastEndOfFileAreShort) {
  MemEnv env;
  env.SetContents("f", Bytes("0123456789"));
  std::unique_ptr<File> f = MustOpen(env, "f", kReadOnly);
  std::vector<std::byte> buf(8, std::byte{'x'});
  Result<size_t> n = BlockOn(ReadAt(f.get(), 6, buf));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 4u);
  EXPECT_EQ(std::vector<std::byte>(buf.begin(), buf.begin() + 4), Bytes("6789"));
  EXPECT_EQ(buf[4], std::byte{'x'});  // past the short count: untouched
  n = BlockOn(ReadAt(f.get(), 10, buf));
  EXPECT_EQ(*n, 0u);
  n = BlockOn(ReadAt(f.get(), 1000, buf));
  EXPECT_EQ(*n, 0u);
  // ReadExact reports the short read as Corruption, ReadZeroPadded pads it.
  EXPECT_TRUE(BlockOn(f->ReadExact(6, buf)).IsCorruption());
  ASSERT_TRUE(BlockOn(f->ReadZeroPadded(6, buf)).ok());
  EXPECT_EQ(buf[4], std::byte{0});
}

TEST(MemEnvTest, WritesPastEndExtendAndTheGapReadsAsZeros) {
  MemEnv env;
  std::unique_ptr<File> f = MustOpen(env, "f", kCreate);
  ASSERT_TRUE(BlockOn(WriteAt(f.get(), 0, Bytes("ab"))).ok());
  ASSERT_TRUE(BlockOn(WriteAt(f.get(), 6, Bytes("cd"))).ok());
  EXPECT_EQ(env.Contents("f"), Bytes(std::string_view("ab\0\0\0\0cd", 8)));
  EXPECT_EQ(*f->Size(), 8u);
  EXPECT_EQ(*env.FileSize("f"), 8u);
  ASSERT_TRUE(f->Truncate(3).ok());
  EXPECT_EQ(env.Contents("f"), Bytes(std::string_view("ab\0", 3)));
  ASSERT_TRUE(f->Truncate(5).ok());
  EXPECT_EQ(env.Contents("f"), Bytes(std::string_view("ab\0\0\0", 5)));
}

TEST(MemEnvTest, DiscardAndZeroMakeZerosWithoutExtending) {
  MemEnv env;
  env.SetContents("f", Filled(16, 0xaa));
  std::unique_ptr<File> f = MustOpen(env, "f", {.writable = true});
  ASSERT_TRUE(BlockOn(DiscardAt(f.get(), 2, 3)).ok());
  ASSERT_TRUE(BlockOn(ZeroAt(f.get(), 12, 100)).ok());  // runs past the end
  ASSERT_TRUE(BlockOn(ZeroAt(f.get(), 50, 10)).ok());   // wholly past the end
  std::vector<std::byte> want = Filled(16, 0xaa);
  std::fill(want.begin() + 2, want.begin() + 5, std::byte{0});
  std::fill(want.begin() + 12, want.end(), std::byte{0});
  EXPECT_EQ(env.Contents("f"), want);
}

TEST(MemEnvTest, ReadOnlyHandlesRejectChangesWithEbadf) {
  MemEnv env;
  env.SetContents("f", Bytes("data"));
  std::unique_ptr<File> f = MustOpen(env, "f", kReadOnly);
  for (Status s : {BlockOn(WriteAt(f.get(), 0, Bytes("x"))), BlockOn(DiscardAt(f.get(), 0, 1)),
                   BlockOn(ZeroAt(f.get(), 0, 1)), f->Truncate(0)}) {
    EXPECT_TRUE(s.IsIoError()) << s.ToString();
    EXPECT_EQ(s.error_number(), EBADF) << s.ToString();
    EXPECT_NE(s.message().find("f:"), std::string::npos) << s.ToString();
  }
  EXPECT_TRUE(BlockOn(SyncOf(f.get())).ok());
  EXPECT_EQ(env.Contents("f"), Bytes("data"));
}

TEST(MemEnvTest, HandlesShareBytesAndRemoveOnlyUnlinksThePath) {
  MemEnv env;
  std::unique_ptr<File> a = MustOpen(env, "f", kCreate);
  std::unique_ptr<File> b = MustOpen(env, "f", kReadOnly);
  ASSERT_TRUE(BlockOn(WriteAt(a.get(), 0, Bytes("shared"))).ok());
  std::vector<std::byte> buf(6);
  ASSERT_TRUE(BlockOn(b->ReadExact(0, buf)).ok());
  EXPECT_EQ(buf, Bytes("shared"));

  EXPECT_TRUE(env.Remove("f"));
  EXPECT_FALSE(env.Remove("f"));
  EXPECT_FALSE(env.Exists("f"));
  EXPECT_TRUE(env.FileSize("f").status().IsIoError());
  // Like an unlinked POSIX file: the handles still work on the old bytes.
  ASSERT_TRUE(BlockOn(WriteAt(a.get(), 0, Bytes("S"))).ok());
  ASSERT_TRUE(BlockOn(b->ReadExact(0, buf)).ok());
  EXPECT_EQ(buf, Bytes("Shared"));
  // And a new file at the path is a different file.
  std::unique_ptr<File> c = MustOpen(env, "f", kCreate);
  EXPECT_EQ(*c->Size(), 0u);
}

TEST(MemEnvTest, SetContentsIsSeenByOpenHandles) {
  MemEnv env;
  env.SetContents("b", Bytes("1"));
  env.SetContents("a", Bytes("old"));
  std::unique_ptr<File> f = MustOpen(env, "a", kReadOnly);
  env.SetContents("a", Bytes("new!"));
  std::vector<std::byte> buf(4);
  ASSERT_TRUE(BlockOn(f->ReadExact(0, buf)).ok());
  EXPECT_EQ(buf, Bytes("new!"));
  EXPECT_EQ(env.Paths(), (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(env.Contents("nope").empty());
}

TEST(MemEnvTest, DirectHandlesRequireAlignedTransfers) {
  MemEnv env;
  std::unique_ptr<File> f = MustOpen(env, "f", {.writable = true, .create = true, .direct = true});
  AlignedBuffer buf(1024);
  EXPECT_TRUE(BlockOn(WriteAt(f.get(), 0, buf.span())).ok());
  EXPECT_EQ(BlockOn(WriteAt(f.get(), 1, buf.span())).error_number(), EINVAL);
  EXPECT_EQ(BlockOn(WriteAt(f.get(), 0, buf.span().subspan(0, 100))).error_number(), EINVAL);
  EXPECT_EQ(BlockOn(WriteAt(f.get(), 0, buf.span().subspan(8, 512))).error_number(), EINVAL);
  EXPECT_TRUE(BlockOn(ReadAt(f.get(), 512, buf.span().subspan(0, 512))).ok());
  EXPECT_EQ(BlockOn(ReadAt(f.get(), 3, buf.span())).status().error_number(), EINVAL);
}

TEST(MemEnvTest, GrowingPastMaxFileSizeIsNoSpace) {
  MemEnv env({.max_file_size = 4096});
  std::unique_ptr<File> f = MustOpen(env, "f", kCreate);
  EXPECT_TRUE(BlockOn(WriteAt(f.get(), 4095, Bytes("x"))).ok());
  Status s = BlockOn(WriteAt(f.get(), 4096, Bytes("x")));
  EXPECT_TRUE(s.IsNoSpace()) << s.ToString();
  EXPECT_TRUE(f->Truncate(4097).IsNoSpace());
  EXPECT_EQ(*f->Size(), 4096u);
}

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

TEST(MemEnvTest, ExportAndImportCopyBytesExactly) {
  MemEnv env;
  std::vector<std::byte> data(100000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = std::byte(i * 7 + 3);
  env.SetContents("img", data);
  const std::string host = TempDir() + "/mem_env_export_test.bin";
  ASSERT_TRUE(env.ExportToHostFile("img", host).ok());
  ASSERT_TRUE(env.ImportFromHostFile(host, "copy").ok());
  EXPECT_EQ(env.Contents("copy"), data);
  ::unlink(host.c_str());

  Status missing = env.ExportToHostFile("nope", host);
  EXPECT_EQ(missing.error_number(), ENOENT);
  missing = env.ImportFromHostFile(TempDir() + "/does/not/exist", "x");
  EXPECT_EQ(missing.error_number(), ENOENT);
  EXPECT_NE(missing.message().find("/does/not/exist"), std::string::npos);
}

// The reason for Export/Import: an image that went through a MemEnv can be
// checked by qemu-img on the host.
TEST(MemEnvTest, QemuImgAcceptsAnImageThatWentThroughMemEnv) {
  const char* kQemuImg = "/usr/bin/qemu-img";
  if (::access(kQemuImg, X_OK) != 0) GTEST_SKIP() << kQemuImg << " is not installed";
  const std::string original = TempDir() + "/mem_env_qemu_original.qcow2";
  const std::string exported = TempDir() + "/mem_env_qemu_exported.qcow2";
  const std::string create = std::string(kQemuImg) + " create -q -f qcow2 " + original + " 1M";
  ASSERT_EQ(std::system(create.c_str()), 0);
  MemEnv env;
  ASSERT_TRUE(env.ImportFromHostFile(original, "img.qcow2").ok());
  ASSERT_TRUE(env.ExportToHostFile("img.qcow2", exported).ok());
  const std::string check = std::string(kQemuImg) + " check -q " + exported;
  EXPECT_EQ(std::system(check.c_str()), 0);
  ::unlink(original.c_str());
  ::unlink(exported.c_str());
}

TEST(MemEnvTest, SynchronousFilesWorkFromSeveralThreads) {
  MemEnv env;
  std::unique_ptr<File> f = MustOpen(env, "f", kCreate);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&f, t] {
      std::vector<std::byte> block = Filled(4096, static_cast<uint8_t>(t + 1));
      for (int i = 0; i < 50; ++i) {
        EXPECT_TRUE(BlockOn(WriteAt(f.get(), (i * 4 + t) * 4096, block)).ok());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::vector<std::byte> bytes = env.Contents("f");
  ASSERT_EQ(bytes.size(), 200u * 4096);
  for (size_t block = 0; block < 200; ++block) {
    EXPECT_EQ(bytes[block * 4096], std::byte(block % 4 + 1)) << block;
  }
}

// --- Deferred completion ---

MemEnvOptions Deferred(uint64_t seed) {
  return {.completion = MemEnvOptions::Completion::kDeferred, .seed = seed};
}

TEST(MemEnvDeferredTest, StartQueuesAndTheDataMovesAtCompletion) {
  MemEnv env(Deferred(1));
  EXPECT_FALSE(env.Poll());  // nothing pending
  env.SetContents("f", Bytes("aaaa"));
  std::unique_ptr<File> f = MustOpen(env, "f", {.writable = true});
  std::vector<std::byte> data = Bytes("bb");
  IoRequest write{.op = IoRequest::Op::kWrite, .offset = 1, .data = data.data(), .length = 2};
  EXPECT_FALSE(f->Start(write));
  std::vector<std::byte> buf(4);
  IoRequest read{.op = IoRequest::Op::kRead, .offset = 0, .data = buf.data(), .length = 4};
  EXPECT_FALSE(f->Start(read));
  EXPECT_EQ(env.pending(), 2u);
  EXPECT_EQ(env.Contents("f"), Bytes("aaaa"));  // not yet

  while (env.Poll()) {
  }
  EXPECT_EQ(env.pending(), 0u);
  EXPECT_EQ(write.result, 2);
  EXPECT_EQ(read.result, 4);
  EXPECT_EQ(env.Contents("f"), Bytes("abba"));
  // The read saw the write or not, depending on which completed first.
  EXPECT_TRUE(buf == Bytes("aaaa") || buf == Bytes("abba"));
}

Task<void> WriteAndRecord(File* f, uint64_t offset, std::vector<std::byte> data, int id,
                          std::vector<int>* order) {
  Status s = co_await f->Write(offset, data);
  EXPECT_TRUE(s.ok()) << s.ToString();
  order->push_back(id);
}

// Starts `n` writes at once (each to its own block) and returns the order in
// which they completed.
std::vector<int> CompletionOrder(uint64_t seed, int n) {
  MemEnv env(Deferred(seed));
  std::unique_ptr<File> f = MustOpen(env, "f", kCreate);
  std::vector<int> order;
  for (int i = 0; i < n; ++i) {
    Spawn(WriteAndRecord(f.get(), i * 512, Filled(512, static_cast<uint8_t>(i)), i, &order));
  }
  EXPECT_EQ(env.pending(), static_cast<size_t>(n));
  EXPECT_TRUE(order.empty());
  int polls = 0;
  while (env.Poll()) ++polls;
  EXPECT_GT(polls, 0);
  EXPECT_LE(polls, n);
  std::vector<std::byte> bytes = env.Contents("f");
  EXPECT_EQ(bytes.size(), static_cast<size_t>(n) * 512);
  for (int i = 0; i < n && static_cast<size_t>(i) * 512 < bytes.size(); ++i) {
    EXPECT_EQ(bytes[i * 512], std::byte(i));
  }
  return order;
}

TEST(MemEnvDeferredTest, CompletesEverythingInARandomOrderThatTheSeedFixes) {
  std::vector<int> sorted(32);
  std::iota(sorted.begin(), sorted.end(), 0);
  std::vector<int> first = CompletionOrder(7, 32);
  std::vector<int> as_set = first;
  std::sort(as_set.begin(), as_set.end());
  EXPECT_EQ(as_set, sorted);  // each exactly once
  EXPECT_NE(first, sorted);   // and not in issue order
  EXPECT_EQ(CompletionOrder(7, 32), first);
  // Some other seed gives another order.
  bool differs = false;
  for (uint64_t seed = 8; seed < 12 && !differs; ++seed) {
    differs = CompletionOrder(seed, 32) != first;
  }
  EXPECT_TRUE(differs);
}

TEST(MemEnvDeferredTest, OverlappingWritesEndAsTheLastCompletedOne) {
  for (uint64_t seed = 0; seed < 16; ++seed) {
    MemEnv env(Deferred(seed));
    std::unique_ptr<File> f = MustOpen(env, "f", kCreate);
    std::vector<int> order;
    for (int i = 0; i < 4; ++i) {
      Spawn(WriteAndRecord(f.get(), 0, Filled(8, static_cast<uint8_t>(i)), i, &order));
    }
    while (env.Poll()) {
    }
    ASSERT_EQ(order.size(), 4u);
    EXPECT_EQ(env.Contents("f"), Filled(8, static_cast<uint8_t>(order.back()))) << seed;
  }
}

Task<Status> SequentialWork(File* f) {
  for (int i = 0; i < 10; ++i) {
    CO_RETURN_IF_ERROR(co_await f->Write(i * 4, Bytes("abcd")));
  }
  CO_RETURN_IF_ERROR(co_await f->Sync());
  std::vector<std::byte> buf(40);
  CO_RETURN_IF_ERROR(co_await f->ReadExact(0, buf));
  if (buf[39] != std::byte{'d'}) co_return Status::Corruption("unexpected byte");
  co_return Status::Ok();
}

TEST(MemEnvDeferredTest, BlockOnDrivesTasksOnTheMemEnv) {
  MemEnv env(Deferred(3));
  std::unique_ptr<File> f = MustOpen(env, "f", kCreate);
  Status s = BlockOn(SequentialWork(f.get()), &env);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(env.pending(), 0u);
}

TEST(MemEnvDeferredTest, ErrorsAlsoArriveAtCompletion) {
  MemEnv env(Deferred(1));
  env.SetContents("f", Bytes("x"));
  std::unique_ptr<File> f = MustOpen(env, "f", kReadOnly);
  Status s = BlockOn(WriteAt(f.get(), 0, Bytes("y")), &env);
  EXPECT_EQ(s.error_number(), EBADF);
}

// Off-thread work that waits for I/O queued on this thread (as WaitUnpinned
// waits for TryAnyThread requests) finishes once polling completes that I/O,
// and its caller resumes on the polling thread.
TEST(MemEnvDeferredTest, OffThreadWorkMayWaitForThisThreadsIo) {
  MemEnv env(Deferred(5));
  std::unique_ptr<File> f = MustOpen(env, "f", kCreate);
  std::mutex mu;
  std::condition_variable cv;
  bool written = false;
  std::thread::id resumed_on;
  auto write = [&]() -> Task<void> {
    Status st = co_await f->Write(0, Bytes("abc"));
    EXPECT_TRUE(st.ok());
    std::lock_guard lock(mu);
    written = true;
    cv.notify_all();
  };
  auto wait = [&]() -> Task<void> {
    co_await env.RunOffThread([&] {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return written; });
    });
    resumed_on = std::this_thread::get_id();
  };
  bool done = false;
  Spawn([](Task<void> t, bool* d) -> Task<void> {
    co_await std::move(t);
    *d = true;
  }(wait(), &done));
  Spawn(write());
  EXPECT_FALSE(done);
  // The waiting work blocks off this thread; the write is queued after it.
  // Nothing would complete if RunOffThread ran the work inline.
  while (env.Poll()) {
  }
  EXPECT_TRUE(done);
  EXPECT_EQ(resumed_on, std::this_thread::get_id());
}

}  // namespace
}  // namespace uq::qcow2::testing
