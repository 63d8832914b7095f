// RawImage: a plain file as a BlockDevice (raw backing files; the target of
// `convert -O raw`). The virtual size is the file size at open time, rounded
// up to whole 512-byte sectors as QEMU does; the tail past the end of the file
// reads as zeros.
#ifndef UBLK_QCOW2_QCOW2_RAW_IMAGE_H_
#define UBLK_QCOW2_QCOW2_RAW_IMAGE_H_

#include <memory>

#include "qcow2/block_device.h"
#include "qcow2/file.h"

namespace uq::qcow2 {

class RawImage final : public BlockDevice {
 public:
  static Result<std::unique_ptr<RawImage>> Open(std::unique_ptr<File> file, bool writable);
  RawImage(std::unique_ptr<File> file, uint64_t size, bool writable)
      : file_(std::move(file)), size_(size), writable_(writable) {}

  uint64_t size() const override { return size_; }
  bool read_only() const override { return !writable_; }
  const std::string& path() const override { return file_->path(); }
  Task<Status> Read(uint64_t offset, std::span<std::byte> out) override;
  Task<Status> Write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  Task<Status> Flush() override;
  Task<Status> Discard(uint64_t offset, uint64_t length) override;
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length) override;
  Task<Result<uint64_t>> ZeroPrefix(uint64_t offset, uint64_t length) override;
  // Holes (SEEK_HOLE, and the tail past the end of the file) are kZero, the
  // rest kData, both at host offset == offset in this file, as QEMU's
  // file-posix driver reports them.
  Task<Result<RangeStatus>> BlockStatus(uint64_t offset, uint64_t length) override;
  // The file truncated to `new_size` (a multiple of 512); a grown tail is
  // sparse (off), reserved (falloc) or written with zeros (full); metadata
  // is NotSupported, as QEMU's file driver refuses it.
  Task<Status> Resize(uint64_t new_size, Preallocation prealloc) override;

 private:
  Status CheckRange(uint64_t offset, uint64_t length) const;
  std::unique_ptr<File> file_;
  uint64_t size_;
  bool writable_;
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_RAW_IMAGE_H_
