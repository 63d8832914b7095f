// Rendering ImageInfo the way `qemu-img info` (QEMU 7.2) does, as JSON or text.
//
// JSON (`--output=json`): the keys, their order and value types are qemu-img's.
// QEMU emits a QDict, whose iteration order is its hash-bucket order; for the
// keys that exist that order is fixed, and we reproduce it:
//   image:    backing-filename-format, snapshots, virtual-size, filename,
//             cluster-size, format, actual-size, format-specific,
//             full-backing-filename, backing-filename, dirty-flag
//   snapshot: icount, vm-clock-nsec, name, date-sec, date-nsec, vm-clock-sec,
//             id, vm-state-size (signed, as QAPI's int: 2^64-1 shows as -1)
//   qcow2:    compat, compression-type, lazy-refcounts, bitmaps,
//             refcount-bits, data-file, data-file-raw, corrupt, extended-l2
//   bitmap:   flags (a list: "in-use" then "auto", each when set), name,
//             granularity
// Optional keys appear exactly when qemu-img shows them: cluster-size and
// format-specific for qcow2; the backing keys only with a backing file;
// snapshots only when there are some; icount only when recorded (not -1);
// lazy-refcounts, corrupt and extended-l2 only for compat 1.1 (v3);
// data-file and data-file-raw only with an external data file; bitmaps only
// when the image has some.
// Strings are escaped to ASCII (\uXXXX), invalid UTF-8 becomes U+FFFD; an
// empty list is written "[", newline, "]" as QEMU's printer does.
//
// Text (`--output=human`): qemu-img's layout, sizes via HumanSize(), snapshot
// dates in the local time zone (TZ), "Format specific information" listing the
// qcow2 keys above with dashes turned into spaces, lists (bitmaps, flags) as
// "[i]:" items nested 4 spaces deeper.
#ifndef UBLK_QCOW2_TOOLS_INFO_FORMAT_H_
#define UBLK_QCOW2_TOOLS_INFO_FORMAT_H_

#include <nlohmann/json.hpp>
#include <span>
#include <string>

#include "qcow2/image_info.h"

namespace uq::tools {

// The JSON object for one image.
nlohmann::ordered_json ImageInfoToJson(const qcow2::ImageInfo& info);

// What `info --output=json` prints: the object of infos[0] or, with
// `as_array` (--backing-chain), an array of all of them; 4-space indentation,
// ending in a newline. REQUIRES: as_array || infos.size() == 1.
std::string FormatInfoJson(std::span<const qcow2::ImageInfo> infos, bool as_array);

// What `info` prints for one image, every line ending in a newline.
std::string FormatInfoHuman(const qcow2::ImageInfo& info);

// Several images (a backing chain), separated by an empty line.
std::string FormatInfoHumanList(std::span<const qcow2::ImageInfo> infos);

// The snapshot table's header line and one row, without newlines.
std::string SnapshotTableHeader();
std::string SnapshotTableRow(const qcow2::SnapshotInfo& snapshot);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_INFO_FORMAT_H_
