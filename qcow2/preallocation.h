// Preallocation: how much of a new area an image gets up front, as QEMU's
// `preallocation` option names it (create, resize).
//   off       nothing: clusters are allocated by the first write into them;
//   metadata  L2 tables and cluster mappings, the file grown sparse;
//   falloc    the same, the file's new space reserved (fallocate);
//   full      the same, the new space written with zeros.
#ifndef UBLK_QCOW2_QCOW2_PREALLOCATION_H_
#define UBLK_QCOW2_QCOW2_PREALLOCATION_H_

#include <optional>
#include <string_view>

namespace uq::qcow2 {

enum class Preallocation { kOff, kMetadata, kFalloc, kFull };

// "off", "metadata", "falloc", "full"; nullopt for anything else.
inline std::optional<Preallocation> ParsePreallocation(std::string_view name) {
  if (name == "off") return Preallocation::kOff;
  if (name == "metadata") return Preallocation::kMetadata;
  if (name == "falloc") return Preallocation::kFalloc;
  if (name == "full") return Preallocation::kFull;
  return std::nullopt;
}

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_PREALLOCATION_H_
