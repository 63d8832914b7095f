#include "qcow2/qcow2_image.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "base/endian.h"
#include "base/when_all.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/compression.h"
#include "qcow2/format.h"

namespace uq::qcow2 {
namespace {

// L2 tables are cached in slices of this size (or a whole cluster if smaller).
constexpr uint64_t kL2SliceBytes = 4096;
// Compressed clusters at least this large inflate off the engine thread.
constexpr uint64_t kOffloadMinClusterSize = 32 * 1024;
// Encrypted data at least this large is ciphered off the engine thread
// (AES-XTS runs at a few GB/s with AES-NI: 64 KiB is ~20 us, about what a
// hand-off costs).
constexpr uint64_t kOffloadMinCipherBytes = 64 * 1024;
// SharedMap slots: one per 512 bytes of L2 cache (65536, 1.5 MiB, with the
// default 32 MiB cache), at most 2^16, so the map stays small next to it.
size_t SharedMapSlots(uint64_t cache_size) {
  return static_cast<size_t>(std::clamp<uint64_t>(cache_size / 512, 1024, 1 << 16));
}

void Zero(std::span<std::byte> out) { std::memset(out.data(), 0, out.size()); }

}  // namespace

Qcow2Image::Qcow2Image(Qcow2OpenParts parts)
    : file_(std::move(parts.file)),
      data_file_(std::move(parts.data_file)),
      backing_(std::move(parts.backing)),
      header_(std::move(parts.header)),
      geo_(Geometry::From(header_)),
      size_(header_.size & ~uint64_t{511}),
      writable_(parts.writable),
      preallocate_(parts.preallocate),
      publish_(parts.publish && parts.luks == nullptr && parts.legacy_aes == nullptr),
      stable_metadata_(parts.stable_metadata),
      env_(parts.env),
      l2_cache_(file_.get(), std::min(kL2SliceBytes, geo_.cluster_size), parts.cache_size,
                geo_.cluster_size),
      shared_map_(parts.publish ? SharedMapSlots(parts.cache_size) : 1),
      luks_(std::move(parts.luks)),
      legacy_aes_(std::move(parts.legacy_aes)) {}

Task<Result<std::unique_ptr<Qcow2Image>>> Qcow2Image::Open(Qcow2OpenParts parts) {
  if (parts.header.has_data_file() != (parts.data_file != nullptr)) {
    co_return Status::InvalidArgument(parts.file->path() +
                                      ": data file given without the data file bit");
  }
  auto img = std::make_unique<Qcow2Image>(std::move(parts));
  CO_ASSIGN_OR_RETURN(img->file_size_, img->file_->Size());
  img->grown_end_ = img->file_size_;
  img->zero_from_ = img->file_size_;

  // The active L1 table (size and placement validated by ParseHeader).
  const Header& h = img->header_;
  if (h.l1_size > 0) {
    AlignedBuffer raw(uint64_t{h.l1_size} * 8);
    CO_RETURN_IF_ERROR(co_await img->file_->ReadExact(h.l1_table_offset, raw.span()));
    img->l1_.resize(h.l1_size);
    for (uint32_t i = 0; i < h.l1_size; i++) img->l1_[i] = LoadBE64(raw.span(), i * 8ull);
  }
  if (h.nb_snapshots > 0) {
    CO_ASSIGN_OR_RETURN(img->snapshots_,
                        co_await ReadSnapshotTable(*img->file_, h.snapshots_offset, h.nb_snapshots,
                                                   img->file_size_, h.version));
  }
  // QEMU loads the bitmap directory on every open and refuses the image when
  // it is broken, reading or writing.
  CO_RETURN_IF_ERROR(co_await img->LoadBitmapDirectory());
  if (img->writable_) CO_RETURN_IF_ERROR(co_await img->OpenForWriting());
  co_return std::move(img);
}

Status Qcow2Image::CorruptEntry(uint64_t offset, const L2Entry& entry, const char* why) const {
  return Status::Corruption(
      fmt::format("{}: L2 entry 0x{:016x} (bitmap 0x{:016x}) for guest offset {} {}", path(),
                  entry.raw, entry.bitmap, offset, why));
}

Task<Result<L2Entry>> Qcow2Image::LookupEntry(uint64_t offset) {
  const uint64_t l1_index = geo_.l1_index(offset);
  if (l1_index >= l1_.size()) co_return L2Entry{};
  const uint64_t l2_offset = l1_[l1_index] & kL1OffsetMask;
  if (l2_offset == 0) co_return L2Entry{};
  // Broken metadata of this image: no more changes (MarkCorrupt), as QEMU.
  if (!geo_.cluster_aligned(l2_offset)) {
    co_return co_await MarkCorrupt(fmt::format(
        "L1 entry {} points to an L2 table at 0x{:x}, not cluster-aligned", l1_index, l2_offset));
  }
  if (l2_offset > file_size_ || geo_.cluster_size > file_size_ - l2_offset) {
    co_return co_await MarkCorrupt(
        fmt::format("L1 entry {} points to an L2 table at 0x{:x}, past the end of the file",
                    l1_index, l2_offset));
  }
  const uint64_t byte_in_table = geo_.l2_index(offset) * geo_.l2_entry_bytes;
  const uint64_t slice_bytes = l2_cache_.slice_size();
  const uint64_t slice_offset = l2_offset + (byte_in_table & ~(slice_bytes - 1));
  const uint64_t in_slice = byte_in_table & (slice_bytes - 1);

  MetadataCache::SliceRef slice = l2_cache_.TryGet(slice_offset);
  if (!slice) {
    CO_ASSIGN_OR_RETURN(slice, co_await l2_cache_.Get(slice_offset));
    // One load publishes the whole slice (512 clusters of 4 KiB), so other
    // threads need not wait for a request on each cluster first.
    PublishSlice(slice,
                 (l1_index << geo_.l2_bits) + (byte_in_table - in_slice) / geo_.l2_entry_bytes);
  }
  L2Entry e;
  e.raw = LoadBE64(slice.bytes(), in_slice);
  if (geo_.extended_l2) e.bitmap = LoadBE64(slice.bytes(), in_slice + 8);
  if (const char* why = RefusedEntry(offset, e)) {
    co_return co_await MarkCorrupt(CorruptEntry(offset, e, why));
  }
  co_return e;
}

const char* Qcow2Image::RefusedEntry(uint64_t offset, const L2Entry& e) const {
  if (e.compressed()) return nullptr;
  // Version 2 has no zero clusters: the flag there means the entry was not
  // written by a qcow2 implementation, and reading zeros would hide the
  // backing file's data.
  if (header_.version < 3 && !geo_.extended_l2 && (e.raw & kEntryZero)) {
    return "has the zero flag, which version 2 images do not have";
  }
  // An external data file maps guest offsets 1:1; any other host offset would
  // read and write another guest cluster's data.
  if (data_file_ != nullptr && e.has_host_cluster(true) &&
      e.host_cluster() != offset - geo_.cluster_offset_in(offset)) {
    return "names a host offset in the external data file other than its guest offset";
  }
  return nullptr;
}

Task<Status> Qcow2Image::Read(uint64_t offset, std::span<std::byte> out) {
  if (offset > size() || out.size() > size() - offset) {
    co_return Status::InvalidArgument(
        fmt::format("{}: read of {} bytes at {} is past the virtual size {}", path(), out.size(),
                    offset, size()));
  }
  size_t done = 0;
  while (done < out.size()) {
    uint64_t pos = offset + done;
    size_t n =
        std::min<uint64_t>(out.size() - done, geo_.cluster_size - geo_.cluster_offset_in(pos));
    CO_RETURN_IF_ERROR(co_await ReadInCluster(pos, out.subspan(done, n)));
    done += n;
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::ReadInCluster(uint64_t offset, std::span<std::byte> out) {
  CO_ASSIGN_OR_RETURN(L2Entry entry, co_await LookupEntry(offset));
  if (!writable_) {
    Publish(offset, entry);
    co_return co_await ReadWithEntry(entry, offset, out);
  }
  // On a writable image, hold the cluster so that a discard cannot free (and
  // a later allocation reuse) the host cluster under this read.
  auto guard = co_await cluster_locks_.Lock(geo_.guest_cluster(offset), false);
  CO_ASSIGN_OR_RETURN(entry, co_await LookupEntry(offset));
  Publish(offset, entry);
  co_return co_await ReadWithEntry(entry, offset, out);
}

Task<Status> Qcow2Image::ReadWithEntry(const L2Entry& entry, uint64_t offset,
                                       std::span<std::byte> out) {
  const uint64_t in_cluster = geo_.cluster_offset_in(offset);
  const bool has_data_file = data_file_ != nullptr;

  if (entry.compressed()) {
    if (has_data_file) {
      co_return co_await MarkCorrupt(
          CorruptEntry(offset, entry, "is compressed, which external data files forbid"));
    }
    co_return co_await ReadCompressed(entry, in_cluster, out);
  }

  // Walk runs of subclusters of the same kind (one run without extended L2).
  size_t done = 0;
  while (done < out.size()) {
    uint64_t pos_in_cluster = in_cluster + done;
    uint32_t sc = static_cast<uint32_t>(pos_in_cluster / geo_.subcluster_size);
    SubclusterKind kind = entry.Kind(geo_, has_data_file, sc);
    uint64_t run_end = (sc + 1) * geo_.subcluster_size;
    while (run_end < geo_.cluster_size &&
           entry.Kind(geo_, has_data_file, static_cast<uint32_t>(run_end / geo_.subcluster_size)) ==
               kind) {
      run_end += geo_.subcluster_size;
    }
    size_t n = std::min<uint64_t>(out.size() - done, run_end - pos_in_cluster);
    std::span<std::byte> piece = out.subspan(done, n);
    switch (kind) {
      case SubclusterKind::kUnallocated:
        CO_RETURN_IF_ERROR(co_await ReadUnallocated(offset + done, piece));
        break;
      case SubclusterKind::kZero:
        Zero(piece);
        break;
      case SubclusterKind::kData: {
        File& f = has_data_file ? *data_file_ : *file_;
        // Data past the end of the host file reads as zeros, as QEMU does
        // (e.g. a preallocated cluster whose file was later shortened).
        const uint64_t host = entry.host_cluster() + pos_in_cluster;
        if (encrypted()) {
          CO_RETURN_IF_ERROR(co_await ReadDecrypted(f, host, offset + done, piece));
        } else {
          CO_RETURN_IF_ERROR(co_await f.ReadZeroPadded(host, piece));
        }
        break;
      }
      case SubclusterKind::kCompressed:  // handled above
      case SubclusterKind::kInvalid:
        co_return co_await MarkCorrupt(CorruptEntry(
            offset + done, entry, "is invalid (unaligned offset or contradictory bitmap)"));
    }
    done += n;
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::ReadDecrypted(File& f, uint64_t host, uint64_t guest,
                                       std::span<std::byte> out) {
  const uint64_t start = host & ~(kSectorSize - 1);
  const uint64_t end = (host + out.size() + kSectorSize - 1) & ~(kSectorSize - 1);
  if (start == host && end == host + out.size()) {
    // Past the end of the file QEMU reads zeros and decrypts them: so do we.
    CO_RETURN_IF_ERROR(co_await f.ReadZeroPadded(host, out));
    co_return co_await RunCipher(false, host, guest, out);
  }
  AlignedBuffer bounce(end - start);
  CO_RETURN_IF_ERROR(co_await f.ReadZeroPadded(start, bounce.span()));
  // Host and guest offsets agree within a cluster, so both round alike.
  CO_RETURN_IF_ERROR(co_await RunCipher(false, start, guest - (host - start), bounce.span()));
  std::memcpy(out.data(), bounce.data() + (host - start), out.size());
  co_return Status::Ok();
}

Task<Status> Qcow2Image::RunCipher(bool encrypt, uint64_t host, uint64_t guest,
                                   std::span<std::byte> data) {
  Status st;
  auto run = [&] {
    if (legacy_aes_) {
      st = encrypt ? legacy_aes_->Encrypt(guest / kSectorSize, data)
                   : legacy_aes_->Decrypt(guest / kSectorSize, data);
    } else {
      st = encrypt ? luks_->Encrypt(host, data) : luks_->Decrypt(host, data);
    }
  };
  if (env_ != nullptr && data.size() >= kOffloadMinCipherBytes) {
    co_await env_->RunOffThread(run);
  } else {
    run();
  }
  if (!st.ok()) {
    co_return st.WithContext(fmt::format("{}: {}crypting {} bytes at host offset 0x{:x}", path(),
                                         encrypt ? "en" : "de", data.size(), host));
  }
  co_return Status::Ok();
}

Task<Result<uint64_t>> Qcow2Image::ZeroPrefix(uint64_t offset, uint64_t length) {
  if (offset >= size()) co_return uint64_t{0};
  length = std::min(length, size() - offset);
  const bool has_df = data_file_ != nullptr;
  uint64_t done = 0;
  while (done < length) {
    const uint64_t pos = offset + done;
    const uint64_t l1_index = geo_.l1_index(pos);
    // Ranges handled as one: a whole missing L2 table, else one subcluster.
    uint64_t span, zero = 0;
    if (l1_index >= l1_.size() || (l1_[l1_index] & kL1OffsetMask) == 0) {
      const uint64_t table_span = geo_.cluster_size << geo_.l2_bits;
      span = std::min(length - done, table_span - pos % table_span);
      if (!backing_) {
        zero = span;
      } else {
        CO_ASSIGN_OR_RETURN(zero, co_await BackingZeroPrefix(pos, span));
      }
    } else {
      CO_ASSIGN_OR_RETURN(L2Entry e, co_await LookupEntry(pos));
      const uint64_t in_cluster = geo_.cluster_offset_in(pos);
      const uint32_t sc = static_cast<uint32_t>(in_cluster / geo_.subcluster_size);
      span = std::min(length - done, geo_.subcluster_size - in_cluster % geo_.subcluster_size);
      switch (e.Kind(geo_, has_df, sc)) {
        case SubclusterKind::kZero:
          zero = span;
          break;
        case SubclusterKind::kUnallocated:
          if (!backing_) {
            zero = span;
          } else {
            CO_ASSIGN_OR_RETURN(zero, co_await BackingZeroPrefix(pos, span));
          }
          break;
        default:
          zero = 0;
      }
    }
    done += zero;
    if (zero < span) break;
  }
  co_return done;
}

Task<Result<uint64_t>> Qcow2Image::BackingZeroPrefix(uint64_t offset, uint64_t length) {
  const uint64_t backing_size = backing_->size();
  if (offset >= backing_size) co_return length;  // past a short backing file
  const uint64_t inside = std::min(length, backing_size - offset);
  CO_ASSIGN_OR_RETURN(uint64_t zero, co_await backing_->ZeroPrefix(offset, inside));
  co_return zero < inside ? zero : length;
}

Task<Status> Qcow2Image::ReadUnallocated(uint64_t offset, std::span<std::byte> out) {
  if (!backing_) {
    Zero(out);
    co_return Status::Ok();
  }
  // A backing file shorter than this image reads zeros past its end.
  const uint64_t backing_size = backing_->size();
  size_t from_backing =
      offset >= backing_size ? 0 : std::min<uint64_t>(out.size(), backing_size - offset);
  if (from_backing > 0)
    CO_RETURN_IF_ERROR(co_await backing_->Read(offset, out.first(from_backing)));
  Zero(out.subspan(from_backing));
  co_return Status::Ok();
}

Task<Status> Qcow2Image::ReadCompressed(const L2Entry& entry, uint64_t offset_in_cluster,
                                        std::span<std::byte> out) {
  const uint64_t host = entry.compressed_offset(geo_);
  const uint64_t length = entry.compressed_length(geo_);
  if (host >= file_size_) {
    co_return Status::Corruption(
        fmt::format("{}: compressed cluster at host offset 0x{:x} ({} bytes) lies past the end of "
                    "the file ({} bytes)",
                    path(), host, length, file_size_));
  }
  std::shared_ptr<const AlignedBuffer> data;
  if (decompressed_key_ == entry.raw) {
    data = decompressed_;
  } else if (auto it = decompressing_.find(entry.raw); it != decompressing_.end()) {
    std::shared_ptr<Decompression> d = it->second;
    co_await d->done.Wait();
    if (!d->status.ok()) co_return d->status;
    data = d->data;
  } else {
    auto d = std::make_shared<Decompression>();
    decompressing_.emplace(entry.raw, d);
    // The descriptor's length rounds up to whole sectors; the tail may lie past
    // the end of the file, where QEMU reads zeros.
    AlignedBuffer compressed(length);
    Status st = co_await file_->ReadZeroPadded(host, compressed.span());
    auto out_buf = std::make_shared<AlignedBuffer>(geo_.cluster_size);
    if (st.ok()) {
      auto inflate = [&] {
        st = Decompress(static_cast<CompressionType>(header_.compression_type), compressed.span(),
                        out_buf->span());
      };
      // Large clusters inflate on a worker (Env::RunOffThread), so other
      // requests go on meanwhile; small ones cost less than the hand-off.
      if (env_ != nullptr && geo_.cluster_size >= kOffloadMinClusterSize) {
        co_await env_->RunOffThread(inflate);
      } else {
        inflate();
      }
      if (!st.ok()) {
        st = st.WithContext(
            fmt::format("{}: compressed cluster at host offset 0x{:x}", path(), host));
      }
    }
    decompressing_.erase(entry.raw);
    d->status = st;
    if (st.ok()) {
      d->data = out_buf;
      decompressed_ = out_buf;
      decompressed_key_ = entry.raw;
    }
    d->done.NotifyAll();
    CO_RETURN_IF_ERROR(st);
    data = std::move(out_buf);
  }
  std::memcpy(out.data(), data->data() + offset_in_cluster, out.size());
  co_return Status::Ok();
}

// --- requests from other threads ---

void Qcow2Image::PublishSlice(const MetadataCache::SliceRef& slice, uint64_t first_cluster) {
  // Only clusters nobody holds or waits for: their cached entry is current,
  // and whoever remaps them later takes the exclusive lock, which revokes.
  // (A cluster being remapped right now is locked, and skipped.)
  if (!publish_) return;
  const bool check_locks = writable_ && cluster_locks_.busy_keys() > 0;
  const std::span<const std::byte> bytes = slice.bytes();
  const uint64_t entries = bytes.size() / geo_.l2_entry_bytes;
  SharedMap::Batch batch(&shared_map_);
  for (uint64_t i = 0; i < entries; i++) {
    const uint64_t cluster = first_cluster + i;
    if (check_locks && cluster_locks_.busy(cluster)) continue;
    L2Entry e;
    e.raw = LoadBE64(bytes, i * geo_.l2_entry_bytes);
    if (geo_.extended_l2) e.bitmap = LoadBE64(bytes, i * geo_.l2_entry_bytes + 8);
    uint64_t host;
    bool writable;
    if (Publishable(cluster, e, &host, &writable)) batch.Publish(cluster, host, writable);
  }
}

void Qcow2Image::Publish(uint64_t offset, const L2Entry& e) {
  uint64_t host;
  bool writable;
  const uint64_t cluster = geo_.guest_cluster(offset);
  if (Publishable(cluster, e, &host, &writable)) shared_map_.Publish(cluster, host, writable);
}

bool Qcow2Image::Publishable(uint64_t cluster, const L2Entry& e, uint64_t* host,
                             bool* writable) const {
  const bool has_df = data_file_ != nullptr;
  if (!publish_ || e.compressed() || !e.has_host_cluster(has_df)) return false;
  if (geo_.extended_l2) {
    // Every subcluster allocated, none zero (kData for all 32, as Kind says).
    if (e.bitmap != kAllSubclusters || !geo_.cluster_aligned(e.host_cluster())) return false;
  } else if (e.Kind(geo_, has_df, 0) != SubclusterKind::kData) {
    return false;
  }
  *host = e.host_cluster();
  // Writable as the engine's own in-place write would find it: owned by this
  // image alone, and (in the image file) not one of its metadata clusters.
  *writable = writable_ && !closed_ && e.copied();
  if (*writable && !has_df) *writable = !IsMetadataCluster(*host / geo_.cluster_size);
  if (*writable && !(unstable_clusters_.empty() && writing_clusters_.empty())) {
    *writable = EntryInFile(cluster);
  }
  return true;
}

Task<KeyedLock::Guard> Qcow2Image::LockToRemap(uint64_t cluster) {
  KeyedLock::Guard guard = co_await cluster_locks_.Lock(cluster, true);
  co_await RevokeForRemap(cluster);
  co_return guard;
}

Task<void> Qcow2Image::RevokeForRemap(uint64_t cluster) {
  if (shared_map_.Revoke(cluster)) co_await WaitUnpinned();
}

Task<void> Qcow2Image::RevokeShared(SharedMap::After after) {
  if (shared_map_.RevokeAll(after)) co_await WaitUnpinned();
}

Task<void> Qcow2Image::WaitUnpinned() {
  // The pins belong to I/O on other threads' rings, which completes without
  // this thread; blocking a worker rather than this thread keeps this
  // thread's own requests going meanwhile.
  if (env_ == nullptr) {
    shared_map_.WaitUnpinned();
    co_return;
  }
  co_await env_->RunOffThread([this] { shared_map_.WaitUnpinned(); });
}

std::optional<Task<Status>> Qcow2Image::TryAnyThread(bool write, uint64_t offset,
                                                     std::span<std::byte> buffer) {
  std::optional<HostMapping> mapping = TryMapAnyThread(write, offset, buffer.size());
  if (!mapping) return std::nullopt;
  return ServeMapped(write, buffer, std::move(*mapping));
}

std::optional<HostMapping> Qcow2Image::TryMapAnyThread(bool write, uint64_t offset,
                                                       uint64_t length) {
  const uint64_t size = this->size();
  if (length == 0 || offset > size || length > size - offset) return std::nullopt;
  const uint64_t first = geo_.guest_cluster(offset);
  const uint64_t count = geo_.guest_cluster(offset + length - 1) - first + 1;
  if (count > SharedMap::kMaxPinned) return std::nullopt;
  std::array<uint64_t, SharedMap::kMaxPinned> hosts;
  HostMapping mapping;
  if (!shared_map_.Acquire(first, count, write, hosts.data(), &mapping.pin)) return std::nullopt;
  // Tracked bitmaps: the engine marks them in use on disk before the first
  // write; after that a write here only sets bits, atomically. The list is
  // read only under a pin: a change of it (ChangeBitmapsLive) revokes every
  // mapping and waits for the pins first.
  if (write && !tracking_.empty() && !bitmaps_marked_in_use_.load(std::memory_order_acquire)) {
    return std::nullopt;
  }
  if (write) {
    for (const auto& b : tracking_) b->Set(offset, length);
  }
  // Clusters that lie back to back in the host file make one extent.
  const uint64_t cs = geo_.cluster_size;
  mapping.file = &data_file();
  uint64_t done = 0;
  for (size_t i = 0; done < length;) {
    const uint64_t in_cluster = i == 0 ? geo_.cluster_offset_in(offset) : 0;
    uint64_t n = std::min<uint64_t>(length - done, cs - in_cluster);
    size_t next = i + 1;
    while (done + n < length && hosts[next] == hosts[next - 1] + cs) {
      n += std::min<uint64_t>(length - done - n, cs);
      ++next;
    }
    mapping.extents[mapping.count++] = {hosts[i] + in_cluster, done, n};
    done += n;
    i = next;
  }
  return mapping;
}

Task<Status> Qcow2Image::ServeMapped(bool write, std::span<std::byte> buffer, HostMapping mapping) {
  File& f = *mapping.file;
  auto run_io = [&f, write](uint64_t host, std::span<std::byte> piece) -> Task<Status> {
    // Data past the end of the host file reads as zeros (see ReadWithEntry).
    if (!write) co_return co_await f.ReadZeroPadded(host, piece);
    co_return co_await f.Write(host, piece);
  };
  if (mapping.count == 1) {
    co_return co_await run_io(mapping.extents[0].host_offset, buffer);
  }
  std::vector<Task<Status>> runs;
  for (const HostMapping::Extent& e : mapping.runs()) {
    runs.push_back(run_io(e.host_offset, buffer.subspan(e.data_offset, e.length)));
  }
  co_return co_await WhenAll(std::move(runs));
}

}  // namespace uq::qcow2
