#include "qcow2/file.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "base/aligned_buffer.h"

namespace uq::qcow2 {

namespace {
const char* OpName(IoRequest::Op op) {
  switch (op) {
    case IoRequest::Op::kRead:
      return "read";
    case IoRequest::Op::kWrite:
      return "write";
    case IoRequest::Op::kSync:
      return "sync";
    case IoRequest::Op::kDiscard:
      return "discard";
    case IoRequest::Op::kZero:
      return "write zeroes";
    case IoRequest::Op::kAllocate:
      return "allocate";
  }
  return "?";
}
}  // namespace

Status IoResultToStatus(const File& file, const IoRequest& req) {
  if (req.result >= 0) return Status::Ok();
  int err = static_cast<int>(-req.result);
  if (req.op == IoRequest::Op::kSync)
    return Status::FromErrno(err, fmt::format("{}: sync", file.path()));
  return Status::FromErrno(err, fmt::format("{}: {} of {} bytes at offset {}", file.path(),
                                            OpName(req.op), req.length, req.offset));
}

Task<Status> File::ReadExact(uint64_t offset, std::span<std::byte> out) {
  Result<size_t> n = co_await Read(offset, out);
  if (!n.ok()) co_return n.status();
  if (*n != out.size()) {
    co_return Status::Corruption(
        fmt::format("{}: {} bytes at offset {} lie past end of file", path(), out.size(), offset));
  }
  co_return Status::Ok();
}

Task<Status> File::ReadZeroPadded(uint64_t offset, std::span<std::byte> out) {
  Result<size_t> n = co_await Read(offset, out);
  if (!n.ok()) co_return n.status();
  if (*n < out.size()) std::memset(out.data() + *n, 0, out.size() - *n);
  co_return Status::Ok();
}

Result<FileExtent> File::Extent(uint64_t offset) {
  if (fd() < 0) {
    ASSIGN_OR_RETURN(uint64_t size, Size());
    if (offset >= size) return FileExtent{false, FileExtent::kToTheEnd};
    return FileExtent{true, size - offset};
  }
  const off_t data = ::lseek(fd(), static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) {
    // ENXIO: no data at or after offset (a trailing hole, or past the end).
    if (errno == ENXIO) return FileExtent{false, FileExtent::kToTheEnd};
    return Status::FromErrno(errno, fmt::format("{}: seek data at {}", path(), offset));
  }
  if (static_cast<uint64_t>(data) > offset) {
    return FileExtent{false, static_cast<uint64_t>(data) - offset};
  }
  const off_t hole = ::lseek(fd(), static_cast<off_t>(offset), SEEK_HOLE);
  if (hole < 0) return Status::FromErrno(errno, fmt::format("{}: seek hole at {}", path(), offset));
  return FileExtent{true, static_cast<uint64_t>(hole) - offset};
}

Result<uint64_t> File::AllocatedBytes() {
  if (fd() < 0) return Size();
  struct stat st;
  if (::fstat(fd(), &st) != 0) return Status::FromErrno(errno, fmt::format("{}: stat", path()));
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

Task<Status> WriteZeroBytes(File& file, uint64_t offset, uint64_t length) {
  constexpr uint64_t kChunk = 1 << 20;
  AlignedBuffer zeros(std::min(kChunk, std::max<uint64_t>(length, 1)));
  for (uint64_t done = 0; done < length;) {
    const uint64_t n = std::min<uint64_t>(zeros.size(), length - done);
    CO_RETURN_IF_ERROR(co_await file.Write(offset + done, zeros.span().first(n)));
    done += n;
  }
  co_return Status::Ok();
}

}  // namespace uq::qcow2
