#include "qcow2/sync_env.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "base/aligned_buffer.h"

namespace uq::qcow2 {
namespace {

class SyncFile final : public FdFile {
 public:
  using FdFile::FdFile;
  bool Start(IoRequest& req) override {
    PerformBlocking(fd(), req);
    return true;
  }
};

class SyncEnvImpl final : public Env {
 public:
  Result<std::unique_ptr<File>> Open(const std::string& path, const OpenOptions& options) override {
    Result<int> fd = OpenFd(path, options);
    if (!fd.ok()) return fd.status();
    return std::unique_ptr<File>(std::make_unique<SyncFile>(*fd, path));
  }
  bool Exists(const std::string& path) override { return ::access(path.c_str(), F_OK) == 0; }
};

int64_t ZeroRange(int fd, uint64_t offset, uint64_t length, bool keep_allocated) {
  int mode = keep_allocated ? FALLOC_FL_ZERO_RANGE : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
  if (::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return 0;
  int err = errno;
  if (err != EOPNOTSUPP && err != ENOTSUP && err != EINVAL && err != ENODEV) return -err;
  if (!keep_allocated) return -err;  // discard is advisory for callers that can't punch
  // Fall back to writing zeroes (block devices, file systems without ZERO_RANGE).
  static const std::byte kZeros[65536] = {};
  while (length > 0) {
    size_t n = length < sizeof(kZeros) ? length : sizeof(kZeros);
    ssize_t w = ::pwrite(fd, kZeros, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    offset += w;
    length -= w;
  }
  return 0;
}

// O_DIRECT needs the device's logical block size (512 on the disks we run
// on); bounces cover whole pages (BounceWindow).
constexpr uint64_t kDirectAlign = 512;

bool IsDirect(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && (flags & O_DIRECT);
}

// Reads or writes `req` through an aligned window of whole pages. Writes
// read-modify-write the pages they touch (rare: the engine's own metadata
// writes are aligned).
void PerformBounced(int fd, IoRequest& req) {
  BounceWindow window(req);
  IoRequest whole = window.whole(IoRequest::Op::kRead);
  PerformBlocking(fd, whole);
  if (req.op == IoRequest::Op::kRead || whole.result < 0) {
    window.CompleteRead(req, whole.result);  // (passes a read failure on)
    return;
  }
  window.CopyIn(req);
  IoRequest write = window.whole(IoRequest::Op::kWrite);
  PerformBlocking(fd, write);
  req.result = write.result < 0 ? write.result : static_cast<int64_t>(req.length);
}

}  // namespace

bool MisalignedForDirect(const IoRequest& req) {
  if (req.op != IoRequest::Op::kRead && req.op != IoRequest::Op::kWrite) return false;
  return ((req.offset | req.length | reinterpret_cast<uintptr_t>(req.data)) & (kDirectAlign - 1)) !=
         0;
}

FdFile::~FdFile() { ::close(fd_); }

Result<uint64_t> FdFile::Size() {
  struct stat st;
  if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, path_ + ": stat");
  return static_cast<uint64_t>(st.st_size);
}

Status FdFile::Truncate(uint64_t size) {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    return Status::FromErrno(errno, fmt::format("{}: truncate to {}", path_, size));
  }
  return Status::Ok();
}

Env* SyncEnv() {
  static SyncEnvImpl env;
  return &env;
}

Result<int> OpenFd(const std::string& path, const OpenOptions& options) {
  int flags = O_CLOEXEC;
  flags |= (options.writable || options.create) ? O_RDWR : O_RDONLY;
  if (options.create) flags |= O_CREAT;
  if (options.truncate) flags |= O_TRUNC;
  if (options.direct) flags |= O_DIRECT;
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) return Status::FromErrno(errno, path);
  return fd;
}

bool SupportsDirectIo(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

void PerformBlocking(int fd, IoRequest& req) {
  if (MisalignedForDirect(req) && req.length > 0 && IsDirect(fd)) {
    PerformBounced(fd, req);
    return;
  }
  switch (req.op) {
    case IoRequest::Op::kRead:
    case IoRequest::Op::kWrite: {
      uint64_t done = 0;
      while (done < req.length) {
        ssize_t n = req.op == IoRequest::Op::kRead
                        ? ::pread(fd, req.data + done, req.length - done,
                                  static_cast<off_t>(req.offset + done))
                        : ::pwrite(fd, req.data + done, req.length - done,
                                   static_cast<off_t>(req.offset + done));
        if (n < 0) {
          if (errno == EINTR) continue;
          req.result = -errno;
          return;
        }
        if (n == 0) {
          if (req.op == IoRequest::Op::kWrite) {
            req.result = -EIO;
            return;
          }
          break;  // end of file
        }
        done += static_cast<uint64_t>(n);
      }
      req.result = static_cast<int64_t>(done);
      return;
    }
    case IoRequest::Op::kSync:
      req.result = ::fdatasync(fd) == 0 ? 0 : -errno;
      return;
    case IoRequest::Op::kDiscard:
      req.result = ZeroRange(fd, req.offset, req.length, /*keep_allocated=*/false);
      return;
    case IoRequest::Op::kZero:
      req.result = ZeroRange(fd, req.offset, req.length, /*keep_allocated=*/true);
      return;
    case IoRequest::Op::kAllocate:
      req.result = 0;
      if (::fallocate(fd, 0, static_cast<off_t>(req.offset), static_cast<off_t>(req.length)) != 0 &&
          !AllocateUnsupported(errno)) {
        req.result = -errno;
      }
      return;
  }
}

}  // namespace uq::qcow2
