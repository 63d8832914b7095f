// SyncEnv: the Env whose files do plain pread/pwrite/fdatasync/fallocate and
// complete every operation before Start() returns. Used by the CLI's image
// verbs when no ring is wanted, and by unit tests. Thread-safe.
#ifndef UBLK_QCOW2_QCOW2_SYNC_ENV_H_
#define UBLK_QCOW2_QCOW2_SYNC_ENV_H_

#include <cerrno>
#include <string>

#include "qcow2/file.h"

namespace uq::qcow2 {

// A File over an open host fd: owns and closes it, answers Size/Truncate/
// path/fd. Subclasses decide how operations run (Start()).
class FdFile : public File {
 public:
  // Takes ownership of `fd`.
  FdFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~FdFile() override;
  FdFile(const FdFile&) = delete;
  FdFile& operator=(const FdFile&) = delete;

  Result<uint64_t> Size() override;
  Status Truncate(uint64_t size) override;
  const std::string& path() const override { return path_; }
  int fd() const override { return fd_; }

 private:
  const int fd_;
  const std::string path_;
};

// A process-wide SyncEnv.
Env* SyncEnv();

// Performs `req` on `fd` with blocking syscalls (retrying short transfers and
// EINTR) and sets req.result. Shared with other Envs as their fallback path.
void PerformBlocking(int fd, IoRequest& req);

// True if fallocate's `err` means the file system cannot allocate ahead
// (kAllocate then succeeds having done nothing).
inline bool AllocateUnsupported(int err) {
  return err == EOPNOTSUPP || err == ENOSYS || err == EINVAL;
}

// True if `req` is a read or write that O_DIRECT would reject (offset,
// length or buffer not aligned to 512 bytes). PerformBlocking serves such
// requests on O_DIRECT files through an aligned bounce buffer, so the engine
// may read a 104-byte header or a compressed cluster at any byte offset.
bool MisalignedForDirect(const IoRequest& req);

// True if `path` can be opened with O_DIRECT (false on tmpfs and other file
// systems without direct I/O, and if it cannot be opened at all: the real
// open reports that error).
bool SupportsDirectIo(const std::string& path);

// Opens `path` with open(2) flags derived from `options`; returns the fd.
Result<int> OpenFd(const std::string& path, const OpenOptions& options);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_SYNC_ENV_H_
