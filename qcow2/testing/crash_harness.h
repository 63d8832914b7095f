// The harness the fault-injection crash tests share (qcow2/*_crash_test.cc,
// tools/*_crash_test.cc). Each of those tests has the same shape:
//
//   1. QEMU makes the starting image(s) in a ScratchDir (MakeImage,
//      MakeBackedImage, or the test's own qemu-img/qemu-io commands);
//   2. a run copies them into a fresh MemEnv (ImportImage), wraps it in a
//      FaultInjectionEnv that crashes at write/sync boundary N (CrashRun),
//      does the job under test (writes, a resize, a snapshot operation...),
//      then simulates the crash, by default in CrashMode N % 3 so that
//      consecutive points cycle through the three modes, and copies the
//      survivors back out (ExportImage);
//   3. a run without a crash counts the boundaries, then the test replays the
//      job once per boundary and checks what survived: with the engine's own
//      check on the in-memory file (EngineCheckPasses, CheckInMemory) and/or
//      `qemu-img check` and `qemu-img convert` of the exported file
//      (QemuCheckPasses, RawView), labelling failures with CrashPoint(n, mode).
//
// What differs from test to test (the job, the model of what must survive,
// how many modes each boundary gets) stays in the test; this library holds
// only the pieces that were repeated verbatim. Test-only; not thread-safe.
#ifndef UBLK_QCOW2_QCOW2_TESTING_CRASH_HARNESS_H_
#define UBLK_QCOW2_QCOW2_TESTING_CRASH_HARNESS_H_

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"
#include "qcow2/block_device.h"
#include "qcow2/check/check.h"
#include "qcow2/testing/fault_injection_env.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2::testing {

// A parameterized fixture whose case has a `name`: SetUp makes a fresh
// ScratchDir called `prefix` + the case's name. A derived SetUp must call
// this one first (and stop on HasFatalFailure()).
template <typename Case>
class CrashFixture : public ::testing::TestWithParam<Case> {
 protected:
  explicit CrashFixture(std::string prefix) : prefix_(std::move(prefix)) {}
  void SetUp() override {
    scratch_ = std::make_unique<ScratchDir>(prefix_ + this->GetParam().name);
    ASSERT_TRUE(scratch_->ok());
    dir_ = scratch_->dir();
  }
  int Sh(const std::string& cmd, std::string* out = nullptr) { return scratch_->Sh(cmd, out); }
  std::vector<std::byte> Slurp(const std::string& name) { return scratch_->Slurp(name); }

  std::unique_ptr<ScratchDir> scratch_;
  std::string dir_;  // scratch_->dir()

 private:
  std::string prefix_;
};

// ---- Starting images, made by QEMU in the scratch directory.

// `qemu-img create -f qcow2 <create> img.qcow2 <size>`.
::testing::AssertionResult MakeImage(const ScratchDir& scratch, const std::string& create,
                                     uint64_t size);
// base.qcow2 of `base_size` bytes, its first `base_written` written with 0xb1,
// and img.qcow2 (`create`, `size`) over it.
::testing::AssertionResult MakeBackedImage(const ScratchDir& scratch, const std::string& create,
                                           uint64_t size, uint64_t base_size,
                                           uint64_t base_written);
// The cluster size `qemu-img info` reports for `image` (qemu-img's own words).
uint64_t ClusterSizeOf(const ScratchDir& scratch, const std::string& image);

// ---- One run: fresh in-memory copies, a crash at a boundary.

// Copies host file `host_path` into `mem` as `mem_path` (EXPECTs success).
void ImportImage(MemEnv& mem, const std::string& host_path, const std::string& mem_path);
// Copies `mem_path` out of `mem` to `host_path` (EXPECTs success).
void ExportImage(const MemEnv& mem, const std::string& mem_path, const std::string& host_path);

// Opens /w/img.qcow2 through `env` (a CrashRun's) writable, with /w as the
// working directory (where a backing or data file was imported beside it).
Result<std::unique_ptr<BlockDevice>> OpenWritableImage(Env& env);

// MemEnv options for a test's runs: with `deferred`, I/O completes in an
// order drawn from `seed` (MemEnvOptions::Completion::kDeferred); the
// engine must then be driven with the MemEnv as its event loop.
MemEnvOptions DeferredIf(bool deferred, uint64_t seed);

