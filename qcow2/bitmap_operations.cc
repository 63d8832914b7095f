#include "qcow2/bitmap_operations.h"

#include <fmt/format.h>

#include <array>
#include <memory>

namespace uq::qcow2 {
namespace {

using Kind = BitmapOperation::Kind;

constexpr std::array<std::pair<Kind, const char*>, 6> kNames = {{{Kind::kAdd, "add"},
                                                                 {Kind::kRemove, "remove"},
                                                                 {Kind::kClear, "clear"},
                                                                 {Kind::kEnable, "enable"},
                                                                 {Kind::kDisable, "disable"},
                                                                 {Kind::kMerge, "merge"}}};

Task<Status> RunOne(Qcow2Image& image, const std::string& bitmap, const BitmapOperation& op,
                    Qcow2Image* source_image) {
  switch (op.kind) {
    case Kind::kAdd:
      co_return image.AddBitmap(bitmap, op.granularity, op.enabled);
    case Kind::kRemove:
      co_return image.RemoveBitmap(bitmap);
    case Kind::kClear:
      co_return co_await image.ClearBitmap(bitmap);
    case Kind::kEnable:
    case Kind::kDisable:
      co_return co_await image.EnableBitmap(bitmap, op.kind == Kind::kEnable);
    case Kind::kMerge: {
      // The target first, as QEMU judges it before the source.
      CO_RETURN_IF_ERROR((co_await image.BitmapContents(bitmap)).status());
      if (source_image == nullptr) {
        co_return Status::InvalidArgument(fmt::format("Dirty bitmap '{}' not found", op.source));
      }
      CO_ASSIGN_OR_RETURN(std::shared_ptr<const DirtyBitmap> bits,
                          co_await source_image->BitmapContents(op.source));
      co_return co_await image.MergeBitmap(bitmap, *bits);
    }
  }
  co_return Status::InvalidArgument("unknown bitmap operation");
}

}  // namespace

const char* BitmapOperationName(Kind kind) {
  for (const auto& [k, name] : kNames) {
    if (k == kind) return name;
  }
  return "?";
}

std::optional<Kind> BitmapOperationKind(const std::string& name) {
  for (const auto& [k, n] : kNames) {
    if (name == n) return k;
  }
  return std::nullopt;
}

Task<Status> RunBitmapOperations(Qcow2Image& image, const std::string& bitmap,
                                 std::span<const BitmapOperation> ops, Qcow2Image* source_image) {
  for (const BitmapOperation& op : ops) {
    Status st = co_await RunOne(image, bitmap, op, source_image);
    if (!st.ok()) {
      co_return Status::InvalidArgument(fmt::format("Operation {} on bitmap {} failed: {}",
                                                    BitmapOperationName(op.kind), bitmap,
                                                    st.message()));
    }
  }
  co_return Status::Ok();
}

}  // namespace uq::qcow2
