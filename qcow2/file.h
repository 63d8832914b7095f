// The I/O seam between the qcow2 engine and storage, modelled on LevelDB's Env.
//
// A File is one open host file (image, data file or backing file). Every
// operation is a plain IoRequest handed to File::Start(); an implementation
// either completes it at once (the synchronous and in-memory files) or queues
// it and resumes the waiting coroutine later (the io_uring file). Awaiting an
// operation allocates nothing: the request lives in the awaiter.
//
//   Implementations: SyncFile (pread/pwrite, qcow2/sync_env.h), UringFile
//   (uring/uring_env.h), MemFile and FaultInjectingFile (qcow2/testing/).
//
// Contracts, for every implementation:
//   Read     completes with the number of bytes read; fewer than asked only
//            at end of file (short transfers in the middle are retried by the
//            implementation).
//   Write    writes all bytes or fails.
//   Sync     makes every completed write durable (fdatasync).
//   Discard  deallocates [offset, offset+length); the range reads as zeros.
//   Zero     makes the range read as zeros, keeping it allocated if it was.
//   Extent   (synchronous) whether `offset` lies in data or in a hole, and how
//            far that lasts (SEEK_DATA/SEEK_HOLE); a file that cannot tell
//            says data up to its end.
//   Allocate reserves space for [offset, offset+length) and grows the file to
//            cover it, leaving every byte already there as it is (fallocate
//            mode 0): later writes there need no block allocation and no
//            file size change. Only an optimisation: where the file system
//            cannot, it succeeds having done nothing.
// Buffers must stay alive and untouched until the operation completes.
// Errors name the file's path and the offset.
//
// Thread model: a File may be used from several threads at once; each
// operation completes on (and resumes on) the thread that started it.
#ifndef UBLK_QCOW2_QCOW2_FILE_H_
#define UBLK_QCOW2_QCOW2_FILE_H_

#include <algorithm>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/task.h"

namespace uq::qcow2 {

class File;

// What File::Extent finds at an offset: data or a hole, for `length` bytes.
struct FileExtent {
  // A hole with no data after it (at or past the end of the file, too).
  static constexpr uint64_t kToTheEnd = ~uint64_t{0};
  bool data = true;
  uint64_t length = 0;  // > 0; kToTheEnd only for a hole
};

// One operation on one file, as data.
struct IoRequest {
  enum class Op : uint8_t { kRead, kWrite, kSync, kDiscard, kZero, kAllocate };
  Op op = Op::kRead;
  uint64_t offset = 0;
  // kRead/kWrite: the buffer; kDiscard/kZero/kAllocate: data == nullptr.
  std::byte* data = nullptr;
  uint64_t length = 0;
  // Filled by the implementation: bytes transferred (>= 0) or -errno.
  int64_t result = 0;
  // Set by the awaiter before Start(); resumed by asynchronous completions.
  std::coroutine_handle<> waiter;
  // Free for the implementation's bookkeeping (e.g. bytes done so far).
  uint64_t progress = 0;
};

// Awaiting an IoRequest on a File; converts the raw result to Status/Result.
template <class Out>
class IoAwaitable {
 public:
  IoAwaitable(File* file, IoRequest req) : file_(file), req_(req) {}
  bool await_ready() noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> h);
  Out await_resume();

 private:
  File* file_;
  IoRequest req_;
};

class File {
 public:
  virtual ~File() = default;

  // Reads up to out.size() bytes at offset; result: bytes read.
  IoAwaitable<Result<size_t>> Read(uint64_t offset, std::span<std::byte> out) {
    return {this, {IoRequest::Op::kRead, offset, out.data(), out.size()}};
  }
  // Reads exactly out.size() bytes; a short read past end of file is an error
  // (Corruption: the image points outside its file).
  Task<Status> ReadExact(uint64_t offset, std::span<std::byte> out);
  // Reads out.size() bytes, zero-filling whatever lies past end of file.
  Task<Status> ReadZeroPadded(uint64_t offset, std::span<std::byte> out);
  IoAwaitable<Status> Write(uint64_t offset, std::span<const std::byte> data) {
    return {this,
            {IoRequest::Op::kWrite, offset, const_cast<std::byte*>(data.data()), data.size()}};
  }
  IoAwaitable<Status> Sync() { return {this, {IoRequest::Op::kSync, 0, nullptr, 0}}; }
  IoAwaitable<Status> Discard(uint64_t offset, uint64_t length) {
    return {this, {IoRequest::Op::kDiscard, offset, nullptr, length}};
  }
  IoAwaitable<Status> Zero(uint64_t offset, uint64_t length) {
    return {this, {IoRequest::Op::kZero, offset, nullptr, length}};
  }
  IoAwaitable<Status> Allocate(uint64_t offset, uint64_t length) {
    return {this, {IoRequest::Op::kAllocate, offset, nullptr, length}};
  }