// The FaultInjectionEnv of one run, over `mem`, that crashes at boundary
// `crash_at` (< 0: never). Run the job on env(), then Finish(): it returns
// the boundaries crossed and, for a crashing run, simulates the crash with
// `crash_at` as the seed.
class CrashRun {
 public:
  CrashRun(MemEnv* mem, int64_t crash_at);
  CrashRun(const CrashRun&) = delete;
  CrashRun& operator=(const CrashRun&) = delete;

  FaultInjectionEnv& env() { return env_; }
  int64_t crash_at() const { return crash_at_; }
  // For a run without a crash point (a no-op in one with it): the process
  // dies here. Every boundary from now on fails, as at a crash point (so what
  // the job's destructors would write never lands), and Finish(mode) then
  // simulates the crash too, seeded with 1 (CrashMode::kKeepAll: the process
  // died, the host did not).
  void Die();
  // The crash in mode crash_at % 3, so the boundaries cycle through the modes.
  uint64_t Finish();
  uint64_t Finish(CrashMode mode);

 private:
  FaultInjectionEnv env_;
  int64_t crash_at_;
  bool died_ = false;
};

// "crash at boundary N (mode M)": how failures name a crash point.
std::string CrashPoint(uint64_t n, int mode);
inline std::string CrashPoint(uint64_t n) { return CrashPoint(n, static_cast<int>(n % 3)); }

// ---- Checking what survived.

// The engine's check (CheckImage) of `path` in `mem`; `loop` drives a
// deferred MemEnv.
Result<CheckResult> CheckInMemory(MemEnv& mem, const std::string& path, EventLoop* loop = nullptr);
// Its messages, one per line.
std::string CheckMessages(const CheckResult& r);
// CheckInMemory ran, and found no error and no corruption (leaks are fine).
::testing::AssertionResult EngineCheckPasses(MemEnv& mem, const std::string& path,
                                             EventLoop* loop = nullptr);
// `qemu-img check <image>` in `scratch` exits 0, or 3 (leaked clusters only)
// when `leaks_allowed`. `image` may be qemu-img options and a file name.
::testing::AssertionResult QemuCheckPasses(const ScratchDir& scratch, const std::string& image,
                                           bool leaks_allowed = true);
// What `qemu-img convert -O raw <source> view.raw` reads (EXPECTs success);
// `source` may start with options (-f FMT, -l snapshot.name=S).
std::vector<std::byte> RawView(const ScratchDir& scratch, const std::string& source);

// ---- Data written by a job, and its model.

// A write of `length` bytes of `pattern`.
struct Write {
  uint64_t offset, length;
  uint8_t pattern;
};
// Applies `writes` to a guest image's bytes.
void ApplyWrites(std::vector<std::byte>& bytes, const std::vector<Write>& writes);
// Issues `writes` one after the other on `dev`, then a flush; stops at the
// first failure and returns it.
Status WriteAndFlush(BlockDevice& dev, const std::vector<Write>& writes);

// ---- The random-workload model of crash_test and recovery_crash_test.

struct Op {
  enum Kind { kWrite, kZero, kDiscard, kFlush } kind;
  uint64_t offset = 0, length = 0;
  uint8_t pattern = 0;
  int batch = -1;  // writes of one batch (>= 0) are in flight together
};

// The bytes a write op writes.
std::vector<std::byte> PatternOf(const Op& op);
// The end of the batch starting at ops[at] (ops[at].batch >= 0).
size_t BatchEnd(const std::vector<Op>& ops, size_t at);
// The writes ops[at, end) issued together on `dev` and run to completion by
// polling `mem`; result k is that of ops[at + k], written from data[k].
struct BatchResults {
  std::vector<std::vector<std::byte>> data;
  std::vector<Status> results;
};
BatchResults RunBatch(BlockDevice& dev, MemEnv& mem, const std::vector<Op>& ops, size_t at,
                      size_t end);
// A write as the device issues it: in place without the engine when
// TryAnyThread takes it (then *served_here is incremented), else by Write().
Status WriteAsDevice(BlockDevice& dev, uint64_t offset, std::span<std::byte> data, EventLoop* loop,
                     uint64_t* served_here = nullptr);
// The guest bytes [first, second) a discard of `op` deallocates: the whole
// clusters it covers, and the tail of the disk when it reaches the end.
std::pair<uint64_t, uint64_t> DiscardedRange(const Op& op, uint64_t cluster, uint64_t disk_size);

}  // namespace uq::qcow2::testing

#endif  // UBLK_QCOW2_QCOW2_TESTING_CRASH_HARNESS_H_
