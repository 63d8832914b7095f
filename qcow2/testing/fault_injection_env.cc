#include "qcow2/testing/fault_injection_env.h"

#include <fmt/format.h>

#include <algorithm>
#include <coroutine>
#include <cstring>
#include <deque>
#include <random>
#include <utility>

namespace uq::qcow2::testing {
namespace {

// The operations that crash points count.
constexpr uint32_t kBoundaries = Fault::kWrite | Fault::kSync | Fault::kDiscard | Fault::kZero |
                                 Fault::kTruncate | Fault::kAllocate;

constexpr uint64_t kSectorSize = 512;

// A completed change not yet covered by a sync.
struct Change {
  enum class Kind { kWrite, kZero, kTruncate, kExtend };
  Kind kind;
  uint64_t offset;  // kTruncate: the new size; kExtend: the least size
  uint64_t length;
  std::vector<std::byte> data;  // kWrite only
  uint64_t seq;
};

uint32_t KindOf(IoRequest::Op op) {
  switch (op) {
    case IoRequest::Op::kRead:
      return Fault::kRead;
    case IoRequest::Op::kWrite:
      return Fault::kWrite;
    case IoRequest::Op::kSync:
      return Fault::kSync;
    case IoRequest::Op::kDiscard:
      return Fault::kDiscard;
    case IoRequest::Op::kZero:
      return Fault::kZero;
    case IoRequest::Op::kAllocate:
      return Fault::kAllocate;
  }
  return Fault::kRead;
}

// Awaits one request on the underlying file and keeps its raw result, plus
// whether the underlying file completed it inside Start().
struct BaseIo {
  File* file;
  IoRequest request;
  bool suspended = false;

  bool await_ready() noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> h) {
    request.waiter = h;
    suspended = !file->Start(request);
    return suspended;
  }
  int64_t await_resume() noexcept { return request.result; }
};

// Makes `bytes` reflect one write (data != nullptr) or one zeroing of
// [offset, offset+length), with MemEnv's semantics: writes extend, zeroing is
// clipped to the size.
void ApplyRange(std::vector<std::byte>& bytes, uint64_t offset, uint64_t length,
                const std::byte* data) {
  if (data != nullptr) {
    if (offset + length > bytes.size()) bytes.resize(offset + length);
    if (length > 0) std::memcpy(bytes.data() + offset, data, length);
    return;
  }
  if (offset >= bytes.size()) return;
  const uint64_t end = std::min<uint64_t>(offset + length, bytes.size());
  std::fill(bytes.begin() + offset, bytes.begin() + end, std::byte{0});
}

// Applies a whole change to `bytes`.
void ApplyChange(std::vector<std::byte>& bytes, const Change& change) {
  switch (change.kind) {
    case Change::Kind::kWrite:
      ApplyRange(bytes, change.offset, change.length, change.data.data());
      return;
    case Change::Kind::kZero:
      ApplyRange(bytes, change.offset, change.length, nullptr);
      return;
    case Change::Kind::kTruncate:
      bytes.resize(change.offset);
      return;
    case Change::Kind::kExtend:
      if (bytes.size() < change.offset) bytes.resize(change.offset);
      return;
  }
}

}  // namespace

struct FaultInjectionEnv::FileModel {
  std::vector<std::byte> durable;
  std::deque<Change> unsynced;  // in completion order, seq ascending
  uint64_t next_seq = 0;
};

// A File that asks the Env before each operation and reports each completion
// to it; the bytes themselves live in the MemEnv's File.
class FaultInjectionEnv::FaultFile final : public File {
 public:
  FaultFile(FaultInjectionEnv* env, std::unique_ptr<File> base, std::shared_ptr<FileModel> model,
            uint64_t generation)
      : env_(env), base_(std::move(base)), model_(std::move(model)), generation_(generation) {}

  Result<uint64_t> Size() override {
    if (!env_->Alive(generation_)) {
      return Status::FromErrno(EIO, fmt::format("{}: size (simulated crash)", path()));
    }
    return base_->Size();
  }

  Status Truncate(uint64_t size) override {
    Admission admission = env_->Admit(path(), generation_, Fault::kTruncate, *model_);
    if (admission.error != 0) {
      return Status::FromErrno(admission.error, fmt::format("{}: truncate to {}", path(), size));
    }
    return env_->FinishTruncate(*model_, size, base_->Truncate(size));
  }

  const std::string& path() const override { return base_->path(); }

  bool Start(IoRequest& req) override {
    Admission admission = env_->Admit(path(), generation_, KindOf(req.op), *model_);
    if (admission.error != 0) {
      req.result = -admission.error;
      return true;
    }
    IoRequest inner;
    inner.op = req.op;
    inner.offset = req.offset;
    inner.data = req.data;
    inner.length = req.length;
    if (admission.short_read) inner.length = std::min(inner.length, *admission.short_read);
    bool completed_inline = false;
    Spawn(env_->Forward(base_.get(), model_, &req, inner, admission.sync_limit, &completed_inline));
    return completed_inline;
  }