  // Synchronous, rare operations.
  virtual Result<uint64_t> Size() = 0;
  virtual Status Truncate(uint64_t size) = 0;
  virtual const std::string& path() const = 0;
  // The host fd, or -1 for files that have none (in-memory ones).
  virtual int fd() const { return -1; }
  // Data or hole at `offset`, as SEEK_DATA/SEEK_HOLE say (qemu-img map's
  // source for raw files): a data extent ends at the next hole (at the end of
  // the file at the latest); a hole ends at the next data, or is kToTheEnd.
  // This default asks the fd; without one, everything up to Size() is data.
  // Errors: IoError naming the file.
  virtual Result<FileExtent> Extent(uint64_t offset);
  // Bytes the file occupies on its storage (st_blocks * 512); without an fd,
  // Size(). qcow2's metadata-preallocation guess compares it with the
  // clusters in use.
  virtual Result<uint64_t> AllocatedBytes();

  // Starts `req`. Returns true if it completed synchronously (req.result is
  // set and req.waiter must not be resumed); false if req.waiter will be
  // resumed once req.result is set.
  virtual bool Start(IoRequest& req) = 0;
};

// How to open a file.
struct OpenOptions {
  bool writable = false;
  bool create = false;    // create if missing (implies writable)
  bool truncate = false;  // with create: start empty
  bool direct = false;    // O_DIRECT; buffers and offsets 512-aligned
};

// Opens files. An Env decides how I/O happens (synchronously, io_uring, in
// memory, with faults) and hands out Files that do it that way.
class Env {
 public:
  virtual ~Env() = default;
  virtual Result<std::unique_ptr<File>> Open(const std::string& path,
                                             const OpenOptions& options) = 0;
  virtual bool Exists(const std::string& path) = 0;
  // Runs CPU-heavy `work` (inflating a compressed cluster) where it does not
  // hold up this thread's other requests, resuming the caller on its own
  // thread afterwards. This default runs it inline; the io_uring Env hands
  // it to worker threads (uring/offload.h).
  virtual Task<void> RunOffThread(std::function<void()> work) {
    work();
    co_return;
  }
  // Arranges for `h` to resume once this thread's event loop has dispatched
  // the completions at hand (so the requests they start have run up to
  // their first wait), and returns true; or returns false, and the caller
  // goes on at once, where there is no such loop (this default).
  virtual bool Defer(std::coroutine_handle<> h) { return false; }
};

// co_await LetOthersCatchUp(env): Env::Defer as an awaitable; env may be null.
inline auto LetOthersCatchUp(Env* env) {
  struct Awaiter {
    Env* env;
    bool await_ready() const noexcept { return env == nullptr; }
    bool await_suspend(std::coroutine_handle<> h) { return env->Defer(h); }
    void await_resume() const noexcept {}
  };
  return Awaiter{env};
}

// A read or write that O_DIRECT cannot take as it is (unaligned offset,
// length or buffer), seen through an aligned buffer covering the whole 4 KiB
// pages it touches (a page covers every logical block size we meet: 512 and
// 4096). Used by the files that do O_DIRECT (sync_env.cc, uring/file_io.cc):
// read the window (whole()), then CompleteRead(), or for a write CopyIn()
// and write the window back (a read-modify-write).
class BounceWindow {
 public:
  static constexpr uint64_t kAlign = 4096;
  explicit BounceWindow(const IoRequest& req)
      : start_(req.offset & ~(kAlign - 1)),
        buffer_(((req.offset + req.length + kAlign - 1) & ~(kAlign - 1)) - start_) {}

  // The aligned window as a request of kind `op` (kRead or kWrite).
  IoRequest whole(IoRequest::Op op) { return {op, start_, buffer_.data(), buffer_.size()}; }
  // Completes read `req` from the window, given the window read's result.
  void CompleteRead(IoRequest& req, int64_t whole_result) const {
    if (whole_result < 0) {
      req.result = whole_result;
      return;
    }
    const uint64_t skip = req.offset - start_;
    const uint64_t got = static_cast<uint64_t>(whole_result);
    const uint64_t n = std::min(got > skip ? got - skip : 0, req.length);
    std::memcpy(req.data, buffer_.data() + skip, n);
    req.result = static_cast<int64_t>(n);
  }
  // Puts write `req`'s data into the window (after the window was read).
  void CopyIn(const IoRequest& req) {
    std::memcpy(buffer_.data() + (req.offset - start_), req.data, req.length);
  }

 private:
  uint64_t start_;
  AlignedBuffer buffer_;
};

// --- implementation of the awaitable ---

template <class Out>
bool IoAwaitable<Out>::await_suspend(std::coroutine_handle<> h) {
  req_.waiter = h;
  // Completed synchronously: do not suspend.
  return !file_->Start(req_);
}

// Turns a raw result into the caller's type, naming file and offset.
// Writes `length` zero bytes at `offset` (in 1 MiB writes): space really
// written, as preallocation=full wants, unlike Zero or Discard.
Task<Status> WriteZeroBytes(File& file, uint64_t offset, uint64_t length);

Status IoResultToStatus(const File& file, const IoRequest& req);

template <>
inline Status IoAwaitable<Status>::await_resume() {
  return IoResultToStatus(*file_, req_);
}
template <>
inline Result<size_t> IoAwaitable<Result<size_t>>::await_resume() {
  if (req_.result < 0) return IoResultToStatus(*file_, req_);
  return static_cast<size_t>(req_.result);
}

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_FILE_H_
