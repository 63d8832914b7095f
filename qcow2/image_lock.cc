#include "qcow2/image_lock.h"

#include <fcntl.h>
#include <fmt/format.h>

#include <cerrno>
#include <initializer_list>

namespace uq::qcow2 {
namespace {

constexpr int kPermBase = 100;    // "I use permission i"
constexpr int kSharedBase = 200;  // "nobody else may have permission i"
constexpr int kConsistentRead = 0, kWrite = 1, kResize = 3;

const char* PermName(int perm) {
  switch (perm) {
    case kConsistentRead:
      return "consistent read";
    case kWrite:
      return "write";
    case kResize:
      return "resize";
  }
  return "?";
}

// True if another open file description holds a lock on `byte`.
Result<bool> HeldByOther(int fd, int byte) {
  struct flock fl = {};
  fl.l_type = F_WRLCK;  // conflicts with any lock
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) return Status::FromErrno(errno, "lock test");
  return fl.l_type != F_UNLCK;
}

Status Take(int fd, int byte) {
  struct flock fl = {};
  fl.l_type = F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (::fcntl(fd, F_OFD_SETLK, &fl) != 0) return Status::FromErrno(errno, "lock");
  return Status::Ok();
}

}  // namespace

Status LockImage(int fd, const std::string& path, bool writable) {
  const std::initializer_list<int> reader_perms = {kConsistentRead};
  const std::initializer_list<int> writer_perms = {kConsistentRead, kWrite, kResize};
  const auto& perms = writable ? writer_perms : reader_perms;
  const std::initializer_list<int> denied = {kWrite, kResize};
  auto busy = [&](int perm) {
    return Status::Busy(
        fmt::format("{}: failed to get the \"{}\" lock: the image is in use by another process "
                    "(QEMU or ublk-qcow2)",
                    path, PermName(perm)));
  };
  for (int perm : perms) {  // someone forbids what we need
    Result<bool> held = HeldByOther(fd, kSharedBase + perm);
    if (!held.ok()) return held.status().WithContext(path);
    if (*held) return busy(perm);
  }
  for (int perm : denied) {  // someone has what we forbid
    Result<bool> held = HeldByOther(fd, kPermBase + perm);
    if (!held.ok()) return held.status().WithContext(path);
    if (*held) return busy(perm);
  }
  for (int perm : perms) RETURN_IF_ERROR(Take(fd, kPermBase + perm).WithContext(path));
  for (int perm : denied) RETURN_IF_ERROR(Take(fd, kSharedBase + perm).WithContext(path));
  return Status::Ok();
}

}  // namespace uq::qcow2
