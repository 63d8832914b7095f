#include "uring/file_io.h"

#include <linux/falloc.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <coroutine>
#include <cstring>
#include <memory>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/task.h"
#include "qcow2/sync_env.h"

namespace uq::uring {
namespace {

using qcow2::BounceWindow;
using qcow2::IoRequest;

// Largest single read/write submitted (see the header).
constexpr uint64_t kMaxTransfer = uint64_t{1} << 30;

// One operation in flight: the completion context of its SQEs.
class FileIo final : public Completion {
 public:
  void Start(Ring* ring, int fd, IoRequest* req) {
    ring_ = ring;
    fd_ = fd;
    req_ = req;
    req_->progress = 0;
    Issue();
  }
  void Complete(int32_t res, uint32_t flags) override;

  FileIo* next_free = nullptr;

 private:
  // Prepares the SQE for what remains of the request.
  void Issue();
  // Sets the result, recycles this FileIo and resumes the waiter.
  void Finish(int64_t result);

  Ring* ring_ = nullptr;
  int fd_ = -1;
  IoRequest* req_ = nullptr;
};

// A free list of FileIo, one per thread (operations complete on the thread
// that started them, so Get and Put always meet the same list).
class FileIoPool final {
 public:
  FileIo* Get() {
    if (free_ == nullptr) {
      all_.push_back(std::make_unique<FileIo>());
      return all_.back().get();
    }
    return std::exchange(free_, free_->next_free);
  }
  void Put(FileIo* io) {
    io->next_free = free_;
    free_ = io;
  }

 private:
  std::vector<std::unique_ptr<FileIo>> all_;
  FileIo* free_ = nullptr;
};

thread_local FileIoPool tls_pool;

void FileIo::Issue() {
  io_uring_sqe* sqe = ring_->GetSqe();
  const uint64_t done = req_->progress;
  const unsigned chunk = static_cast<unsigned>(std::min(req_->length - done, kMaxTransfer));
  switch (req_->op) {
    case IoRequest::Op::kRead:
      io_uring_prep_read(sqe, fd_, req_->data + done, chunk, req_->offset + done);
      break;
    case IoRequest::Op::kWrite:
      io_uring_prep_write(sqe, fd_, req_->data + done, chunk, req_->offset + done);
      break;
    case IoRequest::Op::kSync:
      io_uring_prep_fsync(sqe, fd_, IORING_FSYNC_DATASYNC);
      break;
    case IoRequest::Op::kDiscard:
      io_uring_prep_fallocate(sqe, fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              static_cast<off_t>(req_->offset), static_cast<off_t>(req_->length));
      break;
    case IoRequest::Op::kZero:
      io_uring_prep_fallocate(sqe, fd_, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(req_->offset),
                              static_cast<off_t>(req_->length));
      break;
    case IoRequest::Op::kAllocate:
      io_uring_prep_fallocate(sqe, fd_, 0, static_cast<off_t>(req_->offset),
                              static_cast<off_t>(req_->length));
      break;
  }
  io_uring_sqe_set_data64(sqe, UserData::ForCompletion(this));
}

void FileIo::Complete(int32_t res, uint32_t /*flags*/) {
  // Transient: the kernel did nothing; ask again.
  if (res == -EAGAIN || res == -EINTR) return Issue();
  switch (req_->op) {
    case IoRequest::Op::kRead:
    case IoRequest::Op::kWrite:
      if (res < 0) return Finish(res);
      if (res == 0) {
        // A read of 0 bytes is end of file; a write of 0 would loop forever.
        return Finish(req_->op == IoRequest::Op::kRead ? static_cast<int64_t>(req_->progress)
                                                       : -EIO);
      }
      req_->progress += static_cast<uint64_t>(res);
      if (req_->progress < req_->length) return Issue();  // short transfer
      return Finish(static_cast<int64_t>(req_->progress));
    case IoRequest::Op::kZero:
      if (res == -EOPNOTSUPP || res == -EINVAL || res == -ENODEV) {
        // No ZERO_RANGE here. PerformBlocking retries fallocate and then
        // writes zeros; blocking the ring's thread is acceptable for an
        // operation this rare.
        qcow2::PerformBlocking(fd_, *req_);
        return Finish(req_->result);
      }
      return Finish(res < 0 ? res : 0);
    case IoRequest::Op::kAllocate:
      if (res < 0 && qcow2::AllocateUnsupported(-res)) return Finish(0);
      return Finish(res < 0 ? res : 0);
    case IoRequest::Op::kSync:
    case IoRequest::Op::kDiscard:
      return Finish(res < 0 ? res : 0);
  }
}

void FileIo::Finish(int64_t result) {
  IoRequest* req = req_;
  req->result = result;
  // Recycle first: the waiter may start its next operation right away, and
  // `req` may be gone once it runs.
  req_ = nullptr;
  tls_pool.Put(this);
  assert(req->waiter);
  req->waiter.resume();
}

// Awaits one StartFileIo.
struct FileIoAwaitable {
  Ring* ring;
  int fd;
  IoRequest* req;
  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> h) {
    req->waiter = h;
    return !StartFileIo(*ring, fd, *req);
  }
  void await_resume() const noexcept {}
};

// The body of StartBouncedRead, as a detached coroutine: its frame holds the
// bounce buffer until the copy is done.
Task<void> BouncedRead(Ring* ring, int fd, IoRequest* req) {
  BounceWindow window(*req);
  IoRequest whole = window.whole(IoRequest::Op::kRead);
  co_await FileIoAwaitable{ring, fd, &whole};
  window.CompleteRead(*req, whole.result);
  // Last: the waiter may free `req` (and start more I/O) once it runs.
  req->waiter.resume();
}

}  // namespace

bool StartBouncedRead(Ring& ring, int fd, IoRequest& req) {
  assert(req.op == IoRequest::Op::kRead);
  if (req.length == 0) {
    req.result = 0;
    return true;
  }
  req.progress = 0;
  Spawn(BouncedRead(&ring, fd, &req));
  return false;
}

bool StartFileIo(Ring& ring, int fd, IoRequest& req) {
  const bool transfer_or_range = req.op != IoRequest::Op::kSync;
  if (transfer_or_range && req.length == 0) {
    // Nothing to do; fallocate would even reject a zero length.
    req.result = 0;
    return true;
  }
  tls_pool.Get()->Start(&ring, fd, &req);
  return false;
}

}  // namespace uq::uring
