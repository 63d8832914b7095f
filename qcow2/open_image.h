// Opening images: the one entry point that turns a path into a BlockDevice,
// probing the format, validating a qcow2 header before trusting any of it,
// and opening the backing chain (any depth, qcow2 or raw, loops refused).
#ifndef UBLK_QCOW2_QCOW2_OPEN_IMAGE_H_
#define UBLK_QCOW2_QCOW2_OPEN_IMAGE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/block_device.h"
#include "qcow2/check/check.h"
#include "qcow2/crypto/secret.h"
#include "qcow2/file.h"
#include "qcow2/snapshot_table.h"

namespace uq::qcow2 {

struct ImageOptions {
  // Where files come from (SyncEnv(), a UringEnv, a test Env). Required.
  Env* env = nullptr;
  // "qcow2", "raw", or "" to probe by the qcow2 magic.
  std::string format;
  bool writable = false;
  // Open with O_DIRECT (the device path).
  bool direct = false;
  // Bytes of metadata cache (L2 slices, refcount blocks) per image in the
  // chain. The only memory that grows with use.
  uint64_t cache_size = 32ull << 20;
  // Grow the image file this many bytes ahead of the clusters allocated in
  // it (fallocate, like QEMU's preallocate filter), so that allocating
  // writes land in space the file system has already reserved instead of
  // extending the file one cluster at a time; a clean Close() cuts the file
  // back. 0: off. A crash leaves the grown tail, which holds nothing and
  // counts for nothing (not a leak). Writable qcow2 images only.
  uint64_t preallocate = 0;
  // Acknowledge writes that change metadata only once that metadata is in
  // the file (Qcow2OpenParts::stable_metadata; ublk user recovery). Writable
  // qcow2 images only; the top of the chain.
  bool stable_metadata = false;
  // Free leaked clusters before anything else (`recover`: a daemon that died
  // leaves the unused part of its cluster reserve, and clusters whose refcount
  // drop it had not written, as leaks): a writable qcow2 top image that is
  // not corrupt gets `check -r leaks` (CheckImage, RepairMode::kLeaks; crash
  // safe, qcow2/leak_repair_crash_test.cc) right after its header is read.
  // A repair that finds corruption or stops early does not fail the open:
  // what it found goes to on_leak_repair, with the time it took.
  bool repair_leaks = false;
  std::function<void(const CheckResult&, double seconds)> on_leak_repair;
  // Do not open backing files (info on a broken chain, for instance).
  bool no_backing = false;
  // Take QEMU-compatible image locks (see image_lock.h) on every file of the
  // chain: a writer is refused while QEMU has the image open, and keeps QEMU
  // from writing it.
  bool lock = true;
  // Stands in for the working directory when a relative external data file
  // name is resolved (DataFilePath); empty: this process's own.
  std::string working_dir;
  // Read the image as it was at an internal snapshot, as qemu-img's -l does
  // (QEMU's bdrv_snapshot_load_tmp): the snapshot's L1 table stands in for
  // the active one; the virtual size stays the current one. The first ref
  // that matches a snapshot wins (qemu-img's plain `-l X` tries X as an id,
  // then as a name). Read-only opens of a qcow2 image only; applies to the
  // top image, not its backing files. Errors: "Failed to load snapshot: Can't
  // find snapshot" (InvalidArgument), a snapshot L1 table outside the file
  // (Corruption).
  std::vector<SnapshotRef> snapshot;
  // The passphrase of LUKS-encrypted images (qcow2 crypt_method 2), tried on
  // every encrypted image of the chain; null: none given, and opening an
  // encrypted image fails ("its passphrase is needed", then ": " and
  // key_hint if set). Never logged.
  std::shared_ptr<const crypto::SecretBytes> key;
  // How the caller's user gives a passphrase (the command line's flags, say),
  // for that error: the engine knows no front end.
  std::string_view key_hint;
  // Deepest backing chain accepted (a guard on top of loop detection).
  int max_chain_depth = 64;
};

// Opens `path`. Errors are one line naming the file and the problem:
// NotSupported for unknown incompatible features, encryption and the like;
// Corruption for headers and tables that contradict the spec or the file.
Task<Result<std::unique_ptr<BlockDevice>>> OpenImage(std::string path, ImageOptions options);

// Opens, as OpenImage(path, options) would, the files the qcow2 image in
// `file` (opened from `path`) depends on: its external data file and its
// whole backing chain; and checks the tables of its consistent bitmaps
// (ReadConsistentBitmapTables); then closes them. qemu-img check opens the image
// this way before checking it, and fails (exit 1) when one of them cannot
// be opened; `ublk-qcow2 check` uses this to do the same.
// Errors: those of OpenImage for the data file and the backing chain; a
// bitmap directory that breaks QEMU's rules (ReadBitmapDirectory with
// BitmapDirectoryRules::kQemu; QEMU's open refuses it too). A header that
// does not parse is not an error here (the check reports it).
Task<Status> OpenDependencies(File& file, const std::string& path, const ImageOptions& options);

// True if the first bytes of `file` carry the qcow2 magic.
Task<Result<bool>> IsQcow2(File& file);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_OPEN_IMAGE_H_
