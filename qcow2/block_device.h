// BlockDevice: a virtual disk as the driver and the CLI see it — byte ranges
// to read, write, flush, discard and zero. Implemented by Qcow2Image (a qcow2
// file with its backing chain) and RawImage (a plain file, e.g. a raw backing
// file). A backing chain is a BlockDevice whose unallocated ranges read from
// the next BlockDevice down.
//
// Contracts: ranges lie inside [0, size()); callers split nothing, the device
// splits at cluster boundaries itself. Many operations may be in flight at
// once on one device; results never depend on their interleaving except where
// writes overlap. Buffers stay alive until the operation completes.
//
// Thread model: a device belongs to the thread (event loop) that opened it.
#ifndef UBLK_QCOW2_QCOW2_BLOCK_DEVICE_H_
#define UBLK_QCOW2_QCOW2_BLOCK_DEVICE_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "base/status.h"
#include "base/task.h"

namespace uq::qcow2 {

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  // Virtual size in bytes.
  virtual uint64_t size() const = 0;
  virtual bool read_only() const = 0;
  // The file behind the device (for messages).
  virtual const std::string& path() const = 0;

  // Fills `out` with the bytes at [offset, offset + out.size()).
  virtual Task<Status> Read(uint64_t offset, std::span<std::byte> out) = 0;
  // Writes `data` at offset; with `fua` the data is durable on completion.
  virtual Task<Status> Write(uint64_t offset, std::span<const std::byte> data, bool fua);
  // Makes every completed write durable.
  virtual Task<Status> Flush();
  // The range may read as zeros afterwards, or keep its data; space may be freed.
  virtual Task<Status> Discard(uint64_t offset, uint64_t length);
  // The range reads as zeros afterwards.
  virtual Task<Status> WriteZeroes(uint64_t offset, uint64_t length);
  // How many bytes from `offset` (at most `length`) are known to read as
  // zeros without reading them: holes, zero clusters, unallocated ranges
  // over nothing. 0 when the range starts with data or the device cannot
  // tell. Lets copies skip the empty parts of huge sparse images.
  virtual Task<Result<uint64_t>> ZeroPrefix(uint64_t offset, uint64_t length);
  // Flushes and leaves the image clean (e.g. clears the dirty bit). The
  // device accepts nothing after Close().
  virtual Task<Status> Close();
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_BLOCK_DEVICE_H_
