// Qcow2Image::BlockStatus: what this image's tables say about a guest range,
// in the terms of QEMU's qcow2 driver (qcow2_co_block_status), so that
// `ublk-qcow2 map` can print what `qemu-img map` prints. Nothing here reads
// guest data.
#include <fmt/format.h>

#include <algorithm>

#include "qcow2/qcow2_image.h"
#include "qcow2/refcounts.h"

namespace uq::qcow2 {

std::optional<RangeStatus> Qcow2Image::SubclusterStatus(const L2Entry& e, uint64_t offset) const {
  const bool has_df = data_file_ != nullptr;
  const uint64_t in_cluster = geo_.cluster_offset_in(offset);
  const uint32_t sc = static_cast<uint32_t>(in_cluster / geo_.subcluster_size);
  RangeStatus s;
  // QEMU's subcluster types: a zero cluster keeps its place only if its entry
  // names a host cluster (ZERO_ALLOC); the data file's "offset 0 with the
  // copied bit" counts for data only. An unallocated subcluster of a mapped
  // cluster (extended L2) has a place too (UNALLOCATED_ALLOC).
  bool placed = e.has_host_cluster(has_df);
  switch (e.Kind(geo_, has_df, sc)) {
    case SubclusterKind::kCompressed:
      s.kind = RangeStatus::Kind::kData;
      placed = false;
      break;
    case SubclusterKind::kData:
      s.kind = RangeStatus::Kind::kData;
      break;
    case SubclusterKind::kZero:
      s.kind = RangeStatus::Kind::kZero;
      if (!geo_.extended_l2) placed = e.host_cluster() != 0;
      break;
    case SubclusterKind::kUnallocated:
      s.kind = RangeStatus::Kind::kUnallocated;
      break;
    case SubclusterKind::kInvalid:
      return std::nullopt;
  }
  // QEMU reports no host offset for an encrypted image's clusters: the bytes
  // there are ciphertext, no use to a reader of the file.
  if (placed && !encrypted()) {
    s.has_offset = true;
    s.host_offset = e.host_cluster() + in_cluster;
    s.file = &(has_df ? data_file_ : file_)->path();
  }
  return s;
}

Task<Result<RangeStatus>> Qcow2Image::BlockStatus(uint64_t offset, uint64_t length) {
  if (offset >= size() || length == 0) {
    co_return Status::InvalidArgument(fmt::format("{}: block status of {} bytes at {} (size {})",
                                                  path(), length, offset, size()));
  }
  // One L2 table at most per answer, and less than 2 GiB (QEMU's driver
  // answers in an int); the caller asks again for the rest. QEMU's splits
  // show: `compare -s` sees whether an answer reaches the end of the image.
  const uint64_t table_span = geo_.cluster_size << geo_.l2_bits;
  constexpr uint64_t kMaxAnswer = (uint64_t{1} << 31) - 1;
  uint64_t end = std::min(
      {offset + length, size(), (offset / table_span + 1) * table_span, offset + kMaxAnswer});
  const uint64_t l1_index = geo_.l1_index(offset);
  if (l1_index >= l1_.size() || (l1_[l1_index] & kL1OffsetMask) == 0) {
    co_return RangeStatus{RangeStatus::Kind::kUnallocated, end - offset};
  }
  CO_ASSIGN_OR_RETURN(L2Entry e, co_await LookupEntry(offset));
  std::optional<RangeStatus> at_offset = SubclusterStatus(e, offset);
  if (!at_offset) {
    co_return CorruptEntry(offset, e, "is invalid (unaligned offset or contradictory bitmap)");
  }
  RangeStatus first = *at_offset;
  // Compressed clusters are answered one by one, as QEMU does.
  if (e.Kind(geo_, data_file_ != nullptr,
             static_cast<uint32_t>(geo_.cluster_offset_in(offset) / geo_.subcluster_size)) ==
      SubclusterKind::kCompressed) {
    end = std::min(end, offset - geo_.cluster_offset_in(offset) + geo_.cluster_size);
  }
  // Extend over the following subclusters while they say the same, with
  // host offsets running on.
  uint64_t pos = (offset / geo_.subcluster_size + 1) * geo_.subcluster_size;
  while (pos < end) {
    if (geo_.cluster_offset_in(pos) == 0) {
      CO_ASSIGN_OR_RETURN(e, co_await LookupEntry(pos));
    }
    std::optional<RangeStatus> next = SubclusterStatus(e, pos);
    if (!next || next->kind != first.kind || next->has_offset != first.has_offset ||
        (first.has_offset && next->host_offset != first.host_offset + (pos - offset))) {
      break;
    }
    pos += geo_.subcluster_size;
  }
  first.length = std::min(pos, end) - offset;
  if (first.kind == RangeStatus::Kind::kData && first.has_offset) {
    CO_ASSIGN_OR_RETURN(bool preallocated, co_await MetadataPreallocated());
    if (preallocated) co_return AskHostFile(first);
  }
  co_return first;
}

Result<RangeStatus> Qcow2Image::AskHostFile(RangeStatus s) {
  // QEMU asks the host file only about data with a place (BDRV_BLOCK_RECURSE):
  // over a hole the range is data reading as zeros, and one that lies at or past the
  // end of the file, or in a hole reaching it, is zeros as far as the
  // cluster run goes. QEMU counts the file in whole 512-byte sectors.
  File& f = data_file_ ? *data_file_ : *file_;
  ASSIGN_OR_RETURN(FileExtent extent, f.Extent(s.host_offset));
  ASSIGN_OR_RETURN(uint64_t file_size, f.Size());
  file_size = (file_size + 511) / 512 * 512;
  if (s.host_offset >= file_size) {
    s.kind = RangeStatus::Kind::kDataZeros;
    return s;
  }
  const uint64_t in_file = std::min(extent.length, file_size - s.host_offset);
  if (!extent.data) {
    s.kind = RangeStatus::Kind::kDataZeros;
    if (s.host_offset + in_file >= file_size) return s;
  }
  s.length = std::min(s.length, in_file);
  return s;
}

Task<Result<bool>> Qcow2Image::MetadataPreallocated() {
  if (metadata_preallocated_.has_value()) co_return *metadata_preallocated_;
  // QEMU's guess (qcow2_detect_metadata_preallocation): the image file has
  // clearly more clusters in use (refcount > 0) than it occupies on disk, so
  // mapped clusters may be holes in it. "Clearly": at least 10/9 of the
  // occupied clusters, and 2 more.
  CO_ASSIGN_OR_RETURN(uint64_t file_length, file_->Size());
  CO_ASSIGN_OR_RETURN(uint64_t allocated, file_->AllocatedBytes());
  const uint64_t cs = geo_.cluster_size;
  const uint64_t real_clusters = allocated / cs;
  const uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
  const uint64_t end_cluster = (file_length + cs - 1) / cs;
  Refcounts* refcounts = refcounts_.get();
  std::unique_ptr<Refcounts> own;
  Header header = header_;
  if (refcounts == nullptr) {
    own = std::make_unique<Refcounts>(file_.get(), &header, uint64_t{1} << 20);
    CO_RETURN_IF_ERROR(co_await own->Load());
    refcounts = own.get();
  }
  uint64_t in_use = 0;
  for (uint64_t i = 0; i < end_cluster && in_use < threshold; i++) {
    CO_ASSIGN_OR_RETURN(uint64_t refcount, co_await refcounts->Get(i));
    in_use += refcount != 0;
  }
  metadata_preallocated_ = in_use >= threshold;
  co_return *metadata_preallocated_;
}

}  // namespace uq::qcow2
