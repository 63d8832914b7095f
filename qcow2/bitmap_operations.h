// The operations of `qemu-img bitmap` as one list, run in order on an open
// image: the offline verb (tools/bitmap_command.cc) and a running device's
// daemon (driver/device_bitmap.cc, `bitmap -n ID`) run the same code, so
// they accept the same things and fail with the same messages.
#ifndef UBLK_QCOW2_QCOW2_BITMAP_OPERATIONS_H_
#define UBLK_QCOW2_QCOW2_BITMAP_OPERATIONS_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/qcow2_image.h"

namespace uq::qcow2 {

struct BitmapOperation {
  enum class Kind { kAdd, kRemove, kClear, kEnable, kDisable, kMerge };
  Kind kind;
  std::string source;                   // kMerge: the bitmap merged in
  std::optional<uint64_t> granularity;  // kAdd: bytes; default QEMU's
  bool enabled = true;                  // kAdd: false for --add --disable
};

// "add", "remove", ...: the name qemu-img's messages use.
const char* BitmapOperationName(BitmapOperation::Kind kind);
std::optional<BitmapOperation::Kind> BitmapOperationKind(const std::string& name);

// Runs `ops` on bitmap `bitmap` of `image` in order and stops at the first
// failure: InvalidArgument "Operation OP on bitmap NAME failed: WHY", WHY
// being the engine's bare message (qemu-img's). A merge takes its source
// from `source_image`: the image itself unless -b named another; null when
// that one has no bitmaps (raw), so that no source is found.
Task<Status> RunBitmapOperations(Qcow2Image& image, const std::string& bitmap,
                                 std::span<const BitmapOperation> ops, Qcow2Image* source_image);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_BITMAP_OPERATIONS_H_
