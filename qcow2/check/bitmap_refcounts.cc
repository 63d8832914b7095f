// Bitmaps' share of the references: the bitmap directory, each bitmap's
// table and the data clusters it names, as QEMU 7.2's
// qcow2_check_bitmaps_refcounts counts them. What a valid directory and a
// valid table entry are is the engine's (qcow2/bitmap_directory.h), with
// QEMU's rules alone (BitmapDirectoryRules::kQemu): a table outside the file
// is not refused here but counted, so that compare_refcounts reports it as
// qemu-img check does.
#include <cerrno>
#include <cstdint>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/check/check_pass.h"
#include "qcow2/check/check_util.h"

namespace uq::qcow2::check_internal {

Task<Status> CheckPass::CheckBitmaps() {
  // ParseHeader (ReadHeaderForCheck) has checked the extension itself, as QEMU
  // does on open: 1 to kMaxBitmaps bitmaps, a directory of 1 byte to
  // kMaxBitmapDirectorySize, cluster-aligned, inside the file.
  const BitmapsExtension* ext = ActiveBitmapsExtension(h_);
  if (ext == nullptr) co_return Status::Ok();
  CO_RETURN_IF_ERROR(Inc(ext->directory_offset, ext->directory_size));
  // qemu-img cannot open an image whose directory breaks QEMU's rules (its
  // bitmap_list_load refuses it), and neither does `ublk-qcow2 check`
  // (OpenDependencies); a caller of CheckImage alone gets the parser's reason
  // as the check's failure.
  Result<std::vector<BitmapDirEntry>> entries =
      co_await ReadBitmapDirectory(file_, h_, BitmapDirectoryRules::kQemu);
  if (!entries.ok()) {
    res_.corruptions++;
    co_return entries.status();
  }
  for (const BitmapDirEntry& e : *entries) {
    // Every table, in use or not (QEMU's open reads only the consistent ones).
    CO_RETURN_IF_ERROR(Inc(e.table_offset, uint64_t{e.table_size} * 8));
    Result<std::vector<uint64_t>> table = co_await ReadBitmapTable(file_, e, cs());
    if (!table.ok()) {
      res_.corruptions++;
      // bitmap_table_load fails the whole table on one bad entry, and the check
      // with -EINVAL: qemu-img prints "Check failed: Invalid argument".
      if (table.status().IsCorruption()) co_return Errno(EINVAL);
      co_return table.status();
    }
    for (uint64_t entry : *table) {
      const uint64_t offset = entry & kBitmapTableEntryOffset;
      if (offset != 0) CO_RETURN_IF_ERROR(Inc(offset, cs()));
    }
  }
  co_return Status::Ok();
}

}  // namespace uq::qcow2::check_internal
