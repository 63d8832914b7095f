#include "qcow2/block_device.h"

namespace uq::qcow2 {

namespace {
Status ReadOnly(const BlockDevice& dev) {
  return Status::NotSupported(dev.path() + ": image is read-only");
}
}  // namespace

Task<Status> BlockDevice::Write(uint64_t, std::span<const std::byte>, bool) {
  co_return ReadOnly(*this);
}
Task<Status> BlockDevice::Flush() { co_return Status::Ok(); }
Task<Status> BlockDevice::Discard(uint64_t, uint64_t) { co_return ReadOnly(*this); }
Task<Status> BlockDevice::WriteZeroes(uint64_t, uint64_t) { co_return ReadOnly(*this); }
Task<Result<uint64_t>> BlockDevice::ZeroPrefix(uint64_t, uint64_t) { co_return uint64_t{0}; }
Task<Result<RangeStatus>> BlockDevice::BlockStatus(uint64_t, uint64_t length) {
  co_return RangeStatus{RangeStatus::Kind::kData, length};
}
Task<Status> BlockDevice::Resize(uint64_t, Preallocation) {
  if (read_only()) co_return ReadOnly(*this);
  co_return Status::NotSupported(path() + ": this image cannot be resized");
}
Task<Status> BlockDevice::Close() { co_return co_await Flush(); }

}  // namespace uq::qcow2
