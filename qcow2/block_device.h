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
// Thread model: a device belongs to the thread (event loop) that opened it;
// only TryAnyThread may be called from other threads.
#ifndef UBLK_QCOW2_QCOW2_BLOCK_DEVICE_H_
#define UBLK_QCOW2_QCOW2_BLOCK_DEVICE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "qcow2/preallocation.h"
#include "qcow2/shared_map.h"

namespace uq::qcow2 {

// What ONE layer of a backing chain says about a range, found from metadata
// and the file system without reading data: qemu-img map's unit. Walking the
// chain (depth, zeros where no layer has anything) is the caller's job.
struct RangeStatus {
  enum class Kind : uint8_t {
    kData,         // this layer holds the bytes
    kZero,         // this layer says they read as zeros
    kDataZeros,    // both: this layer holds them, at a place that reads as
                   // zeros (mapped clusters over a hole of the host file)
    kUnallocated,  // this layer holds nothing: the layer below decides
  };
  bool data() const { return kind == Kind::kData || kind == Kind::kDataZeros; }
  bool zero() const { return kind == Kind::kZero || kind == Kind::kDataZeros; }
  Kind kind = Kind::kData;
  // Bytes from the offset asked about that share this status (kind, and a
  // host offset that runs on contiguously); > 0.
  uint64_t length = 0;
  // Whether the range has a place in a host file: host_offset in `file`.
  // Compressed data has none; an unallocated or zero range may have one
  // (preallocated clusters, extended L2 subclusters of a mapped cluster).
  bool has_offset = false;
  uint64_t host_offset = 0;
  // The path of that host file; lives as long as the device.
  const std::string* file = nullptr;
};

// Where the data of a read or an in-place write lies in the host, for a
// thread that moves it itself (TryMapAnyThread): the range's bytes are
// `extents`, in order, back to back in the request's data, each a run of
// plain clusters (allocated, uncompressed, unencrypted, no subcluster zero
// or unallocated) at `host_offset` in `file`. Holding the mapping holds the
// clusters: the engine changes none of them (allocation, copy-on-write,
// discard, a snapshot) until it is destroyed, so destroy it only once the
// I/O is done. A read that comes back short (the clusters lie past the end
// of the host file: preallocated ones) reads zeros for the rest.
struct HostMapping {
  struct Extent {
    uint64_t host_offset = 0;
    uint64_t data_offset = 0;  // in the request's data
    uint64_t length = 0;
  };
  File* file = nullptr;  // the host file of every extent; lives as long as the device
  std::array<Extent, SharedMap::kMaxPinned> extents{};
  size_t count = 0;
  SharedMap::Pin pin;  // the clusters held
  std::span<const Extent> runs() const { return {extents.data(), count}; }
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  // Virtual size in bytes.
  virtual uint64_t size() const = 0;
  virtual bool read_only() const = 0;
  // True once the device found its own metadata corrupt while serving and
  // turned itself read-only (Qcow2Image::MarkCorrupt): from then on every
  // change fails as failed I/O (EIO), not as a read-only device's refusal,
  // and reads of what is intact go on.
  virtual bool marked_corrupt() const { return false; }
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
  // The status of the longest run from `offset` (at most `length` bytes)
  // that this layer alone describes one way. REQUIRES: 0 < length, and
  // offset + length <= size(). Errors: a metadata read that fails, an entry
  // that contradicts the format (Corruption). This default: data, no offset.
  virtual Task<Result<RangeStatus>> BlockStatus(uint64_t offset, uint64_t length);
  // Changes the virtual size (qemu-img resize). REQUIRES: no request in
  // flight. `prealloc` applies to a grown area. This default: NotSupported
  // for a writable device, the read-only error otherwise.
  virtual Task<Status> Resize(uint64_t new_size, Preallocation prealloc);
  // The next device down the backing chain, or null.
  virtual BlockDevice* backing() const { return nullptr; }
  // A read, or a write without FUA, that the calling thread may do itself,
  // on its own ring, without the device's thread: every cluster of the range
  // is mapped to a known host location that cannot change while the task
  // runs (for a write: a location owned by this image alone, written in
  // place). Returns that task, or nullopt when the request must go through
  // the device's thread as usual. The task does the same as Read/Write would.
  // Thread-safe: any thread may call it while the device's thread runs, and
  // run the task it gets to completion on its own event loop. By default no
  // request qualifies.
  virtual std::optional<Task<Status>> TryAnyThread(bool write, uint64_t offset,
                                                   std::span<std::byte> buffer) {
    (void)write, (void)offset, (void)buffer;
    return std::nullopt;
  }
  // TryAnyThread without the I/O: the host extents of the range, held for
  // the caller, who moves the data itself (the ublk driver with zero copy:
  // between the request's own pages and `file`). Same conditions as
  // TryAnyThread (a write here is never FUA: the caller syncs nothing);
  // nullopt when the request must go through the device's thread. A write
  // through a mapping must be done as TryAnyThread's would be: in place, all
  // of it, before the mapping is destroyed. Thread-safe as TryAnyThread.
  virtual std::optional<HostMapping> TryMapAnyThread(bool write, uint64_t offset,
                                                     uint64_t length) {
    (void)write, (void)offset, (void)length;
    return std::nullopt;
  }
  // Flushes and leaves the image clean (e.g. clears the dirty bit). The
  // device accepts nothing after Close().
  virtual Task<Status> Close();
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_BLOCK_DEVICE_H_
