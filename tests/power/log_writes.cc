#include "tests/power/log_writes.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace uq::power {
namespace {

constexpr uint64_t kMagic = 0x6a736677736872ULL;
constexpr uint64_t kVersion = 1;
constexpr size_t kEntryHeader = 32;

uint64_t Le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

Status ReadAt(int fd, const std::string& path, void* buf, size_t len, uint64_t offset) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, static_cast<uint8_t*>(buf) + done, len - done, offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::IoError(path + ": read at " + std::to_string(offset), errno);
    if (n == 0) return Status::Corruption(path + ": log ends early at " + std::to_string(offset));
    done += n;
  }
  return Status::Ok();
}

}  // namespace

Result<LogReader> LogReader::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::IoError(path + ": cannot open log", errno);
  uint8_t super[28];
  Status s = ReadAt(fd, path, super, sizeof(super), 0);
  if (!s.ok()) {
    ::close(fd);
    return s;
  }
  const uint64_t magic = Le64(super), version = Le64(super + 8), nr = Le64(super + 16);
  const uint32_t sectorsize = static_cast<uint32_t>(Le64(super + 24) & 0xffffffffu);
  if (magic != kMagic || version != kVersion || sectorsize < 512 || sectorsize > 65536 ||
      (sectorsize & (sectorsize - 1)) != 0) {
    ::close(fd);
    return Status::Corruption(path + ": not a dm-log-writes log (bad superblock)");
  }
  return LogReader(fd, path, nr, sectorsize);
}

LogReader::LogReader(LogReader&& other) noexcept
    : fd_(other.fd_),
      path_(std::move(other.path_)),
      nr_entries_(other.nr_entries_),
      sectorsize_(other.sectorsize_),
      index_(other.index_),
      offset_(other.offset_) {
  other.fd_ = -1;
}

LogReader::~LogReader() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::optional<LogEntry>> LogReader::Next() {
  if (index_ >= nr_entries_) return std::optional<LogEntry>();
  std::vector<uint8_t> header(sectorsize_);
  Status s = ReadAt(fd_, path_, header.data(), sectorsize_, offset_);
  if (!s.ok()) return s;
  LogEntry e;
  e.index = index_;
  e.sector = Le64(header.data());
  e.nr_sectors = Le64(header.data() + 8);
  e.flags = Le64(header.data() + 16);
  const uint64_t data_len = Le64(header.data() + 24);
  const std::string where = path_ + ": entry " + std::to_string(index_);
  if (e.flags & kLogMark) {
    if (data_len > sectorsize_ - kEntryHeader) return Status::Corruption(where + ": mark too long");
    e.mark.assign(reinterpret_cast<const char*>(header.data()) + kEntryHeader, data_len);
  } else if (data_len != 0) {
    // Inline (DAX) data: our rig never logs it, and skipping it would misplace the rest.
    return Status::NotSupported(where + ": inline data is not supported");
  }
  if (e.nr_sectors > (uint64_t{1} << 32)) return Status::Corruption(where + ": huge entry");
  e.data_offset = offset_ + sectorsize_;
  offset_ = e.data_offset + ((e.flags & kLogDiscard) ? 0 : e.nr_sectors * sectorsize_);
  ++index_;
  return std::optional<LogEntry>(std::move(e));
}

Status LogReader::Apply(const LogEntry& e, int target_fd) {
  if (e.nr_sectors == 0) return Status::Ok();
  const uint64_t dst = e.sector * sectorsize_;
  const uint64_t len = e.nr_sectors * sectorsize_;
  if (e.flags & kLogDiscard) {
    // The rig's data device is a loop device over a file: a discard punches a hole, which
    // reads back zeros. Do the same.
    if (::fallocate(target_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, dst, len) == 0) {
      return Status::Ok();
    }
    std::vector<uint8_t> zeros(std::min<uint64_t>(len, 1 << 20));
    for (uint64_t done = 0; done < len;) {
      size_t n = std::min<uint64_t>(zeros.size(), len - done);
      if (::pwrite(target_fd, zeros.data(), n, dst + done) != static_cast<ssize_t>(n)) {
        return Status::IoError("replay target: write at " + std::to_string(dst + done), errno);
      }
      done += n;
    }
    return Status::Ok();
  }
  std::vector<uint8_t> buf(std::min<uint64_t>(len, 1 << 20));
  for (uint64_t done = 0; done < len;) {
    size_t n = std::min<uint64_t>(buf.size(), len - done);
    Status s = ReadAt(fd_, path_, buf.data(), n, e.data_offset + done);
    if (!s.ok()) return s;
    // Zeros (mkfs.xfs zeroes a 64 MiB log) become a hole: the same content, and the target
    // stays sparse, so the copy each check takes stays cheap.
    const bool zero = buf[0] == 0 && std::memcmp(buf.data(), buf.data() + 1, n - 1) == 0;
    if (zero && ::fallocate(target_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, dst + done,
                            n) == 0) {
      done += n;
      continue;
    }
    if (::pwrite(target_fd, buf.data(), n, dst + done) != static_cast<ssize_t>(n)) {
      return Status::IoError("replay target: write at " + std::to_string(dst + done), errno);
    }
    done += n;
  }
  return Status::Ok();
}

}  // namespace uq::power
