#include "qcow2/testing/fault_injection_env.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <set>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2::testing {
namespace {

std::vector<std::byte> Filled(size_t n, uint8_t value) {
  return std::vector<std::byte>(n, std::byte{value});
}

Task<Status> WriteAt(File* f, uint64_t offset, std::vector<std::byte> data) {
  co_return co_await f->Write(offset, data);
}
Task<Result<size_t>> ReadAt(File* f, uint64_t offset, std::span<std::byte> out) {
  co_return co_await f->Read(offset, out);
}
Task<Status> ZeroAt(File* f, uint64_t offset, uint64_t length) {
  co_return co_await f->Zero(offset, length);
}
Task<Status> SyncOf(File* f) { co_return co_await f->Sync(); }

constexpr OpenOptions kCreate{.writable = true, .create = true};

// Every test runs on a MemEnv of each completion mode: the parameter says
// whether it is deferred.
class FaultInjectionEnvTest : public ::testing::TestWithParam<bool> {
 protected:
  FaultInjectionEnvTest()
      : mem_(MemEnvOptions{.completion = GetParam() ? MemEnvOptions::Completion::kDeferred
                                                    : MemEnvOptions::Completion::kSynchronous,
                           .seed = 42}),
        env_(&mem_) {}

  std::unique_ptr<File> Open(const std::string& path, OpenOptions options = kCreate) {
    Result<std::unique_ptr<File>> file = env_.Open(path, options);
    EXPECT_TRUE(file.ok()) << file.status().ToString();
    return file.ok() ? std::move(file).value() : nullptr;
  }
  template <class T>
  T Run(Task<T> task) {
    return BlockOn(std::move(task), &mem_);
  }
  Status Write(File* f, uint64_t offset, std::vector<std::byte> data) {
    return Run(WriteAt(f, offset, std::move(data)));
  }
  Status Sync(File* f) { return Run(SyncOf(f)); }
  void Drain() {
    while (mem_.Poll()) {
    }
  }

  MemEnv mem_;
  FaultInjectionEnv env_;
};

INSTANTIATE_TEST_SUITE_P(CompletionModes, FaultInjectionEnvTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "Deferred" : "Synchronous";
                         });

TEST_P(FaultInjectionEnvTest, ForwardsToTheMemEnv) {
  std::unique_ptr<File> f = Open("img");
  ASSERT_TRUE(Write(f.get(), 0, Filled(100, 1)).ok());
  ASSERT_TRUE(Write(f.get(), 200, Filled(100, 2)).ok());
  EXPECT_EQ(*f->Size(), 300u);
  EXPECT_EQ(f->path(), "img");
  std::vector<std::byte> buf(300);
  Result<size_t> n = Run(ReadAt(f.get(), 0, buf));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 300u);
  EXPECT_EQ(buf, mem_.Contents("img"));
  EXPECT_TRUE(env_.Exists("img"));
  EXPECT_FALSE(env_.Exists("other"));
  Result<std::unique_ptr<File>> missing = env_.Open("other", {});
  EXPECT_EQ(missing.status().error_number(), ENOENT);
  EXPECT_EQ(env_.in_flight(), 0u);
}

TEST_P(FaultInjectionEnvTest, FailNthWriteFailsOnlyThatWriteAndWritesNothing) {
  std::unique_ptr<File> f = Open("img");
  env_.FailNthWrite(2, ENOSPC);
  for (int i = 0; i < 5; ++i) {
    Status s = Write(f.get(), i * 10, Filled(10, static_cast<uint8_t>(i + 1)));
    if (i == 2) {
      EXPECT_TRUE(s.IsNoSpace()) << s.ToString();
      EXPECT_NE(s.message().find("img"), std::string::npos) << s.ToString();
    } else {
      EXPECT_TRUE(s.ok()) << i << ": " << s.ToString();
    }
  }
  std::vector<std::byte> want;
  for (int i = 0; i < 5; ++i) {
    std::vector<std::byte> block = Filled(10, i == 2 ? 0 : static_cast<uint8_t>(i + 1));
    want.insert(want.end(), block.begin(), block.end());
  }
  EXPECT_EQ(mem_.Contents("img"), want);
}

