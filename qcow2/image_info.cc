#include "qcow2/image_info.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <set>

#include "qcow2/bitmap_directory.h"
#include "qcow2/crypto/luks_volume.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/image_lock.h"
#include "qcow2/open_image.h"
#include "qcow2/paths.h"
#include "qcow2/snapshot_table.h"

namespace uq::qcow2 {
namespace {

uint64_t AllocatedBytes(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

Task<Result<ImageInfo>> DescribeOne(Env* env, const std::string& path, std::string format,
                                    bool lock) {
  CO_ASSIGN_OR_RETURN(std::unique_ptr<File> file, env->Open(path, OpenOptions{}));
  // Held until `file` closes; in-memory files (fd -1) have no locks.
  if (lock && file->fd() >= 0) CO_RETURN_IF_ERROR(LockImage(file->fd(), path, /*writable=*/false));
  ImageInfo info;
  info.filename = path;
  info.actual_size = AllocatedBytes(path);
  if (format.empty()) {
    CO_ASSIGN_OR_RETURN(bool qcow2, co_await IsQcow2(*file));
    format = qcow2 ? "qcow2" : "raw";
  }
  info.format = format;
  if (format == "raw") {
    CO_ASSIGN_OR_RETURN(uint64_t bytes, file->Size());
    info.virtual_size = (bytes + 511) / 512 * 512;  // QEMU counts whole sectors
    co_return info;
  }
  if (format != "qcow2") {
    co_return Status::NotSupported(fmt::format("{}: format '{}' is not supported", path, format));
  }
  CO_ASSIGN_OR_RETURN(Header h, co_await ReadHeader(*file));
  CO_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  info.virtual_size = h.size & ~uint64_t{511};  // QEMU serves whole sectors
  info.cluster_size = h.cluster_size();
  info.dirty_flag = h.dirty();
  if (!h.backing_file.empty()) {
    info.backing_filename = h.backing_file;
    info.full_backing_filename = ResolveRelativeTo(path, h.backing_file);
    info.backing_format = h.backing_format;
  }
  Qcow2SpecificInfo q;
  q.compat = h.version == 2 ? "0.10" : "1.1";
  q.compression_type = h.compression_type == kCompressionZstd ? "zstd" : "zlib";
  q.lazy_refcounts = h.lazy_refcounts();
  q.refcount_bits = static_cast<int>(h.refcount_bits());
  q.corrupt = h.corrupt();
  q.extended_l2 = h.extended_l2();
  if (h.has_data_file()) {
    q.data_file = h.data_file.value_or("");
    q.data_file_raw = h.data_file_raw();
  }
  if (h.crypt_method == kCryptLuks) {
    // As qemu-img info: the header is parsed (a broken one fails), no key.
    CO_ASSIGN_OR_RETURN(crypto::LuksDescription d,
                        co_await crypto::ReadLuksArea(*file, h.crypto->offset, h.crypto->length,
                                                      /*names_only=*/true));
    info.encrypted = true;
    q.encrypt = ToEncryptInfo(d);
  }
  if (h.crypt_method == kCryptAes) {  // qemu-img info: "encrypt": {"format": "aes"}
    info.encrypted = true;
    q.encrypt = EncryptInfo{.format = "aes"};
  }
  info.qcow2 = q;
  if (h.nb_snapshots > 0) {
    CO_ASSIGN_OR_RETURN(std::vector<Snapshot> snapshots,
                        co_await ReadSnapshotTable(*file, h.snapshots_offset, h.nb_snapshots,
                                                   file_size, h.version));
    for (const Snapshot& s : snapshots) info.snapshots.push_back(ToSnapshotInfo(s, h.size));
  }
  // Read after the snapshot table, in QEMU's order, so that an image broken
  // in both places fails on the same one as with qemu-img.
  CO_ASSIGN_OR_RETURN(std::vector<BitmapDirEntry> bitmaps, co_await ReadBitmapDirectory(*file, h));
  CO_RETURN_IF_ERROR(
      (co_await ReadConsistentBitmapTables(*file, bitmaps, uint64_t{1} << h.cluster_bits))
          .status());
  for (const BitmapDirEntry& b : bitmaps) {
    info.qcow2->bitmaps.push_back(BitmapInfo{b.name, b.granularity(), b.in_use(), b.enabled()});
  }
  co_return info;
}

}  // namespace

EncryptInfo ToEncryptInfo(const crypto::LuksDescription& d) {
  EncryptInfo e;
  e.cipher_alg = d.algorithms.cipher_alg;
  e.cipher_mode = d.algorithms.cipher_mode;
  e.ivgen_alg = d.algorithms.ivgen_alg;
  e.ivgen_hash_alg = d.algorithms.ivgen_hash_alg;
  e.hash_alg = d.algorithms.hash_alg;
  e.uuid = d.header.uuid;
  e.payload_offset = uint64_t{d.header.payload_offset} * crypto::kLuksSectorSize;
  e.master_key_iters = d.header.mk_digest_iterations;
  for (const crypto::LuksKeySlot& s : d.header.slots) {
    e.slots.push_back(LuksSlotInfo{s.active, s.iterations,
                                   uint64_t{s.key_offset} * crypto::kLuksSectorSize, s.stripes});
  }
  return e;
}

Task<Result<std::vector<ImageInfo>>> GetImageInfo(Env* env, std::string path,
                                                  ImageInfoOptions options) {
  std::vector<ImageInfo> out;
  std::set<std::string> seen;
  std::string format;
  while (true) {
    if (!seen.insert(FileIdentity(path)).second) {
      co_return Status::Corruption(
          fmt::format("{}: backing chain loop: this image is its own backing file", path));
    }
    CO_ASSIGN_OR_RETURN(ImageInfo info, co_await DescribeOne(env, path, format, options.lock));
    std::optional<std::string> next = info.full_backing_filename;
    format = info.backing_format.value_or("");
    out.push_back(std::move(info));
    if (!options.backing_chain || !next) break;
    path = *next;
  }
  co_return out;
}

}  // namespace uq::qcow2
