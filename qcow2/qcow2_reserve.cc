// The cluster reserve of a Qcow2Image with stable metadata (see the file
// comment of qcow2_image.h): clusters whose refcount was raised to 1 and
// made stable before any of them is handed out, so that an L2 entry naming
// one of them may reach the file, and the disk, at any time after the data.
#include <algorithm>

#include "base/aligned_buffer.h"
#include "qcow2/format.h"
#include "qcow2/qcow2_image.h"

namespace uq::qcow2 {

uint64_t Qcow2Image::ReserveBatch() const {
  // 8 MiB of clusters, at least 16 and at most 256: a refill costs one or two
  // syncs, so at 64 KiB clusters 128 allocating writes share them; a crash
  // leaks what is reserved (check -r leaks frees it).
  return std::clamp<uint64_t>((uint64_t{8} << 20) / geo_.cluster_size, 16, 256);
}

uint64_t Qcow2Image::MaxReserveBatch() const {
  // 64 MiB, at most 2048 clusters: what a crash may leak, and how much the
  // file grows (sparse) ahead of the data.
  return std::max(ReserveBatch(),
                  std::clamp<uint64_t>((uint64_t{64} << 20) / geo_.cluster_size, 16, 2048));
}

Task<Status> Qcow2Image::RefillReserve() {
  const uint64_t cs = geo_.cluster_size;
  // Each refill drained the one before: allocations keep coming, so the
  // next batch doubles (up to MaxReserveBatch) and the sync is shared by
  // more of them.
  const uint64_t want = reserve_batch_ != 0 ? reserve_batch_ : ReserveBatch();
  // What reads as zeros on disk: past everything used so far, not past the
  // end of the file, which preallocation (ExtendTo) keeps ahead of it.
  zero_from_ = std::max({zero_from_, file_size_, refcounts_->used_end()});
  const uint64_t zero_from = zero_from_;
  std::vector<uint64_t> got;
  got.reserve(want);
  Status st;
  uint64_t file_end = ~uint64_t{0};
  for (uint64_t i = 0; i < want; i++) {
    // One at a time: a run of free clusters is not needed, and asking for
    // one would skip the holes discards leave.
    Result<uint64_t> host = co_await refcounts_->Allocate(1);
    if (!host.ok()) {
      st = host.status();
      break;
    }
    got.push_back(*host);
  }
  // Fewer than asked (the refcount table cannot grow, say): reserve those.
  if (!got.empty()) st = Status::Ok();
  // The file must reach past every reserved cluster on disk too: an L2 entry
  // naming a cluster past the end of the file is an error to `qemu-img
  // check`, and the data write that would extend the file may be lost in a
  // power cut while the entry is not. One zero sector at the end of the
  // highest one (nothing uses it yet) extends it, sparse; the sync below
  // makes the size stable. Close cuts back what stays unused.
  if (st.ok()) {
    const uint64_t top = *std::max_element(got.begin(), got.end()) + cs;
    Result<uint64_t> size = file_->Size();
    if (!size.ok()) {
      st = size.status();
    } else {
      file_end = *size;
    }
    if (st.ok() && file_end < top) {
      AlignedBuffer zeros(kSectorSize);
      st = co_await file_->Write(top - kSectorSize, zeros.span());
      reserve_extended_ = true;
    }
  }
  // Stable before any is handed out: the blocks, then (after a sync) the
  // table entries naming new blocks, then a sync.
  if (st.ok()) st = co_await refcounts_->WriteBlocks();
  if (st.ok() && refcounts_->table_dirty()) {
    st = co_await file_->Sync();
    if (st.ok()) st = co_await refcounts_->WriteTable();
  }
  if (st.ok()) st = co_await file_->Sync();
  if (!st.ok()) {
    // Raised in memory, maybe on disk: they drop back at the next flush.
    for (uint64_t host : got) refcounts_->DeferDecrement(host / cs);
    co_return st;
  }
  for (uint64_t host : got) reserved_.push_back(Reserved{host, host >= zero_from});
  reserve_batch_ = std::min(want * 2, MaxReserveBatch());
  co_return Status::Ok();
}

void Qcow2Image::ReleaseReserve(bool for_good) {
  if (for_good) reserve_released_ = true;
  if (!refcounts_) return;
  for (const Reserved& r : reserved_) refcounts_->DeferDecrement(r.host / geo_.cluster_size);
  reserved_.clear();
}

void Qcow2Image::NoteEntryData(bool copied, bool copied_zeros, bool host_zero) {
  // (host_zero is false for an encrypted image: its copied zeros are
  // ciphertext on disk, which must be there before the entry.)
  if (stable_metadata_ && copied && !(copied_zeros && host_zero)) entries_need_data_sync_ = true;
}

}  // namespace uq::qcow2
