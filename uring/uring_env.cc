#include "uring/uring_env.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "qcow2/sync_env.h"
#include "uring/file_io.h"
#include "uring/offload.h"
#include "uring/ring.h"

namespace uq::uring {
namespace {

class UringFile final : public qcow2::FdFile {
 public:
  // Takes ownership of `fd`.
  UringFile(int fd, std::string path, bool direct) : FdFile(fd, std::move(path)), direct_(direct) {}

  bool Start(qcow2::IoRequest& req) override {
    Ring* ring = Ring::Current();
    // O_DIRECT rejects unaligned I/O. Unaligned reads (compressed clusters,
    // header probes) bounce through an aligned buffer on the ring; unaligned
    // writes, which would need a read-modify-write of the blocks around them
    // (the engine writes none on the I/O path), take the blocking path.
    if (direct_ && qcow2::MisalignedForDirect(req)) {
      if (ring != nullptr && req.op == qcow2::IoRequest::Op::kRead) {
        return StartBouncedRead(*ring, fd(), req);
      }
      qcow2::PerformBlocking(fd(), req);
      return true;
    }
    if (ring != nullptr) return StartFileIo(*ring, fd(), req);
    qcow2::PerformBlocking(fd(), req);
    return true;
  }

 private:
  const bool direct_;
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

bool UringEnv::Defer(std::coroutine_handle<> h) {
  Ring* ring = Ring::Current();
  if (ring == nullptr) return false;
  ring->Defer(h);
  return true;
}

Task<void> UringEnv::RunOffThread(std::function<void()> work) {
  return uring::RunOffThread(std::move(work));
}

}  // namespace uq::uring