 private:
  FaultInjectionEnv* const env_;
  const std::unique_ptr<File> base_;
  const std::shared_ptr<FileModel> model_;
  const uint64_t generation_;
};

FaultInjectionEnv::FaultInjectionEnv(MemEnv* base) : base_(base) {}

FaultInjectionEnv::~FaultInjectionEnv() = default;

Result<std::unique_ptr<File>> FaultInjectionEnv::Open(const std::string& path,
                                                      const OpenOptions& options) {
  std::lock_guard lock(mu_);
  if (crashed_) return Status::FromErrno(EIO, fmt::format("{}: open (simulated crash)", path));
  const bool existed = base_->Exists(path);
  Result<std::unique_ptr<File>> base_file = base_->Open(path, options);
  if (!base_file.ok()) return base_file.status();
  std::shared_ptr<FileModel>& model = models_[path];
  // A path seen for the first time, created, or truncated: what it holds
  // now is durable. Otherwise the path keeps its model (other handles, or
  // handles from before a simulated crash, built it).
  if (!model || !existed || options.truncate) {
    model = std::make_shared<FileModel>();
    model->durable = base_->Contents(path);
  }
  return std::unique_ptr<File>(
      std::make_unique<FaultFile>(this, std::move(base_file).value(), model, generation_));
}

bool FaultInjectionEnv::Exists(const std::string& path) { return base_->Exists(path); }

void FaultInjectionEnv::AddFault(Fault fault) {
  std::lock_guard lock(mu_);
  faults_.push_back(ActiveFault{std::move(fault), 0});
}

void FaultInjectionEnv::FailNthWrite(uint64_t n, int error, std::string path) {
  AddFault(Fault{.ops = Fault::kWrite, .path = std::move(path), .skip = n, .error = error});
}

void FaultInjectionEnv::FailNthSync(uint64_t n, int error, std::string path) {
  AddFault(Fault{.ops = Fault::kSync, .path = std::move(path), .skip = n, .error = error});
}

void FaultInjectionEnv::FailFrom(uint64_t n, int error, std::string path) {
  AddFault(Fault{.ops = Fault::kAllOps,
                 .path = std::move(path),
                 .skip = n,
                 .count = Fault::kForever,
                 .error = error});
}

void FaultInjectionEnv::ShortNthRead(uint64_t n, uint64_t bytes, std::string path) {
  AddFault(Fault{.ops = Fault::kRead,
                 .path = std::move(path),
                 .skip = n,
                 .effect = Fault::Effect::kShortRead,
                 .short_read_bytes = bytes});
}

void FaultInjectionEnv::ClearFaults() {
  std::lock_guard lock(mu_);
  faults_.clear();
}

void FaultInjectionEnv::CrashAtOperation(uint64_t n) {
  std::lock_guard lock(mu_);
  crash_at_ = n;
}

uint64_t FaultInjectionEnv::operation_count() const {
  std::lock_guard lock(mu_);
  return operation_count_;
}

bool FaultInjectionEnv::crashed() const {
  std::lock_guard lock(mu_);
  return crashed_;
}

size_t FaultInjectionEnv::in_flight() const {
  std::lock_guard lock(mu_);
  return in_flight_;
}

bool FaultInjectionEnv::Alive(uint64_t generation) const {
  std::lock_guard lock(mu_);
  return generation == generation_ && !crashed_;
}

FaultInjectionEnv::Admission FaultInjectionEnv::Admit(const std::string& path, uint64_t generation,
                                                      uint32_t kind, const FileModel& model) {
  std::lock_guard lock(mu_);
  Admission admission;
  if (generation != generation_ || crashed_) {
    admission.error = EIO;
    return admission;
  }
  if ((kind & kBoundaries) != 0) {
    if (crash_at_ && operation_count_ >= *crash_at_) {
      crashed_ = true;
      admission.error = EIO;
      return admission;
    }
    ++operation_count_;
  }
  // Every matching rule counts the operation, hit or not, so rules stay
  // independent of each other. The first error wins over a short read.
  for (ActiveFault& active : faults_) {
    const Fault& fault = active.fault;
    if ((fault.ops & kind) == 0) continue;
    if (!fault.path.empty() && fault.path != path) continue;
    const uint64_t index = active.seen++;
    if (index < fault.skip || index - fault.skip >= fault.count) continue;
    if (fault.effect == Fault::Effect::kError) {
      if (admission.error == 0) admission.error = fault.error;
    } else if (kind == Fault::kRead) {
      admission.short_read =
          std::min(admission.short_read.value_or(fault.short_read_bytes), fault.short_read_bytes);
    }
  }
  if (admission.error != 0) return admission;
  // fdatasync covers what completed before it started: the changes recorded
  // so far, not the ones still in flight.
  if (kind == Fault::kSync) admission.sync_limit = model.next_seq;
  ++in_flight_;
  return admission;
}

