#include "uring/uring_env.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include <fmt/format.h>

#include "qcow2/sync_env.h"
#include "uring/file_io.h"
#include "uring/ring.h"

namespace uq::uring {
namespace {

class UringFile final : public qcow2::File {
 public:
  // Takes ownership of `fd`.
  UringFile(int fd, std::string path, bool direct) : fd_(fd), direct_(direct), path_(std::move(path)) {}
  ~UringFile() override { ::close(fd_); }
  UringFile(const UringFile&) = delete;
  UringFile& operator=(const UringFile&) = delete;

  Result<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, path_ + ": stat");
    return static_cast<uint64_t>(st.st_size);
  }
  Status Truncate(uint64_t size) override {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
      return Status::FromErrno(errno, fmt::format("{}: truncate to {}", path_, size));
    }
    return Status::Ok();
  }
  const std::string& path() const override { return path_; }
  int fd() const override { return fd_; }

  bool Start(qcow2::IoRequest& req) override {
    // O_DIRECT rejects unaligned I/O; the blocking path bounces it (rare:
    // header probes and compressed clusters).
    if (direct_ && qcow2::MisalignedForDirect(req)) {
      qcow2::PerformBlocking(fd_, req);
      return true;
    }
    if (Ring* ring = Ring::Current()) return StartFileIo(*ring, fd_, req);
    qcow2::PerformBlocking(fd_, req);
    return true;
  }

 private:
  const int fd_;
  const bool direct_;
  const std::string path_;
};

}  // namespace

UringEnv* UringEnv::Default() {
  static UringEnv env;
  return &env;
}

Result<std::unique_ptr<qcow2::File>> UringEnv::Open(const std::string& path,
                                                    const qcow2::OpenOptions& options) {
  ASSIGN_OR_RETURN(int fd, qcow2::OpenFd(path, options));
  return std::unique_ptr<qcow2::File>(std::make_unique<UringFile>(fd, path, options.direct));
}

bool UringEnv::Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

}  // namespace uq::uring
