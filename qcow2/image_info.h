// ImageInfo: what `ublk-qcow2 info` reports about one image, field for field
// the data `qemu-img info` shows (the CLI formats it as text or JSON).
#ifndef UBLK_QCOW2_QCOW2_IMAGE_INFO_H_
#define UBLK_QCOW2_QCOW2_IMAGE_INFO_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/crypto/luks_volume.h"
#include "qcow2/file.h"

namespace uq::qcow2 {

struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t vm_state_size = 0;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  // -1 when the image recorded no icount (v2 images, old entries).
  int64_t icount = -1;
  uint64_t disk_size = 0;
};

// A persistent dirty bitmap as qemu-img info lists it.
struct BitmapInfo {
  std::string name;
  uint64_t granularity = 0;
  bool in_use = false;   // left in use by a writer that stopped: contents unusable
  bool enabled = false;  // the "auto" flag: tracks guest writes
};

// One LUKS key slot as qemu-img info lists it (iters and stripes only for
// active slots).
struct LuksSlotInfo {
  bool active = false;
  uint32_t iters = 0;
  uint64_t key_offset = 0;  // bytes from the start of the LUKS area
  uint32_t stripes = 0;
};

// The "encrypt" block of a LUKS-encrypted qcow2 image: read from the LUKS
// header, no key needed.
struct EncryptInfo {
  std::string format = "luks";
  std::string cipher_alg;      // "aes-256"
  std::string cipher_mode;     // "xts"
  std::string ivgen_alg;       // "plain64"
  std::string ivgen_hash_alg;  // essiv only, else ""
  std::string hash_alg;        // "sha256"
  std::string uuid;
  uint64_t payload_offset = 0;  // bytes
  uint32_t master_key_iters = 0;
  std::vector<LuksSlotInfo> slots;
};

struct Qcow2SpecificInfo {
  std::string compat;            // "0.10" (v2) or "1.1" (v3)
  std::string compression_type;  // "zlib" or "zstd"
  bool lazy_refcounts = false;
  int refcount_bits = 16;
  bool corrupt = false;
  bool extended_l2 = false;
  std::optional<std::string> data_file;
  bool data_file_raw = false;
  // The bitmap directory, in directory order; empty when the image has none
  // (or its bitmaps extension is not in force: see bitmap_directory.h).
  std::vector<BitmapInfo> bitmaps;
  std::optional<EncryptInfo> encrypt;  // LUKS-encrypted images
};

struct ImageInfo {
  std::string filename;
  std::string format;  // "qcow2" or "raw"
  uint64_t virtual_size = 0;
  uint64_t actual_size = 0;  // bytes the host file occupies (st_blocks * 512)
  std::optional<uint64_t> cluster_size;
  std::optional<std::string> backing_filename;       // as stored in the image
  std::optional<std::string> full_backing_filename;  // resolved path
  std::optional<std::string> backing_format;         // from the extension
  bool dirty_flag = false;
  bool encrypted = false;
  std::optional<Qcow2SpecificInfo> qcow2;
  std::vector<SnapshotInfo> snapshots;
};

struct ImageInfoOptions {
  // Describe every image of the backing chain, top first.
  bool backing_chain = false;
  // Take a reader's QEMU-compatible lock (image_lock.h) on each file while it
  // is read, as qemu-img info does: an image some process has open for
  // writing is refused (Busy), since its metadata may be half updated.
  // false: qemu-img info -U (--force-share).
  bool lock = true;
};

// Describes the image at `path` without opening its backing chain, or with
// options.backing_chain one entry per image of the chain, top first.
// Errors name the file: Busy (locked by a writer), Corruption (header,
// snapshot table, bitmap directory), NotSupported, IoError.
// The encrypt block for a LUKS area.
EncryptInfo ToEncryptInfo(const crypto::LuksDescription& description);

Task<Result<std::vector<ImageInfo>>> GetImageInfo(Env* env, std::string path,
                                                  ImageInfoOptions options);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_IMAGE_INFO_H_
