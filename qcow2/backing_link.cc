#include "qcow2/backing_link.h"

#include <vector>

#include "base/endian.h"
#include "qcow2/format.h"

namespace uq::qcow2 {

Result<Header> WithBackingFile(const Header& header, const std::string& name,
                               const std::optional<std::string>& format) {
  // QEMU's qcow2_change_backing_file refuses both with EINVAL.
  if (!name.empty() && header.data_file_raw()) return Status::InvalidArgument("Invalid argument");
  if (name.size() > kMaxBackingFileNameSize) return Status::InvalidArgument("Invalid argument");
  Header updated = header;
  updated.backing_file = name;
  updated.backing_file_size = static_cast<uint32_t>(name.size());
  updated.backing_format = name.empty() ? std::nullopt : format;
  // SerializeHeader places the name and sets its offset; it fails exactly when
  // everything does not fit in the first cluster (QEMU: ENOSPC).
  Result<std::vector<std::byte>> bytes = SerializeHeader(updated);
  if (!bytes.ok()) return Status::NoSpace("No space left in the file header");
  constexpr size_t kBackingFileOffsetField = 8;  // where the header keeps the name's offset
  updated.backing_file_offset = LoadBE64(*bytes, kBackingFileOffsetField);
  return updated;
}

}  // namespace uq::qcow2
