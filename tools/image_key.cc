#include "tools/image_key.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace uq::tools {
namespace {

// A passphrase longer than this is no passphrase (QEMU's secret objects have
// no limit; a LUKS passphrase of a megabyte makes no sense and we will not
// read a device file whole).
constexpr size_t kMaxKeyFileBytes = 1 << 20;

std::string& KeyFilePath() {
  static std::string path;
  return path;
}

std::shared_ptr<qcow2::crypto::SecretBytes>& Key() {
  static std::shared_ptr<qcow2::crypto::SecretBytes> key;
  return key;
}

}  // namespace

void AddKeyFlags(CLI::App& app) {
  app.add_option("--key-file", KeyFilePath(),
                 "Passphrase of encrypted (LUKS) images: the file's whole content");
}

Status LoadImageKey() {
  const std::string& path = KeyFilePath();
  if (path.empty()) return Status::Ok();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, path + ": cannot read key file");
  qcow2::crypto::SecretBytes buf(kMaxKeyFileBytes + 1);
  size_t got = 0;
  Status st;
  while (got < buf.size()) {
    const ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      st = Status::FromErrno(errno, path + ": cannot read key file");
      break;
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  if (!st.ok()) return st;
  if (got == 0) return Status::InvalidArgument(path + ": key file is empty");
  if (got > kMaxKeyFileBytes) {
    return Status::InvalidArgument(path + ": key file is larger than 1 MiB");
  }
  Key() = std::make_shared<qcow2::crypto::SecretBytes>(buf.span().first(got));
  return Status::Ok();
}

std::shared_ptr<const qcow2::crypto::SecretBytes> ImageKey() { return Key(); }

std::shared_ptr<qcow2::crypto::SecretBytes> ImageKeyToWipe() { return Key(); }

const std::string& ImageKeyFile() { return KeyFilePath(); }

}  // namespace uq::tools
