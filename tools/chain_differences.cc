#include "tools/chain_differences.h"

#include <algorithm>
#include <cstring>
#include <span>

#include "base/aligned_buffer.h"

namespace uq::tools {
namespace {

using qcow2::RangeStatus;

constexpr uint64_t kPiece = uint64_t{2} << 20;  // qemu-img's IO_BUF_SIZE
constexpr uint64_t kSector = 512;

// Bytes from the start of `a` (and `b`, as long) over which whether the two
// differ stays what it is for the first sector; sets `differ` to that.
uint64_t SameVerdictRun(std::span<const std::byte> a, std::span<const std::byte> b, bool* differ) {
  auto sector_differs = [&](uint64_t at) {
    const uint64_t n = std::min<uint64_t>(kSector, a.size() - at);
    return std::memcmp(a.data() + at, b.data() + at, n) != 0;
  };
  *differ = sector_differs(0);
  uint64_t at = std::min<uint64_t>(kSector, a.size());
  while (at < a.size() && sector_differs(at) == *differ)
    at += std::min<uint64_t>(kSector, a.size() - at);
  return at;
}

// Fills `out` from `device` (null: zeros) at `offset`; the caller has made
// sure the range lies inside the device, or entirely past its end.
Task<Status> ReadOrZeros(qcow2::BlockDevice* device, uint64_t offset, std::span<std::byte> out) {
  if (device == nullptr || offset >= device->size()) {
    std::memset(out.data(), 0, out.size());
    co_return Status::Ok();
  }
  co_return co_await device->Read(offset, out);
}

}  // namespace

Task<Status> CopyChainDifferences(qcow2::BlockDevice& overlay, qcow2::BlockDevice* new_backing,
                                  const std::function<void(uint64_t, uint64_t)>& on_progress) {
  qcow2::BlockDevice* old_backing = overlay.backing();
  const uint64_t size = overlay.size();
  const uint64_t old_size = old_backing ? old_backing->size() : 0;
  const uint64_t new_size = new_backing ? new_backing->size() : 0;
  AlignedBuffer old_buf(std::min(kPiece, std::max<uint64_t>(size, 1)));
  AlignedBuffer new_buf(old_buf.size());
  uint64_t n = 0;
  for (uint64_t offset = 0; offset < size; offset += n) {
    n = std::min(kPiece, size - offset);
    CO_ASSIGN_OR_RETURN(RangeStatus status, co_await overlay.BlockStatus(offset, n));
    n = std::min(n, status.length);
    if (status.kind == RangeStatus::Kind::kUnallocated) {
      // Past the old chain's end the overlay reads zeros; QEMU writes those
      // as zeros rather than as data.
      const bool old_is_zero = offset >= old_size;
      if (!old_is_zero) n = std::min(n, old_size - offset);
      if (new_backing != nullptr && offset < new_size) n = std::min(n, new_size - offset);
      std::span<std::byte> old_bytes = old_buf.span().first(n);
      std::span<std::byte> new_bytes = new_buf.span().first(n);
      CO_RETURN_IF_ERROR(co_await ReadOrZeros(old_backing, offset, old_bytes));
      CO_RETURN_IF_ERROR(co_await ReadOrZeros(new_backing, offset, new_bytes));
      for (uint64_t done = 0; done < n;) {
        bool differ = false;
        const uint64_t run =
            SameVerdictRun(old_bytes.subspan(done), new_bytes.subspan(done), &differ);
        if (differ) {
          if (old_is_zero) {
            CO_RETURN_IF_ERROR(co_await overlay.WriteZeroes(offset + done, run));
          } else {
            CO_RETURN_IF_ERROR(
                co_await overlay.Write(offset + done, old_bytes.subspan(done, run), false));
          }
        }
        done += run;
      }
    }
    if (on_progress) on_progress(offset + n, size);
  }
  co_return Status::Ok();
}

}  // namespace uq::tools
