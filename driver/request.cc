#include "driver/request.h"

#include <fmt/format.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <string>

namespace uq::driver {
namespace {

// Error lines go to the daemon's log; a failing disk could produce one per
// request, so only the first ones are kept.
constexpr int kMaxLoggedErrors = 100;
std::atomic<int> logged_errors = 0;  // per process; queue threads fail requests too

int32_t Fail(const IoDescriptor& r, const Status& status) {
  int32_t err = status.ToNegativeErrno();
  const int logged = ++logged_errors;
  if (logged <= kMaxLoggedErrors) {
    std::string line = fmt::format(
        "ublk-qcow2: {} at {} ({} bytes) failed: {}{}\n", OpName(r.op), r.offset, r.length,
        status.ToString(), logged == kMaxLoggedErrors ? " (further errors not logged)" : "");
    std::fputs(line.c_str(), stderr);
  }
  return err;
}

Task<int32_t> Finish(IoDescriptor r, Task<Status> io) {
  Status status = co_await std::move(io);
  if (!status.ok()) co_return Fail(r, status);
  co_return static_cast<int32_t>(r.length);
}

}  // namespace

int32_t FailRequest(const IoDescriptor& request, const Status& status) {
  return Fail(request, status);
}

std::optional<Task<int32_t>> TryServeHere(qcow2::BlockDevice& device, IoDescriptor r,
                                          std::span<std::byte> buffer) {
  const bool write = r.op == UBLK_IO_OP_WRITE;
  if ((!write && r.op != UBLK_IO_OP_READ) || (write && r.fua()) || r.length == 0 ||
      r.length > buffer.size()) {
    return std::nullopt;  // ServeRequest handles (or rejects) it
  }
  std::optional<Task<Status>> io = device.TryAnyThread(write, r.offset, buffer.first(r.length));
  if (!io) return std::nullopt;
  return Finish(r, std::move(*io));
}

Task<int32_t> ServeRequest(qcow2::BlockDevice& device, IoDescriptor r,
                           std::span<std::byte> buffer) {
  const bool changes =
      r.op == UBLK_IO_OP_WRITE || r.op == UBLK_IO_OP_DISCARD || r.op == UBLK_IO_OP_WRITE_ZEROES;
  const bool ranged = changes || r.op == UBLK_IO_OP_READ;
  if (ranged && (r.offset > device.size() || r.length > device.size() - r.offset)) {
    co_return Fail(
        r, Status::IoError(fmt::format("beyond the device's {} bytes", device.size()), EIO));
  }
  // A device opened read-only refuses changes; one that turned read-only
  // because its image was found corrupt while serving fails them with the
  // engine's own error (EIO): the block layer sees failed I/O either way.
  if (changes && device.read_only() && !device.marked_corrupt()) co_return -EROFS;
  if ((r.op == UBLK_IO_OP_READ || r.op == UBLK_IO_OP_WRITE) && r.length > buffer.size()) {
    co_return Fail(r, Status::InvalidArgument(
                          fmt::format("longer than the {}-byte request buffer", buffer.size())));
  }

  Status status;
  switch (r.op) {
    case UBLK_IO_OP_READ:
      if (r.length > 0) status = co_await device.Read(r.offset, buffer.first(r.length));
      break;
    case UBLK_IO_OP_WRITE:
      if (r.length > 0)
        status = co_await device.Write(r.offset, buffer.first(r.length), r.fua());
      else if (r.fua())
        status = co_await device.Flush();
      break;
    case UBLK_IO_OP_FLUSH:
      status = co_await device.Flush();
      break;
    case UBLK_IO_OP_DISCARD:
      if (r.length > 0) status = co_await device.Discard(r.offset, r.length);
      break;
    case UBLK_IO_OP_WRITE_ZEROES:
      if (r.length > 0) status = co_await device.WriteZeroes(r.offset, r.length);
      break;
    default:
      co_return -EOPNOTSUPP;
  }
  if (!status.ok()) co_return Fail(r, status);
  if (r.op == UBLK_IO_OP_READ || r.op == UBLK_IO_OP_WRITE) co_return static_cast<int32_t>(r.length);
  co_return 0;
}

}  // namespace uq::driver
