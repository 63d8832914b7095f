// DirtyBitmap: the in-memory bits of one persistent dirty bitmap, one bit per
// `granularity` bytes of the virtual disk (QEMU's docs/interop/qcow2.txt,
// "Bitmaps").
//
// Set() is what the write path calls: it may run on any thread at once (the
// image's event loop and TryAnyThread's callers), so each 64-bit word is an
// atomic and a set is a relaxed fetch_or; nothing else is ordered by it (the
// bits are read only once the writers are quiesced: at store, or on the
// image's thread for map). Everything else runs on one thread.
//
// Serialised form, as stored in the bitmap's data clusters: bit i of the
// bitmap is bit (i % 8) of byte i / 8 (QEMU's hbitmap serialisation is
// little-endian), bits past the disk's end zero. SerializedBytes() is that
// length; the bitmap table needs ceil(SerializedBytes() / cluster_size)
// entries.
#ifndef UBLK_QCOW2_QCOW2_BITMAPS_DIRTY_BITMAP_H_
#define UBLK_QCOW2_QCOW2_BITMAPS_DIRTY_BITMAP_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace uq::qcow2 {

class DirtyBitmap {
 public:
  // A clear bitmap for a disk of `disk_size` bytes. REQUIRES: 9 <=
  // granularity_bits <= 31 and the bit count within QEMU's limits (the caller
  // checks: see kMaxBitmapBytes), so that the allocation is bounded.
  DirtyBitmap(uint64_t disk_size, uint8_t granularity_bits);

  uint64_t disk_size() const { return disk_size_; }
  uint8_t granularity_bits() const { return granularity_bits_; }
  uint64_t granularity() const { return uint64_t{1} << granularity_bits_; }
  uint64_t bit_count() const { return bits_; }
  uint64_t SerializedBytes() const { return (bits_ + 7) / 8; }

  // Marks every granule [offset, offset + length) touches (guest ranges
  // rounded out to the granularity); the part past the disk is ignored.
  // Thread-safe (see above).
  void Set(uint64_t offset, uint64_t length);
  bool Get(uint64_t bit) const;
  void Clear();
  // Every granule dirty in `other` (any granularity) becomes dirty here.
  void Merge(const DirtyBitmap& other);
  // Whether any bit is set.
  bool Any() const;

  // Dirty byte ranges of the disk, merged and clamped to disk_size(), in order.
  struct Extent {
    uint64_t offset = 0;
    uint64_t length = 0;
  };
  std::vector<Extent> DirtyExtents() const;

  // The serialised bytes [offset, offset + out.size()) (zeros past the end).
  void Serialize(uint64_t offset, std::span<std::byte> out) const;
  // Sets the serialised bytes at `offset` from `in` (ORed into the bits;
  // bits past the disk's end are dropped, as QEMU drops them).
  void Deserialize(uint64_t offset, std::span<const std::byte> in);
  // Every bit of the serialised bytes [offset, offset + length) set.
  void SetSerializedOnes(uint64_t offset, uint64_t length);

 private:
  void SetBits(uint64_t first, uint64_t last);  // inclusive, clamped by caller
  uint64_t disk_size_;
  uint8_t granularity_bits_;
  uint64_t bits_;
  size_t words_count_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_BITMAPS_DIRTY_BITMAP_H_
