#include "qcow2/raw_image.h"

#include <fmt/format.h>

namespace uq::qcow2 {

Result<std::unique_ptr<RawImage>> RawImage::Open(std::unique_ptr<File> file, bool writable) {
  ASSIGN_OR_RETURN(uint64_t size, file->Size());
  return std::make_unique<RawImage>(std::move(file), size, writable);
}

Status RawImage::CheckRange(uint64_t offset, uint64_t length) const {
  if (offset > size_ || length > size_ - offset) {
    return Status::InvalidArgument(
        fmt::format("{}: {} bytes at {} are past the end ({} bytes)", path(), length, offset, size_));
  }
  return Status::Ok();
}

Task<Status> RawImage::Read(uint64_t offset, std::span<std::byte> out) {
  CO_RETURN_IF_ERROR(CheckRange(offset, out.size()));
  // The file may have shrunk since open: what is missing reads as zeros.
  co_return co_await file_->ReadZeroPadded(offset, out);
}

Task<Status> RawImage::Write(uint64_t offset, std::span<const std::byte> data, bool fua) {
  if (!writable_) co_return co_await BlockDevice::Write(offset, data, fua);
  CO_RETURN_IF_ERROR(CheckRange(offset, data.size()));
  CO_RETURN_IF_ERROR(co_await file_->Write(offset, data));
  if (fua) CO_RETURN_IF_ERROR(co_await file_->Sync());
  co_return Status::Ok();
}

Task<Status> RawImage::Flush() {
  if (!writable_) co_return Status::Ok();
  co_return co_await file_->Sync();
}

Task<Status> RawImage::Discard(uint64_t offset, uint64_t length) {
  if (!writable_) co_return co_await BlockDevice::Discard(offset, length);
  CO_RETURN_IF_ERROR(CheckRange(offset, length));
  co_return co_await file_->Discard(offset, length);
}

Task<Status> RawImage::WriteZeroes(uint64_t offset, uint64_t length) {
  if (!writable_) co_return co_await BlockDevice::WriteZeroes(offset, length);
  CO_RETURN_IF_ERROR(CheckRange(offset, length));
  co_return co_await file_->Zero(offset, length);
}

}  // namespace uq::qcow2
