// libFuzzer target: the persistent bitmap directory (qcow2/bitmap_directory.h).
//
// Input: a 16-byte preamble describing the image, then the directory bytes.
//   byte 0      cluster_bits = 9 + byte % 13 (512 B to 2 MiB)
//   bytes 1-4   the extension's nb_bitmaps (big-endian)
//   bytes 5-12  the virtual disk size (big-endian)
//   bytes 13-15 the file size in clusters (big-endian)
// fuzz/make-corpus builds seeds from real images with bitmaps.
//
// Promises checked beyond "no crash, no out-of-bounds access, no unbounded
// allocation": a directory that parses serialises to bytes that parse again
// as the same entries, and to its own size (the extension's directory_size).
#include <cstddef>
#include <cstdint>
#include <string>

#include "base/task.h"
#include "fuzz/fuzz_util.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/header.h"

namespace uq::qcow2 {
namespace {

constexpr char kPath[] = "/f/img.qcow2";
constexpr size_t kPreamble = 16;

bool Same(const BitmapDirEntry& a, const BitmapDirEntry& b) {
  return a.name == b.name && a.table_offset == b.table_offset && a.table_size == b.table_size &&
         a.flags == b.flags && a.type == b.type && a.granularity_bits == b.granularity_bits &&
         a.extra_data == b.extra_data;
}

void OneInput(std::span<const std::byte> input) {
  Header header;
  header.cluster_bits = 9 + fuzz::LoadBE(input, 0, 1) % 13;
  header.size = fuzz::LoadBE(input, 5, 8);
  header.autoclear_features = 1;  // the bitmaps extension is in force
  const uint64_t file_size = fuzz::LoadBE(input, 13, 3) << header.cluster_bits;
  const std::span<const std::byte> dir =
      input.size() > kPreamble ? input.subspan(kPreamble) : std::span<const std::byte>();
  header.bitmaps = BitmapsExtension{.nb_bitmaps = static_cast<uint32_t>(fuzz::LoadBE(input, 1, 4)),
                                    .directory_size = dir.size(),
                                    .directory_offset = header.cluster_size()};
  FUZZ_REQUIRE(ActiveBitmapsExtension(header) != nullptr, "extension not in force");

  auto entries = ParseBitmapDirectory(dir, header, file_size, kPath);
  if (!entries.ok()) {
    FUZZ_REQUIRE(entries.status().ToString().find(kPath) != std::string::npos,
                 "error without the file name: " + entries.status().ToString());
    return;
  }
  FUZZ_REQUIRE(entries->size() == header.bitmaps->nb_bitmaps, "entries != nb_bitmaps");
  const std::vector<std::byte> bytes = SerializeBitmapDirectory(*entries);
  FUZZ_REQUIRE(bytes.size() == dir.size(), "serialised directory has another size");
  auto back = ParseBitmapDirectory(bytes, header, file_size, kPath);
  FUZZ_REQUIRE(back.ok(), "a serialised directory does not parse: " + back.status().ToString());
  FUZZ_REQUIRE(back->size() == entries->size(), "entry count changes");
  for (size_t i = 0; i < back->size(); i++) {
    FUZZ_REQUIRE(Same((*back)[i], (*entries)[i]), "an entry changes when written and parsed");
  }
}

}  // namespace
}  // namespace uq::qcow2

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uq::qcow2::OneInput(uq::fuzz::Bytes(data, size));
  return 0;
}
