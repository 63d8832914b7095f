#include "qcow2/file.h"

#include <fmt/format.h>

#include <cstring>

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

}  // namespace uq::qcow2
