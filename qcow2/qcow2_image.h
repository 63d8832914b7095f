// Qcow2Image: a qcow2 file served as a BlockDevice.
//
// Owns the image file, its external data file (if any) and its backing
// device (if any). Open() takes a header that ParseHeader() already
// validated, loads the active L1 table and the snapshot table (both bounded
// by that validation), and sets up a bounded L2 slice cache.
//
// Reads resolve each cluster (or, with extended L2, each run of subclusters)
// to one of: backing/zeros, zeros, host data, compressed data. Entries that
// contradict the spec fail the request with Corruption naming the guest
// offset and the entry; nothing is read from outside the image's own files.
//
// Thread model: one event loop; many requests may be in flight on it.
#ifndef UBLK_QCOW2_QCOW2_QCOW2_IMAGE_H_
#define UBLK_QCOW2_QCOW2_QCOW2_IMAGE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/task.h"
#include "qcow2/block_device.h"
#include "qcow2/file.h"
#include "qcow2/geometry.h"
#include "qcow2/header.h"
#include "qcow2/l2_entry.h"
#include "qcow2/metadata_cache.h"
#include "qcow2/snapshot_table.h"

namespace uq::qcow2 {

struct Qcow2OpenParts {
  std::unique_ptr<File> file;
  Header header;
  std::unique_ptr<File> data_file;        // REQUIRES: set iff header.has_data_file()
  std::unique_ptr<BlockDevice> backing;   // null: no backing (reads zeros)
  bool writable = false;
  uint64_t cache_size = 32ull << 20;
};

class Qcow2Image final : public BlockDevice {
 public:
  static Task<Result<std::unique_ptr<Qcow2Image>>> Open(Qcow2OpenParts parts);
  // Use Open(); the constructor only assembles the parts.
  explicit Qcow2Image(Qcow2OpenParts parts);

  uint64_t size() const override { return header_.size; }
  bool read_only() const override { return !writable_; }
  const std::string& path() const override { return file_->path(); }
  Task<Status> Read(uint64_t offset, std::span<std::byte> out) override;

  const Header& header() const { return header_; }
  const Geometry& geometry() const { return geo_; }
  const std::vector<Snapshot>& snapshots() const { return snapshots_; }
  BlockDevice* backing() const { return backing_.get(); }
  const MetadataCache& l2_cache() const { return l2_cache_; }

  // The L2 entry for the guest cluster containing `offset` (unallocated if
  // its L2 table is absent). Exposed for tests and `map`-like tools.
  Task<Result<L2Entry>> LookupEntry(uint64_t offset);

 private:
  // Reads the part of one guest cluster at [offset, offset + out.size()).
  Task<Status> ReadInCluster(uint64_t offset, std::span<std::byte> out);
  Task<Status> ReadUnallocated(uint64_t offset, std::span<std::byte> out);
  Task<Status> ReadCompressed(const L2Entry& entry, uint64_t offset_in_cluster,
                              std::span<std::byte> out);
  Status CorruptEntry(uint64_t offset, const L2Entry& entry, const char* why) const;

  std::unique_ptr<File> file_;
  std::unique_ptr<File> data_file_;
  std::unique_ptr<BlockDevice> backing_;
  Header header_;
  Geometry geo_;
  bool writable_;
  uint64_t file_size_ = 0;
  std::vector<uint64_t> l1_;
  std::vector<Snapshot> snapshots_;
  MetadataCache l2_cache_;
  // The last decompressed cluster: sequential small reads of a compressed
  // cluster decompress it once.
  uint64_t decompressed_key_ = ~uint64_t{0};
  AlignedBuffer decompressed_;
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_QCOW2_IMAGE_H_