TEST_P(FaultInjectionEnvTest, AFailedSyncMakesNothingDurable) {
  std::unique_ptr<File> f = Open("img");
  env_.FailNthSync(1, EIO);
  ASSERT_TRUE(Write(f.get(), 0, Filled(4, 1)).ok());
  ASSERT_TRUE(Sync(f.get()).ok());
  ASSERT_TRUE(Write(f.get(), 0, Filled(4, 2)).ok());
  Status s = Sync(f.get());
  EXPECT_TRUE(s.IsIoError());
  EXPECT_EQ(s.error_number(), EIO);
  EXPECT_EQ(*env_.DurableContents("img"), Filled(4, 1));
  EXPECT_EQ(env_.unsynced_changes("img"), 1u);
  ASSERT_TRUE(Sync(f.get()).ok());  // only the 1st sync was to fail
  EXPECT_EQ(*env_.DurableContents("img"), Filled(4, 2));
}

TEST_P(FaultInjectionEnvTest, FailFromHitsEveryLaterOperationOnItsPathOnly) {
  std::unique_ptr<File> a = Open("a");
  std::unique_ptr<File> b = Open("b");
  env_.FailFrom(1, EIO, "a");
  EXPECT_TRUE(Write(a.get(), 0, Filled(4, 1)).ok());
  EXPECT_FALSE(Write(a.get(), 0, Filled(4, 2)).ok());
  EXPECT_FALSE(Sync(a.get()).ok());
  std::vector<std::byte> buf(4);
  EXPECT_FALSE(Run(ReadAt(a.get(), 0, buf)).ok());
  EXPECT_TRUE(Write(b.get(), 0, Filled(4, 3)).ok());
  EXPECT_TRUE(Sync(b.get()).ok());
  env_.ClearFaults();
  EXPECT_TRUE(Sync(a.get()).ok());
  EXPECT_EQ(mem_.Contents("a"), Filled(4, 1));
}

TEST_P(FaultInjectionEnvTest, AShortReadLooksLikeEndOfFile) {
  mem_.SetContents("img", Filled(4096, 7));
  std::unique_ptr<File> f = Open("img", {});
  env_.ShortNthRead(1, 100);
  std::vector<std::byte> buf(1024, std::byte{0xee});
  EXPECT_EQ(*Run(ReadAt(f.get(), 0, buf)), 1024u);
  buf.assign(1024, std::byte{0xee});
  EXPECT_EQ(*Run(ReadAt(f.get(), 0, buf)), 100u);
  EXPECT_EQ(buf[99], std::byte{7});
  EXPECT_EQ(buf[100], std::byte{0xee});  // untouched
  // The engine's exact reads turn it into Corruption.
  env_.ShortNthRead(0, 512);
  Status s = Run(f->ReadExact(0, buf));
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
}

