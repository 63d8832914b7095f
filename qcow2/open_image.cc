#include "qcow2/open_image.h"

#include <fmt/format.h>

#include <chrono>
#include <set>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/check/check.h"
#include "qcow2/crypto/legacy_aes.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/image_lock.h"
#include "qcow2/paths.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/raw_image.h"

namespace uq::qcow2 {
namespace {

struct ChainState {
  std::set<std::string> seen;  // FileIdentity of every image opened so far
  int depth = 0;
};

Task<Result<std::unique_ptr<BlockDevice>>> OpenChainElement(std::string path, std::string format,
                                                            const ImageOptions& options,
                                                            ChainState& chain);

// Opens the external data file an image names, where QEMU opens it
// (DataFilePath: a relative name is relative to the working directory).
Result<std::unique_ptr<File>> OpenDataFile(const std::string& image_path, const Header& header,
                                           const ImageOptions& options) {
  if (!header.data_file || header.data_file->empty()) {
    return Status::InvalidArgument(
        fmt::format("{}: image uses an external data file but does not name it", image_path));
  }
  const std::string& name = *header.data_file;
  if (IsProtocolName(name)) {
    return Status::NotSupported(
        fmt::format("{}: data file '{}' is not a plain file", image_path, name));
  }
  const std::string chosen = DataFilePath(name, options.working_dir);
  OpenOptions open;
  open.writable = options.writable;
  open.direct = options.direct;
  Result<std::unique_ptr<File>> file = options.env->Open(chosen, open);
  if (!file.ok())
    return file.status().WithContext(fmt::format("{}: cannot open its data file", image_path));
  return file;
}

Task<Result<std::unique_ptr<BlockDevice>>> OpenBacking(const std::string& path,
                                                       const Header& header,
                                                       const ImageOptions& options,
                                                       ChainState& chain) {
  const std::string& name = header.backing_file;
  if (IsProtocolName(name)) {
    co_return Status::NotSupported(fmt::format(
        "{}: backing file '{}' is a protocol or JSON name, which is not supported", path, name));
  }
  std::string format = header.backing_format.value_or("");
  if (!format.empty() && format != "qcow2" && format != "raw") {
    co_return Status::NotSupported(fmt::format(
        "{}: backing file '{}' has format '{}' (qcow2 and raw are supported)", path, name, format));
  }
  if (chain.depth + 1 > options.max_chain_depth) {
    co_return Status::NotSupported(
        fmt::format("{}: backing chain is deeper than {} images", path, options.max_chain_depth));
  }
  ImageOptions backing_options = options;
  backing_options.writable = false;  // backing files are never written
  chain.depth++;
  auto backing =
      co_await OpenChainElement(ResolveRelativeTo(path, name), format, backing_options, chain);
  chain.depth--;
  if (!backing.ok()) co_return backing.status().WithContext(fmt::format("{}: backing file", path));
  co_return backing;
}

// ": " and the caller's hint on how to give a passphrase, or nothing.
std::string KeyHint(const ImageOptions& options) {
  return options.key_hint.empty() ? std::string() : fmt::format(": {}", options.key_hint);
}

// Opens the LUKS area of an encrypted image with the passphrase the options
// carry (QEMU asks for encrypt.key-secret the same way).
Task<Result<std::unique_ptr<crypto::LuksVolume>>> UnlockLuks(File& file, const Header& header,
                                                             const std::string& path,
                                                             const ImageOptions& options) {
  if (!options.key) {
    co_return Status::InvalidArgument(fmt::format(
        "{}: the image is encrypted (LUKS): its passphrase is needed{}", path, KeyHint(options)));
  }
  co_return co_await crypto::LuksVolume::Unlock(file, header.crypto->offset, header.crypto->length,
                                                options.key->span());
}

// The cipher of a legacy AES image (crypto/legacy_aes.h), which is only ever
// read: QEMU's system emulators refuse these images altogether and only
// qemu-img still writes them; we serve them read-only to get the data out.
Result<std::unique_ptr<crypto::SectorCipher>> LegacyAes(const std::string& path,
                                                        const ImageOptions& options) {
  if (options.writable) {
    return Status::NotSupported(fmt::format(
        "{}: Use of AES-CBC encrypted qcow2 images is no longer supported for writing (open it "
        "read-only, or convert it to an unencrypted or LUKS image)",
        path));
  }
  if (!options.key) {
    return Status::InvalidArgument(fmt::format(
        "{}: the image is encrypted (AES): its passphrase is needed{}", path, KeyHint(options)));
  }
  ASSIGN_OR_RETURN(crypto::SectorCipher cipher, crypto::LegacyAesCipher(options.key->span()));
  return std::make_unique<crypto::SectorCipher>(std::move(cipher));
}

// Points `header` at the L1 table of the snapshot options.snapshot names
// (see ImageOptions::snapshot).
Task<Status> UseSnapshotL1(File& file, Header& header, const std::string& path,
                           const ImageOptions& options) {
  if (options.writable) {
    co_return Status::InvalidArgument(
        fmt::format("{}: a snapshot can only be opened read-only", path));
  }
  CO_ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  CO_ASSIGN_OR_RETURN(std::vector<Snapshot> snapshots,
                      co_await ReadSnapshotTable(file, header.snapshots_offset, header.nb_snapshots,
                                                 file_size, header.version));
  std::optional<size_t> index;
  for (const SnapshotRef& ref : options.snapshot) {
    index = FindSnapshot(snapshots, ref);
    if (index) break;
  }
  if (!index) {
    co_return Status::InvalidArgument(
        fmt::format("{}: Failed to load snapshot: Can't find snapshot", path));
  }
  const Snapshot& s = snapshots[*index];
  CO_RETURN_IF_ERROR(
      ValidateSnapshotL1Table(s, *index, header.cluster_size(), file_size).WithContext(path));
  header.l1_table_offset = s.l1_table_offset;
  header.l1_size = s.l1_size;
  co_return Status::Ok();
}

Task<Result<std::unique_ptr<BlockDevice>>> OpenChainElement(std::string path, std::string format,
                                                            const ImageOptions& options,
                                                            ChainState& chain) {
  if (!chain.seen.insert(FileIdentity(path)).second) {
    co_return Status::Corruption(
        fmt::format("{}: backing chain loop: this image is its own backing file", path));
  }
  const bool top = chain.seen.size() == 1;  // (backing files add themselves below)
  OpenOptions open;
  open.writable = options.writable;
  open.direct = options.direct;
  CO_ASSIGN_OR_RETURN(std::unique_ptr<File> file, options.env->Open(path, open));
  if (file->fd() >= 0 && options.lock)
    CO_RETURN_IF_ERROR(LockImage(file->fd(), path, options.writable));

  if (format.empty()) {
    CO_ASSIGN_OR_RETURN(bool qcow2, co_await IsQcow2(*file));
    format = qcow2 ? "qcow2" : "raw";
  }
  const bool snapshot = top && !options.snapshot.empty();
  if (format == "raw") {
    if (snapshot) {
      co_return Status::NotSupported(
          fmt::format("{}: Failed to load snapshot: a raw image has no internal snapshots", path));
    }
    CO_ASSIGN_OR_RETURN(std::unique_ptr<RawImage> raw,
                        RawImage::Open(std::move(file), options.writable));
    co_return std::unique_ptr<BlockDevice>(std::move(raw));
  }
  if (format != "qcow2") {
    co_return Status::NotSupported(fmt::format("{}: format '{}' is not supported", path, format));
  }

  CO_ASSIGN_OR_RETURN(Header header, co_await ReadHeader(*file));
  CO_RETURN_IF_ERROR(CheckHeaderForIo(header, path));
  if (header.dirty() && options.writable && !header.corrupt()) {
    // Lazy refcounts left counts stale (the writer died): rebuild them from
    // the tables before anything allocates, as QEMU does on open.
    CO_ASSIGN_OR_RETURN(CheckResult repaired,
                        co_await CheckImage(*file, CheckOptions{.repair = RepairMode::kAll}));
    CO_ASSIGN_OR_RETURN(header, co_await ReadHeader(*file));
    if (!repaired.error.empty() || repaired.corruptions > 0 || header.dirty()) {
      co_return Status::Corruption(fmt::format(
          "{}: the image is dirty and its refcounts could not be rebuilt ({} corruptions "
          "remain{}{})",
          path, repaired.corruptions, repaired.error.empty() ? "" : ": ", repaired.error));
    }
  }
  if (top && options.repair_leaks && options.writable && !header.corrupt()) {
    const auto start = std::chrono::steady_clock::now();
    CO_ASSIGN_OR_RETURN(CheckResult repaired,
                        co_await CheckImage(*file, CheckOptions{.repair = RepairMode::kLeaks}));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (options.on_leak_repair) options.on_leak_repair(repaired, seconds);
    // The repair may have cleared header bits.
    CO_ASSIGN_OR_RETURN(header, co_await ReadHeader(*file));
    CO_RETURN_IF_ERROR(CheckHeaderForIo(header, path));
  }
  if (snapshot) CO_RETURN_IF_ERROR(co_await UseSnapshotL1(*file, header, path, options));
  Qcow2OpenParts parts;
  if (header.crypt_method == kCryptLuks) {
    CO_ASSIGN_OR_RETURN(parts.luks, co_await UnlockLuks(*file, header, path, options));
  }
  if (header.crypt_method == kCryptAes) {
    CO_ASSIGN_OR_RETURN(parts.legacy_aes, LegacyAes(path, options));
  }
  parts.writable = options.writable;
  if (header.corrupt() && parts.writable) {
    // The spec forbids writing a corrupt image; serve it read-only.
    parts.writable = false;
  }
  if (header.has_data_file()) {
    ImageOptions data_options = options;
    data_options.writable = parts.writable;
    CO_ASSIGN_OR_RETURN(parts.data_file, OpenDataFile(path, header, data_options));
  }
  if (!header.backing_file.empty() && !options.no_backing) {
    CO_ASSIGN_OR_RETURN(parts.backing, co_await OpenBacking(path, header, options, chain));
  }
  parts.file = std::move(file);
  parts.header = std::move(header);
  parts.cache_size = options.cache_size;
  parts.preallocate = options.preallocate;
  parts.env = options.env;
  parts.publish = top;  // backing files are read by the engine only
  parts.stable_metadata = top && options.stable_metadata;
  CO_ASSIGN_OR_RETURN(std::unique_ptr<Qcow2Image> image,
                      co_await Qcow2Image::Open(std::move(parts)));
  co_return std::unique_ptr<BlockDevice>(std::move(image));
}

}  // namespace

Task<Result<bool>> IsQcow2(File& file) {
  AlignedBuffer magic(4);
  CO_ASSIGN_OR_RETURN(size_t n, co_await file.Read(0, magic.span()));
  co_return n == 4 && LoadBE32(magic.span(), 0) == kMagic;
}

Task<Status> OpenDependencies(File& file, const std::string& path, const ImageOptions& options) {
  if (options.env == nullptr) co_return Status::InvalidArgument("OpenDependencies: no Env given");
  Result<Header> header = co_await ReadHeader(file);
  if (!header.ok()) co_return Status::Ok();
  if (header->has_data_file()) {
    ImageOptions data_options = options;
    data_options.writable = false;  // only opened to see that it can be
    CO_RETURN_IF_ERROR(OpenDataFile(path, *header, data_options).status());
  }
  // QEMU's open refuses a directory that breaks its own rules (bitmap_list_load), so
  // qemu-img check fails before any report (exit 1, no JSON). What only the spec forbids (an
  // empty or repeated name, a table past the end of the file) QEMU opens, and the check
  // reports it.
  CO_RETURN_IF_ERROR(
      (co_await ReadBitmapDirectory(file, *header, BitmapDirectoryRules::kQemu)).status());
  // QEMU's open loads every consistent bitmap; a bad table entry fails it.
  Result<std::vector<BitmapDirEntry>> bitmaps = co_await ReadBitmapDirectory(file, *header);
  if (bitmaps.ok()) {
    CO_RETURN_IF_ERROR(
        (co_await ReadConsistentBitmapTables(file, *bitmaps, uint64_t{1} << header->cluster_bits))
            .status());
  }
  if (!header->backing_file.empty() && !options.no_backing) {
    ChainState chain;
    chain.seen.insert(FileIdentity(path));
    CO_RETURN_IF_ERROR((co_await OpenBacking(path, *header, options, chain)).status());
  }
  co_return Status::Ok();
}

Task<Result<std::unique_ptr<BlockDevice>>> OpenImage(std::string path, ImageOptions options) {
  if (options.env == nullptr) co_return Status::InvalidArgument("OpenImage: no Env given");
  ChainState chain;
  co_return co_await OpenChainElement(std::move(path), options.format, options, chain);
}

}  // namespace uq::qcow2
