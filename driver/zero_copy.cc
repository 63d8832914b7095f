#include "driver/zero_copy.h"

#include <fmt/format.h>
#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <coroutine>
#include <memory>
#include <utility>
#include <vector>

#include "uring/user_data.h"

namespace uq::driver {
namespace {

// One READ_FIXED / WRITE_FIXED of a host run: Start() submits it (so that
// every run of a request is in flight at once), co_await waits for its end.
// Continues short transfers, resubmits on EAGAIN/EINTR. Result: bytes moved
// (fewer than asked only for a read that met the end of the file) or -errno.
// REQUIRES: length > 0.
class FixedIo final : public uring::Completion {
 public:
  FixedIo(uring::Ring& ring, int fd, bool write, uint64_t host_offset, uint16_t buf_index,
          uint64_t buf_offset, uint64_t length)
      : ring_(ring),
        fd_(fd),
        write_(write),
        host_offset_(host_offset),
        buf_index_(buf_index),
        buf_offset_(buf_offset),
        length_(length) {}

  FixedIo(const FixedIo&) = delete;
  FixedIo& operator=(const FixedIo&) = delete;

  void Start() { Issue(); }
  // co_await io->Done(). A separate awaiter holding a pointer: GCC 12 may
  // copy an awaitable named by an lvalue into the frame, and a copy of this
  // object would never be resumed.
  struct Done {
    FixedIo* io;
    bool await_ready() const noexcept { return io->finished_; }
    void await_suspend(std::coroutine_handle<> h) noexcept { io->waiter_ = h; }
    int64_t await_resume() const noexcept { return io->result_; }
  };
  Done Wait() { return Done{this}; }

  void Complete(int32_t res, uint32_t /*flags*/) override {
    if (res == -EAGAIN || res == -EINTR) return Issue();
    if (res < 0) return Finish(res);
    if (res == 0) return Finish(write_ ? -EIO : static_cast<int64_t>(done_));
    done_ += static_cast<uint64_t>(res);
    if (done_ < length_) return Issue();
    Finish(static_cast<int64_t>(done_));
  }

 private:
  void Issue() {
    io_uring_sqe* sqe = ring_.GetSqe();
    // A registered kernel buffer is addressed by the offset into it.
    void* addr = reinterpret_cast<void*>(static_cast<uintptr_t>(buf_offset_ + done_));
    const unsigned n = static_cast<unsigned>(length_ - done_);
    if (write_) {
      io_uring_prep_write_fixed(sqe, fd_, addr, n, host_offset_ + done_, buf_index_);
    } else {
      io_uring_prep_read_fixed(sqe, fd_, addr, n, host_offset_ + done_, buf_index_);
    }
    io_uring_sqe_set_data64(sqe, uring::UserData::ForCompletion(this));
  }
  void Finish(int64_t result) {
    result_ = result;
    finished_ = true;
    if (waiter_) std::exchange(waiter_, {}).resume();
  }

  uring::Ring& ring_;
  const int fd_;
  const bool write_;
  const uint64_t host_offset_;
  const uint16_t buf_index_;
  const uint64_t buf_offset_;
  const uint64_t length_;
  uint64_t done_ = 0;
  int64_t result_ = 0;
  bool finished_ = false;
  std::coroutine_handle<> waiter_;
};

// Zeros for reads past the end of the host file, copied in pieces.
constexpr size_t kZeroChunk = 64 * 1024;
const std::byte kZeros[kZeroChunk] = {};

Status CopyLoop(int char_fd, uint16_t queue, uint16_t tag, std::byte* data, size_t length,
                uint64_t start, bool to_request) {
  size_t done = 0;
  while (done < length) {
    const off_t at = static_cast<off_t>(UserCopyOffset(queue, tag) + start + done);
    const ssize_t n = to_request ? ::pwrite(char_fd, data + done, length - done, at)
                                 : ::pread(char_fd, data + done, length - done, at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return Status::FromErrno(n < 0 ? errno : EIO,
                               fmt::format("ublk queue {} tag {}: user copy {} the request",
                                           queue, tag, to_request ? "into" : "out of"));
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Task<Status> ZeroFill(int char_fd, uint16_t queue, uint16_t tag, uint64_t start,
                      uint64_t length) {
  for (uint64_t done = 0; done < length;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(length - done, kZeroChunk));
    CO_RETURN_IF_ERROR(CopyLoop(char_fd, queue, tag, const_cast<std::byte*>(kZeros), n,
                                start + done, /*to_request=*/true));
    done += n;
  }
  co_return Status::Ok();
}

}  // namespace

Status RegisterBufferTable(uring::Ring& ring, uint32_t entries) {
  const int r = io_uring_register_buffers_sparse(ring.raw(), entries);
  if (r < 0) {
    return Status::FromErrno(-r, fmt::format("io_uring: a sparse buffer table of {}", entries));
  }
  return Status::Ok();
}

Status CopyFromRequest(int char_fd, uint16_t queue, uint16_t tag, std::span<std::byte> out) {
  return CopyLoop(char_fd, queue, tag, out.data(), out.size(), 0, /*to_request=*/false);
}

Status CopyToRequest(int char_fd, uint16_t queue, uint16_t tag, std::span<const std::byte> data) {
  return CopyLoop(char_fd, queue, tag, const_cast<std::byte*>(data.data()), data.size(), 0,
                  /*to_request=*/true);
}

Task<Status> ServeFixed(uring::Ring& ring, qcow2::HostMapping mapping, IoDescriptor r,
                        uint16_t buf_index, int char_fd, uint16_t queue, uint16_t tag) {
  const bool write = r.op == UBLK_IO_OP_WRITE;
  const int fd = mapping.file->fd();
  // Every run in flight at once; each is a completion of its own.
  std::vector<std::unique_ptr<FixedIo>> ios;
  ios.reserve(mapping.count);
  for (const qcow2::HostMapping::Extent& e : mapping.runs()) {
    ios.push_back(std::make_unique<FixedIo>(ring, fd, write, e.host_offset, buf_index,
                                            e.data_offset, e.length));
    ios.back()->Start();
  }
  Status failed;
  for (size_t i = 0; i < ios.size(); ++i) {
    const qcow2::HostMapping::Extent& e = mapping.extents[i];
    const int64_t n = co_await ios[i]->Wait();
    if (n < 0) {
      if (failed.ok()) {
        failed = Status::FromErrno(static_cast<int>(-n),
                                   fmt::format("{}: {} {} bytes at host offset {}",
                                               mapping.file->path(), write ? "write" : "read",
                                               e.length, e.host_offset));
      }
      continue;
    }
    if (!write && static_cast<uint64_t>(n) < e.length && failed.ok()) {
      // Past the end of the host file: zeros, as the engine reads them.
      failed = co_await ZeroFill(char_fd, queue, tag, e.data_offset + static_cast<uint64_t>(n),
                                 e.length - static_cast<uint64_t>(n));
    }
  }
  co_return failed;
}

}  // namespace uq::driver