int64_t FaultInjectionEnv::Finish(FileModel& model, const IoRequest& request, int64_t result,
                                  uint64_t sync_limit) {
  std::lock_guard lock(mu_);
  --in_flight_;
  if (result >= 0) {
    switch (request.op) {
      case IoRequest::Op::kRead:
        break;
      case IoRequest::Op::kWrite:
        model.unsynced.push_back(Change{
            Change::Kind::kWrite, request.offset, request.length,
            std::vector<std::byte>(request.data, request.data + request.length), model.next_seq++});
        break;
      case IoRequest::Op::kDiscard:
      case IoRequest::Op::kZero:
        model.unsynced.push_back(
            Change{Change::Kind::kZero, request.offset, request.length, {}, model.next_seq++});
        break;
      case IoRequest::Op::kAllocate:
        model.unsynced.push_back(Change{
            Change::Kind::kExtend, request.offset + request.length, 0, {}, model.next_seq++});
        break;
      case IoRequest::Op::kSync:
        // A sync that completes after the crash point never completed.
        if (crashed_) break;
        while (!model.unsynced.empty() && model.unsynced.front().seq < sync_limit) {
          ApplyChange(model.durable, model.unsynced.front());
          model.unsynced.pop_front();
        }
        break;
    }
  }
  // After the crash point nothing succeeds, whatever reached the file.
  return crashed_ ? -EIO : result;
}

Status FaultInjectionEnv::FinishTruncate(FileModel& model, uint64_t size, Status status) {
  std::lock_guard lock(mu_);
  --in_flight_;
  if (status.ok()) {
    model.unsynced.push_back(Change{Change::Kind::kTruncate, size, 0, {}, model.next_seq++});
  }
  return status;
}

// The coroutine behind every forwarded operation. It runs inside Start()
// until the underlying file either completes (then `*completed_inline` tells
// Start() to return true; it is never touched after Start() returns) or
// suspends (then Start() returns false and this coroutine, resumed by the
// MemEnv's Poll(), completes `outer` and resumes its waiter).
Task<void> FaultInjectionEnv::Forward(File* base, std::shared_ptr<FileModel> model,
                                      IoRequest* outer, IoRequest inner, uint64_t sync_limit,
                                      bool* completed_inline) {
  BaseIo io{base, inner};
  const int64_t raw = co_await io;
  outer->result = Finish(*model, io.request, raw, sync_limit);
  if (!io.suspended) {
    *completed_inline = true;
    co_return;
  }
  // `outer` may be gone once its waiter runs; nothing touches it after this.
  if (outer->waiter) outer->waiter.resume();
}

Status FaultInjectionEnv::SimulateCrash(CrashMode mode, uint64_t seed) {
  std::lock_guard lock(mu_);
  if (in_flight_ > 0) {
    return Status::InvalidArgument(
        fmt::format("SimulateCrash with {} operations in flight: poll the MemEnv until they "
                    "complete",
                    in_flight_));
  }
  std::mt19937_64 rng(seed);
  // Plain bit tests on mt19937_64 output keep a seed's choices identical
  // across standard libraries.
  auto coin = [&rng] { return (rng() & 1) != 0; };
  for (auto it = models_.begin(); it != models_.end();) {
    const std::string& path = it->first;
    FileModel& model = *it->second;
    if (!base_->Exists(path)) {  // removed from the MemEnv by the test
      it = models_.erase(it);
      continue;
    }
    std::vector<std::byte> bytes = std::move(model.durable);
    if (mode != CrashMode::kDropAllUnsynced) {
      for (const Change& change : model.unsynced) {
        if (change.kind == Change::Kind::kTruncate || change.kind == Change::Kind::kExtend ||
            mode == CrashMode::kKeepAll) {
          ApplyChange(bytes, change);
        } else if (mode == CrashMode::kKeepRandomSubset) {
          if (coin()) ApplyChange(bytes, change);
        } else {
          // kKeepRandomSectors: each piece between sector boundaries alone.
          const std::byte* data =
              change.kind == Change::Kind::kWrite ? change.data.data() : nullptr;
          const uint64_t end = change.offset + change.length;
          for (uint64_t pos = change.offset; pos < end;) {
            const uint64_t piece_end = std::min(end, (pos / kSectorSize + 1) * kSectorSize);
            if (coin()) {
              ApplyRange(bytes, pos, piece_end - pos,
                         data == nullptr ? nullptr : data + (pos - change.offset));
            }
            pos = piece_end;
          }
        }
      }
    }
    model.unsynced.clear();
    base_->SetContents(path, bytes);
    model.durable = std::move(bytes);
    ++it;
  }
  ++generation_;
  crashed_ = false;
  crash_at_.reset();
  return Status::Ok();
}

Result<std::vector<std::byte>> FaultInjectionEnv::DurableContents(const std::string& path) const {
  std::lock_guard lock(mu_);
  auto it = models_.find(path);
  if (it == models_.end()) return Status::FromErrno(ENOENT, path);
  return it->second->durable;
}

size_t FaultInjectionEnv::unsynced_changes(const std::string& path) const {
  std::lock_guard lock(mu_);
  auto it = models_.find(path);
  return it == models_.end() ? 0 : it->second->unsynced.size();
}

}  // namespace uq::qcow2::testing