TEST_P(FaultInjectionEnvTest, ACrashDropsExactlyTheUnsyncedChanges) {
  std::unique_ptr<File> f = Open("img");
  ASSERT_TRUE(Write(f.get(), 0, Filled(1024, 1)).ok());
  ASSERT_TRUE(Sync(f.get()).ok());
  ASSERT_TRUE(Write(f.get(), 512, Filled(512, 2)).ok());   // overwrite
  ASSERT_TRUE(Write(f.get(), 4096, Filled(512, 3)).ok());  // extend
  ASSERT_TRUE(Run(ZeroAt(f.get(), 0, 256)).ok());
  ASSERT_TRUE(f->Truncate(8192).ok());
  EXPECT_EQ(env_.unsynced_changes("img"), 4u);
  EXPECT_EQ(mem_.Contents("img").size(), 8192u);

  ASSERT_TRUE(env_.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
  EXPECT_EQ(mem_.Contents("img"), Filled(1024, 1));
  EXPECT_EQ(env_.unsynced_changes("img"), 0u);
  // The old handle is frozen; a new one sees the durable bytes.
  EXPECT_EQ(Write(f.get(), 0, Filled(1, 9)).error_number(), EIO);
  EXPECT_FALSE(f->Size().ok());
  EXPECT_FALSE(f->Truncate(0).ok());
  std::unique_ptr<File> g = Open("img", {.writable = true});
  std::vector<std::byte> buf(1024);
  ASSERT_TRUE(Run(g->ReadExact(0, buf)).ok());
  EXPECT_EQ(buf, Filled(1024, 1));
  EXPECT_EQ(*g->Size(), 1024u);
  EXPECT_TRUE(Write(g.get(), 0, Filled(1, 9)).ok());
}

TEST_P(FaultInjectionEnvTest, ASyncThroughAnyHandleCoversThePath) {
  std::unique_ptr<File> writer = Open("img");
  std::unique_ptr<File> syncer = Open("img", {.writable = true});
  ASSERT_TRUE(Write(writer.get(), 0, Filled(16, 5)).ok());
  ASSERT_TRUE(Sync(syncer.get()).ok());
  ASSERT_TRUE(env_.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
  EXPECT_EQ(mem_.Contents("img"), Filled(16, 5));
}

TEST_P(FaultInjectionEnvTest, FilesThatExistedBeforeOpeningAreDurable) {
  mem_.SetContents("base.qcow2", Filled(64, 4));
  std::unique_ptr<File> f = Open("base.qcow2", {.writable = true});
  ASSERT_TRUE(Write(f.get(), 0, Filled(8, 5)).ok());
  ASSERT_TRUE(env_.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
  EXPECT_EQ(mem_.Contents("base.qcow2"), Filled(64, 4));
  // Opening with truncate counts as durable at once.
  f = Open("base.qcow2", {.writable = true, .create = true, .truncate = true});
  ASSERT_TRUE(env_.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
  EXPECT_TRUE(mem_.Exists("base.qcow2"));
  EXPECT_TRUE(mem_.Contents("base.qcow2").empty());
}

// A workload of 10 block writes with a sync after every third: 13 boundaries.
Task<Status> Workload(FaultInjectionEnv* env) {
  CO_ASSIGN_OR_RETURN(std::unique_ptr<File> f, env->Open("img", kCreate));
  for (int i = 0; i < 10; ++i) {
    std::vector<std::byte> block = Filled(512, static_cast<uint8_t>(i + 1));
    CO_RETURN_IF_ERROR(co_await f->Write(i * 512, block));
    if (i % 3 == 2) CO_RETURN_IF_ERROR(co_await f->Sync());
  }
  co_return Status::Ok();
}

// What a crash at boundary n must leave: the writes before the last sync
// that happened.
std::vector<std::byte> DurableAfterCrashAt(uint64_t n) {
  std::vector<std::byte> durable;
  std::vector<std::byte> current;
  uint64_t boundary = 0;
  for (int i = 0; i < 10; ++i) {
    if (boundary++ == n) return durable;
    std::vector<std::byte> block = Filled(512, static_cast<uint8_t>(i + 1));
    current.insert(current.end(), block.begin(), block.end());
    if (i % 3 == 2) {
      if (boundary++ == n) return durable;
      durable = current;
    }
  }
  return durable;
}

TEST_P(FaultInjectionEnvTest, CrashAtOperationStopsAtEachBoundary) {
  ASSERT_TRUE(Run(Workload(&env_)).ok());
  const uint64_t count = env_.operation_count();
  ASSERT_EQ(count, 13u);
  EXPECT_FALSE(env_.crashed());

  for (uint64_t n = 0; n < count; ++n) {
    SCOPED_TRACE(n);
    MemEnv mem(MemEnvOptions{.completion = GetParam() ? MemEnvOptions::Completion::kDeferred
                                                      : MemEnvOptions::Completion::kSynchronous,
                             .seed = n});
    FaultInjectionEnv env(&mem);
    env.CrashAtOperation(n);
    Status s = BlockOn(Workload(&env), &mem);
    EXPECT_EQ(s.error_number(), EIO) << s.ToString();
    while (mem.Poll()) {
    }
    EXPECT_TRUE(env.crashed());
    EXPECT_EQ(env.operation_count(), n);
    // Nothing works until the crash is simulated.
    EXPECT_FALSE(env.Open("img", {}).ok());
    ASSERT_TRUE(env.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
    EXPECT_FALSE(env.crashed());
    EXPECT_EQ(mem.Contents("img"), DurableAfterCrashAt(n));
    // After the crash the image can be reopened and used.
    Result<std::unique_ptr<File>> reopened = env.Open("img", {.writable = true});
    ASSERT_TRUE(reopened.ok());
    EXPECT_TRUE(BlockOn(SyncOf(reopened->get()), &mem).ok());
  }
}

TEST_P(FaultInjectionEnvTest, ACrashPointInThePastCrashesTheNextBoundary) {
  std::unique_ptr<File> f = Open("img");
  ASSERT_TRUE(Write(f.get(), 0, Filled(1, 1)).ok());
  ASSERT_TRUE(Write(f.get(), 0, Filled(1, 1)).ok());
  env_.CrashAtOperation(0);
  std::vector<std::byte> buf(1);
  EXPECT_TRUE(Run(ReadAt(f.get(), 0, buf)).ok());  // reads are not boundaries
  EXPECT_FALSE(env_.crashed());
  EXPECT_EQ(Sync(f.get()).error_number(), EIO);
  EXPECT_TRUE(env_.crashed());
  EXPECT_EQ(env_.operation_count(), 2u);
  EXPECT_EQ(Run(ReadAt(f.get(), 0, buf)).status().error_number(), EIO);  // nor anything else
}

// Sectors 0..3 all start as 0, then three unsynced writes: v1 over sectors
// 0-3, v2 over 1-2, v3 over 2. Returns the crash result for `mode` and `seed`.
std::vector<std::byte> CrashLayeredWrites(CrashMode mode, uint64_t seed) {
  MemEnv mem;
  FaultInjectionEnv env(&mem);
  std::unique_ptr<File> f = std::move(env.Open("img", kCreate)).value();
  EXPECT_TRUE(BlockOn(WriteAt(f.get(), 0, Filled(2048, 0))).ok());
  EXPECT_TRUE(BlockOn(SyncOf(f.get())).ok());
  EXPECT_TRUE(BlockOn(WriteAt(f.get(), 0, Filled(2048, 1))).ok());
  EXPECT_TRUE(BlockOn(WriteAt(f.get(), 512, Filled(1024, 2))).ok());
  EXPECT_TRUE(BlockOn(WriteAt(f.get(), 1024, Filled(512, 3))).ok());
  EXPECT_TRUE(env.SimulateCrash(mode, seed).ok());
  return mem.Contents("img");
}

// The sector values of `bytes`, checking each sector is uniform.
std::vector<int> Sectors(const std::vector<std::byte>& bytes) {
  std::vector<int> out;
  for (size_t s = 0; s * 512 < bytes.size(); ++s) {
    for (size_t i = 1; i < 512; ++i) EXPECT_EQ(bytes[s * 512 + i], bytes[s * 512]);
    out.push_back(static_cast<int>(bytes[s * 512]));
  }
  return out;
}

TEST(FaultInjectionCrashModeTest, KeepRandomSubsetAppliesWholeWritesInOrder) {
  // The eight states applying a subset of {v1, v2, v3} in order can give.
  std::set<std::vector<int>> allowed;
  for (int mask = 0; mask < 8; ++mask) {
    std::vector<int> s(4, 0);
    if (mask & 1) s = {1, 1, 1, 1};
    if (mask & 2) s[1] = s[2] = 2;
    if (mask & 4) s[2] = 3;
    allowed.insert(s);
  }
  std::set<std::vector<int>> seen;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    std::vector<int> sectors = Sectors(CrashLayeredWrites(CrashMode::kKeepRandomSubset, seed));
    EXPECT_TRUE(allowed.contains(sectors)) << seed;
    seen.insert(sectors);
    EXPECT_EQ(Sectors(CrashLayeredWrites(CrashMode::kKeepRandomSubset, seed)), sectors);
  }
  EXPECT_EQ(seen, allowed);  // 64 seeds reach all 8 states
  EXPECT_EQ(Sectors(CrashLayeredWrites(CrashMode::kDropAllUnsynced, 5)),
            (std::vector<int>{0, 0, 0, 0}));
}

TEST(FaultInjectionCrashModeTest, KeepRandomSectorsKeepsEachSectorOnAVersionItHad) {
  const std::vector<std::set<int>> versions = {{0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1}};
  bool torn = false;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    std::vector<int> sectors = Sectors(CrashLayeredWrites(CrashMode::kKeepRandomSectors, seed));
    ASSERT_EQ(sectors.size(), 4u);
    for (size_t s = 0; s < 4; ++s) EXPECT_TRUE(versions[s].contains(sectors[s])) << seed;
    // v1 torn: its first sector kept, its last dropped.
    torn = torn || (sectors[0] == 1 && sectors[3] == 0);
  }
  EXPECT_TRUE(torn);
}

TEST(FaultInjectionDeferredTest, ASyncCoversOnlyWritesCompletedBeforeItStarted) {
  MemEnv mem({.completion = MemEnvOptions::Completion::kDeferred, .seed = 1});
  FaultInjectionEnv env(&mem);
  std::unique_ptr<File> f = std::move(env.Open("img", kCreate)).value();
  std::vector<std::byte> data = Filled(512, 1);
  IoRequest write{.op = IoRequest::Op::kWrite, .offset = 0, .data = data.data(), .length = 512};
  IoRequest sync{.op = IoRequest::Op::kSync};
  EXPECT_FALSE(f->Start(write));
  EXPECT_FALSE(f->Start(sync));  // the write is still in flight
  EXPECT_EQ(env.in_flight(), 2u);
  // Refused while anything is in flight.
  EXPECT_TRUE(env.SimulateCrash(CrashMode::kDropAllUnsynced).IsInvalidArgument());
  while (mem.Poll()) {
  }
  EXPECT_EQ(write.result, 512);
  EXPECT_EQ(sync.result, 0);
  EXPECT_EQ(env.unsynced_changes("img"), 1u);
  ASSERT_TRUE(env.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
  EXPECT_TRUE(mem.Contents("img").empty());
}

TEST(FaultInjectionDeferredTest, WritesInFlightAtTheCrashReachTheFileButReportEio) {
  MemEnv mem({.completion = MemEnvOptions::Completion::kDeferred, .seed = 1});
  FaultInjectionEnv env(&mem);
  std::unique_ptr<File> f = std::move(env.Open("img", kCreate)).value();
  std::vector<std::byte> data = Filled(512, 1);
  IoRequest in_flight{.op = IoRequest::Op::kWrite, .offset = 0, .data = data.data(), .length = 512};
  EXPECT_FALSE(f->Start(in_flight));
  env.CrashAtOperation(1);
  IoRequest crashing{
      .op = IoRequest::Op::kWrite, .offset = 512, .data = data.data(), .length = 512};
  EXPECT_TRUE(f->Start(crashing));  // refused at once
  EXPECT_EQ(crashing.result, -EIO);
  EXPECT_TRUE(env.crashed());
  while (mem.Poll()) {
  }
  EXPECT_EQ(in_flight.result, -EIO);
  EXPECT_EQ(env.unsynced_changes("img"), 1u);
  // It reached the file but no sync covers it: a drop-all crash removes it.
  EXPECT_EQ(mem.Contents("img"), data);
  EXPECT_TRUE(env.DurableContents("img")->empty());
  ASSERT_TRUE(env.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
  EXPECT_TRUE(mem.Contents("img").empty());
}

TEST(FaultInjectionDeferredTest, ASyncInFlightAtTheCrashMakesNothingDurable) {
  MemEnv mem({.completion = MemEnvOptions::Completion::kDeferred, .seed = 1});
  FaultInjectionEnv env(&mem);
  std::unique_ptr<File> f = std::move(env.Open("img", kCreate)).value();
  std::vector<std::byte> data = Filled(512, 1);
  IoRequest write{.op = IoRequest::Op::kWrite, .offset = 0, .data = data.data(), .length = 512};
  EXPECT_FALSE(f->Start(write));
  while (mem.Poll()) {
  }
  ASSERT_EQ(write.result, 512);
  IoRequest sync{.op = IoRequest::Op::kSync};
  EXPECT_FALSE(f->Start(sync));  // would cover the write, but the crash comes first
  env.CrashAtOperation(2);
  IoRequest crashing{.op = IoRequest::Op::kSync};
  EXPECT_TRUE(f->Start(crashing));
  while (mem.Poll()) {
  }
  EXPECT_EQ(sync.result, -EIO);
  EXPECT_TRUE(env.DurableContents("img")->empty());
  ASSERT_TRUE(env.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
  EXPECT_TRUE(mem.Contents("img").empty());
}

TEST(FaultInjectionDeferredTest, ManyConcurrentWritesAndSyncsCrashConsistently) {
  // Random interleavings: after a drop-all crash every block holds either 0
  // (never synced) or the value of a write that completed before a sync
  // started, never anything else.
  for (uint64_t seed = 0; seed < 20; ++seed) {
    MemEnv mem({.completion = MemEnvOptions::Completion::kDeferred, .seed = seed});
    FaultInjectionEnv env(&mem);
    std::unique_ptr<File> f = std::move(env.Open("img", kCreate)).value();
    std::vector<std::vector<std::byte>> blocks;
    for (int i = 0; i < 16; ++i) blocks.push_back(Filled(512, static_cast<uint8_t>(i + 1)));
    std::vector<IoRequest> requests(20);
    for (int i = 0; i < 20; ++i) {
      IoRequest& r = requests[i];
      if (i % 5 == 4) {
        r.op = IoRequest::Op::kSync;
      } else {
        const int b = i - i / 5;
        r = {.op = IoRequest::Op::kWrite,
             .offset = static_cast<uint64_t>(b % 8) * 512,
             .data = blocks[b].data(),
             .length = 512};
      }
      EXPECT_FALSE(f->Start(r));
      if (i % 3 == 0) mem.Poll();
    }
    while (mem.Poll()) {
    }
    for (const IoRequest& r : requests) EXPECT_GE(r.result, 0);
    std::vector<std::byte> durable = *env.DurableContents("img");
    ASSERT_TRUE(env.SimulateCrash(CrashMode::kDropAllUnsynced).ok());
    EXPECT_EQ(mem.Contents("img"), durable);
    for (size_t b = 0; b * 512 < durable.size(); ++b) {
      const int v = static_cast<int>(durable[b * 512]);
      EXPECT_TRUE(v == 0 || (v - 1) % 8 == static_cast<int>(b)) << seed << " " << b;
    }
  }
}

}  // namespace
}  // namespace uq::qcow2::testing
