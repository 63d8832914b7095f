#include "qcow2/bitmaps/dirty_bitmap.h"

#include <algorithm>
#include <bit>

namespace uq::qcow2 {

DirtyBitmap::DirtyBitmap(uint64_t disk_size, uint8_t granularity_bits)
    : disk_size_(disk_size),
      granularity_bits_(granularity_bits),
      bits_((disk_size + (uint64_t{1} << granularity_bits) - 1) >> granularity_bits),
      words_count_(static_cast<size_t>((bits_ + 63) / 64)),
      words_(std::make_unique<std::atomic<uint64_t>[]>(words_count_)) {
  for (size_t i = 0; i < words_count_; i++) words_[i].store(0, std::memory_order_relaxed);
}

void DirtyBitmap::SetBits(uint64_t first, uint64_t last) {
  for (uint64_t w = first / 64; w <= last / 64; w++) {
    const uint64_t lo = w == first / 64 ? first % 64 : 0;
    const uint64_t hi = w == last / 64 ? last % 64 : 63;
    const uint64_t mask =
        (hi == 63 ? ~uint64_t{0} : (uint64_t{1} << (hi + 1)) - 1) & ~((uint64_t{1} << lo) - 1);
    // Most writes hit bits already set: a load is cheaper than a locked or.
    if ((words_[w].load(std::memory_order_relaxed) & mask) != mask) {
      words_[w].fetch_or(mask, std::memory_order_relaxed);
    }
  }
}

void DirtyBitmap::Set(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= disk_size_) return;
  const uint64_t end = std::min(disk_size_, offset + std::min(length, disk_size_ - offset));
  SetBits(offset >> granularity_bits_, (end - 1) >> granularity_bits_);
}

bool DirtyBitmap::Get(uint64_t bit) const {
  if (bit >= bits_) return false;
  return (words_[bit / 64].load(std::memory_order_relaxed) >> (bit % 64)) & 1;
}

void DirtyBitmap::Clear() {
  for (size_t i = 0; i < words_count_; i++) words_[i].store(0, std::memory_order_relaxed);
}

bool DirtyBitmap::Any() const {
  for (size_t i = 0; i < words_count_; i++) {
    if (words_[i].load(std::memory_order_relaxed) != 0) return true;
  }
  return false;
}

void DirtyBitmap::Merge(const DirtyBitmap& other) {
  for (const Extent& e : other.DirtyExtents()) Set(e.offset, e.length);
}

std::vector<DirtyBitmap::Extent> DirtyBitmap::DirtyExtents() const {
  std::vector<Extent> out;
  uint64_t bit = 0;
  while (bit < bits_) {
    // The next set bit, a word at a time.
    uint64_t w = words_[bit / 64].load(std::memory_order_relaxed) & (~uint64_t{0} << (bit % 64));
    while (w == 0) {
      bit = (bit / 64 + 1) * 64;
      if (bit >= bits_) return out;
      w = words_[bit / 64].load(std::memory_order_relaxed);
    }
    const uint64_t first = bit / 64 * 64 + std::countr_zero(w);
    // The next clear bit after it.
    bit = first;
    uint64_t c = ~words_[bit / 64].load(std::memory_order_relaxed) & (~uint64_t{0} << (bit % 64));
    while (c == 0) {
      bit = (bit / 64 + 1) * 64;
      if (bit >= bits_) break;
      c = ~words_[bit / 64].load(std::memory_order_relaxed);
    }
    const uint64_t last =
        bit >= bits_ ? bits_ : std::min(bits_, bit / 64 * 64 + std::countr_zero(c));
    const uint64_t start = first << granularity_bits_;
    const uint64_t end = std::min(disk_size_, last << granularity_bits_);
    if (!out.empty() && out.back().offset + out.back().length == start) {
      out.back().length += end - start;
    } else {
      out.push_back({start, end - start});
    }
    bit = last;
  }
  return out;
}

void DirtyBitmap::Serialize(uint64_t offset, std::span<std::byte> out) const {
  for (size_t i = 0; i < out.size(); i++) {
    const uint64_t byte = offset + i;
    uint8_t v = 0;
    if (byte / 8 < words_count_) {
      v = static_cast<uint8_t>(words_[byte / 8].load(std::memory_order_relaxed) >> (byte % 8 * 8));
    }
    out[i] = std::byte{v};
  }
}

void DirtyBitmap::Deserialize(uint64_t offset, std::span<const std::byte> in) {
  for (size_t i = 0; i < in.size(); i++) {
    const uint64_t byte = offset + i;
    const uint64_t v = static_cast<uint8_t>(in[i]);
    if (v == 0 || byte / 8 >= words_count_) continue;
    words_[byte / 8].fetch_or(v << (byte % 8 * 8), std::memory_order_relaxed);
  }
  // Bits past the disk's end are padding: dropped.
  if (bits_ % 64 != 0) {
    words_[words_count_ - 1].fetch_and((uint64_t{1} << (bits_ % 64)) - 1,
                                       std::memory_order_relaxed);
  }
}

void DirtyBitmap::SetSerializedOnes(uint64_t offset, uint64_t length) {
  if (length == 0 || offset * 8 >= bits_) return;
  SetBits(offset * 8, std::min(bits_, (offset + length) * 8) - 1);
}

}  // namespace uq::qcow2
