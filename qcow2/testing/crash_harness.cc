#include "qcow2/testing/crash_harness.h"

#include <fmt/format.h>

#include <algorithm>
#include <optional>

#include "base/task.h"
#include "qcow2/open_image.h"

namespace uq::qcow2::testing {

namespace {

// Runs `cmd` in `scratch`; a failure names the command and its output.
::testing::AssertionResult ShOk(const ScratchDir& scratch, const std::string& cmd) {
  std::string out;
  const int status = scratch.Sh(cmd, &out);
  if (status == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << cmd << ": exit " << status << "\n" << out;
}

}  // namespace

::testing::AssertionResult MakeImage(const ScratchDir& scratch, const std::string& create,
                                     uint64_t size) {
  return ShOk(scratch, fmt::format("qemu-img create -f qcow2 {} img.qcow2 {}", create, size));
}

::testing::AssertionResult MakeBackedImage(const ScratchDir& scratch, const std::string& create,
                                           uint64_t size, uint64_t base_size,
                                           uint64_t base_written) {
  for (const std::string& cmd :
       {fmt::format("qemu-img create -f qcow2 base.qcow2 {}", base_size),
        fmt::format("qemu-io -c 'write -P 0xb1 0 {}' base.qcow2", base_written),
        fmt::format("qemu-img create -f qcow2 {} -b base.qcow2 -F qcow2 img.qcow2 {}", create,
                    size)}) {
    ::testing::AssertionResult made = ShOk(scratch, cmd);
    if (!made) return made;
  }
  return ::testing::AssertionSuccess();
}

uint64_t ClusterSizeOf(const ScratchDir& scratch, const std::string& image) {
  std::string info;
  scratch.Sh("qemu-img info " + image + " | grep cluster_size", &info);
  return std::stoull(info.substr(info.find(':') + 1));
}

void ImportImage(MemEnv& mem, const std::string& host_path, const std::string& mem_path) {
  Status st = mem.ImportFromHostFile(host_path, mem_path);
  EXPECT_TRUE(st.ok()) << "import " << host_path << ": " << st.ToString();
}

void ExportImage(const MemEnv& mem, const std::string& mem_path, const std::string& host_path) {
  Status st = mem.ExportToHostFile(mem_path, host_path);
  EXPECT_TRUE(st.ok()) << "export " << mem_path << ": " << st.ToString();
}

Result<std::unique_ptr<BlockDevice>> OpenWritableImage(Env& env) {
  return BlockOn(
      OpenImage("/w/img.qcow2", ImageOptions{.env = &env, .writable = true, .working_dir = "/w"}));
}

MemEnvOptions DeferredIf(bool deferred, uint64_t seed) {
  return deferred ? MemEnvOptions{.completion = MemEnvOptions::Completion::kDeferred, .seed = seed}
                  : MemEnvOptions{};
}

CrashRun::CrashRun(MemEnv* mem, int64_t crash_at) : env_(mem), crash_at_(crash_at) {
  if (crash_at >= 0) env_.CrashAtOperation(static_cast<uint64_t>(crash_at));
}

void CrashRun::Die() {
  if (crash_at_ >= 0) return;
  env_.CrashAtOperation(env_.operation_count());
  died_ = true;
}

uint64_t CrashRun::Finish() {
  return Finish(crash_at_ >= 0 ? static_cast<CrashMode>(crash_at_ % 3)
                               : CrashMode::kDropAllUnsynced);
}

uint64_t CrashRun::Finish(CrashMode mode) {
  const uint64_t count = env_.operation_count();
  if (crash_at_ >= 0 || died_) {
    EXPECT_TRUE(env_.SimulateCrash(mode, died_ ? 1 : static_cast<uint64_t>(crash_at_)).ok());
  }
  return count;
}

std::string CrashPoint(uint64_t n, int mode) {
  return fmt::format("crash at boundary {} (mode {})", n, mode);
}

Result<CheckResult> CheckInMemory(MemEnv& mem, const std::string& path, EventLoop* loop) {
  ASSIGN_OR_RETURN(std::unique_ptr<File> file, mem.Open(path, OpenOptions{}));
  return BlockOn(CheckImage(*file), loop);
}

std::string CheckMessages(const CheckResult& r) {
  std::string all;
  for (const std::string& l : r.messages) all += l + "\n";
  return all;
}

::testing::AssertionResult EngineCheckPasses(MemEnv& mem, const std::string& path,
                                             EventLoop* loop) {
  Result<CheckResult> r = CheckInMemory(mem, path, loop);
  if (!r.ok()) return ::testing::AssertionFailure() << "check: " << r.status().ToString();
  if (r->error.empty() && r->check_errors == 0 && r->corruptions == 0) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "check: " << r->error << "\n" << CheckMessages(*r);
}

::testing::AssertionResult QemuCheckPasses(const ScratchDir& scratch, const std::string& image,
                                           bool leaks_allowed) {
  std::string out;
  const int status = scratch.Sh("qemu-img check " + image, &out);
  if (status == 0 || (status == 3 && leaks_allowed)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "qemu-img check exit " << status << "\n" << out;
}

std::vector<std::byte> RawView(const ScratchDir& scratch, const std::string& source) {
  std::string out;
  EXPECT_EQ(scratch.Sh(fmt::format("qemu-img convert -O raw {} view.raw", source), &out), 0) << out;
  return scratch.Slurp("view.raw");
}

void ApplyWrites(std::vector<std::byte>& bytes, const std::vector<Write>& writes) {
  for (const Write& w : writes)
    std::fill_n(bytes.begin() + w.offset, w.length, std::byte{w.pattern});
}

Status WriteAndFlush(BlockDevice& dev, const std::vector<Write>& writes) {
  for (const Write& w : writes) {
    std::vector<std::byte> data(w.length, std::byte{w.pattern});
    RETURN_IF_ERROR(BlockOn(dev.Write(w.offset, data, false)));
  }
  return BlockOn(dev.Flush());
}

std::vector<std::byte> PatternOf(const Op& op) {
  std::vector<std::byte> data(op.length);
  for (uint64_t i = 0; i < op.length; i++) data[i] = std::byte(op.pattern + i);
  return data;
}

size_t BatchEnd(const std::vector<Op>& ops, size_t at) {
  size_t end = at;
  while (end < ops.size() && ops[end].batch == ops[at].batch) end++;
  return end;
}

BatchResults RunBatch(BlockDevice& dev, MemEnv& mem, const std::vector<Op>& ops, size_t at,
                      size_t end) {
  BatchResults r{std::vector<std::vector<std::byte>>(end - at),
                 std::vector<Status>(end - at, Status::IoError("not run"))};
  size_t done = 0;
  for (size_t k = at; k < end; k++) {
    r.data[k - at] = PatternOf(ops[k]);
    Spawn([](BlockDevice* d, uint64_t off, std::span<const std::byte> b, Status* out,
             size_t* done) -> Task<void> {
      *out = co_await d->Write(off, b, false);
      ++*done;
    }(&dev, ops[k].offset, r.data[k - at], &r.results[k - at], &done));
  }
  while (done < end - at && mem.Poll()) {
  }
  EXPECT_EQ(done, end - at) << "a write of the batch never completed";
  return r;
}

Status WriteAsDevice(BlockDevice& dev, uint64_t offset, std::span<std::byte> data, EventLoop* loop,
                     uint64_t* served_here) {
  if (std::optional<Task<Status>> here = dev.TryAnyThread(true, offset, data)) {
    if (served_here) ++*served_here;
    return BlockOn(std::move(*here), loop);
  }
  return BlockOn(dev.Write(offset, data, false), loop);
}

std::pair<uint64_t, uint64_t> DiscardedRange(const Op& op, uint64_t cluster, uint64_t disk_size) {
  const uint64_t s = (op.offset + cluster - 1) / cluster * cluster;
  const uint64_t e =
      op.offset + op.length == disk_size ? disk_size : (op.offset + op.length) / cluster * cluster;
  return {s, e};
}

}  // namespace uq::qcow2::testing
