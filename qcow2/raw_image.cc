#include "qcow2/raw_image.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>

namespace uq::qcow2 {

Result<std::unique_ptr<RawImage>> RawImage::Open(std::unique_ptr<File> file, bool writable) {
  ASSIGN_OR_RETURN(uint64_t size, file->Size());
  // QEMU counts a raw file in whole sectors.
  if (!writable) size = (size + 511) / 512 * 512;
  return std::make_unique<RawImage>(std::move(file), size, writable);
}

Status RawImage::CheckRange(uint64_t offset, uint64_t length) const {
  if (offset > size_ || length > size_ - offset) {
    return Status::InvalidArgument(fmt::format("{}: {} bytes at {} are past the end ({} bytes)",
                                               path(), length, offset, size_));
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

Task<Result<uint64_t>> RawImage::ZeroPrefix(uint64_t offset, uint64_t length) {
  const int fd = file_->fd();
  if (fd < 0 || offset >= size_) co_return uint64_t{0};
  length = std::min(length, size_ - offset);
  // The file system knows its holes; past the end of the file is zeros too.
  off_t data = ::lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) co_return errno == ENXIO ? length : uint64_t{0};
  co_return std::min<uint64_t>(length, static_cast<uint64_t>(data) - offset);
}

Task<Result<RangeStatus>> RawImage::BlockStatus(uint64_t offset, uint64_t length) {
  CO_ASSIGN_OR_RETURN(FileExtent extent, file_->Extent(offset));
  RangeStatus status;
  status.kind = extent.data ? RangeStatus::Kind::kData : RangeStatus::Kind::kZero;
  status.length = std::min(length, extent.length);
  status.has_offset = true;
  status.host_offset = offset;
  status.file = &file_->path();
  co_return status;
}

Task<Status> RawImage::Resize(uint64_t new_size, Preallocation prealloc) {
  if (!writable_) co_return co_await BlockDevice::Resize(new_size, prealloc);
  if (prealloc == Preallocation::kMetadata) {
    co_return Status::NotSupported(
        fmt::format("{}: unsupported preallocation mode 'metadata' for a raw file", path()));
  }
  const uint64_t old_size = size_;
  if (new_size < old_size && prealloc != Preallocation::kOff) {
    co_return Status::InvalidArgument(
        fmt::format("{}: preallocation can't be used for shrinking an image", path()));
  }
  CO_RETURN_IF_ERROR(file_->Truncate(new_size));
  size_ = new_size;
  if (new_size > old_size && prealloc == Preallocation::kFalloc) {
    CO_RETURN_IF_ERROR(co_await file_->Allocate(old_size, new_size - old_size));
  } else if (new_size > old_size && prealloc == Preallocation::kFull) {
    CO_RETURN_IF_ERROR(co_await WriteZeroBytes(*file_, old_size, new_size - old_size));
  }
  co_return co_await file_->Sync();
}

}  // namespace uq::qcow2
