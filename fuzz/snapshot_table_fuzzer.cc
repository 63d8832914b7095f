// libFuzzer target: the internal snapshot table (qcow2/snapshot_table.h).
//
// Input: an 8-byte preamble, then the file the table lives in.
//   byte 0     bit 0: image version 3 (else 2)
//   bytes 1-3  entry count: the big-endian value modulo 2049, or 65536 /
//              65537 (QEMU's limit and one past it) when byte 1 is 0xff.
//              Entries past the end of the file read as zeros in the check's
//              reader, at ~0.4 us each under ASan: 65536 of them take 27 ms,
//              2048 under 1 ms. The limit counts used to come from any
//              non-zero byte 1, so most mutations of it made such an input
//              and a long run averaged 38 inputs/s; one byte value in 256
//              still reaches them (libFuzzer's comparison tracing finds it).
//   bytes 4-7  table offset in the file (big-endian)
// fuzz/make-corpus builds seeds from real images: the preamble their header
// implies, then the table's bytes (offset 0).
//
// Promises checked beyond "no crash, no out-of-bounds access, no unbounded
// allocation": a table ReadSnapshotTable accepts can be written back
// (ValidateSnapshotTableForWrite), SnapshotTableSize is the serialised size,
// and the serialised table reads back as the same entries; the lenient
// reader of check (ReadSnapshotTableForCheck) keeps every entry the strict
// reader accepts, the same but for id and name, which it ends at a NUL.
#include <fmt/format.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "base/task.h"
#include "fuzz/fuzz_util.h"
#include "qcow2/image_info.h"
#include "qcow2/snapshot_table.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

constexpr char kPath[] = "/f/img.qcow2";
constexpr size_t kPreamble = 8;

std::string Describe(const Snapshot& s) {
  return fmt::format(
      "l1 {:#x}/{} id '{}' name '{}' date {}.{} clock {} vmstate {} disk {} icount {}",
      s.l1_table_offset, s.l1_size, s.id, s.name, s.date_sec, s.date_nsec, s.vm_clock_nsec,
      s.vm_state_size, s.disk_size ? *s.disk_size : -1ull, s.icount ? *s.icount : -2);
}

bool Same(const Snapshot& a, const Snapshot& b) {
  if (fuzz::Verbose())
    std::fprintf(stderr, "  %s\n  %s\n", Describe(a).c_str(), Describe(b).c_str());
  return a.l1_table_offset == b.l1_table_offset && a.l1_size == b.l1_size && a.id == b.id &&
         a.name == b.name && a.date_sec == b.date_sec && a.date_nsec == b.date_nsec &&
         a.vm_clock_nsec == b.vm_clock_nsec && a.vm_state_size == b.vm_state_size &&
         a.disk_size == b.disk_size && a.icount == b.icount;
}

void OneInput(std::span<const std::byte> input) {
  const int version = (fuzz::LoadBE(input, 0, 1) & 1) ? 3 : 2;
  const uint64_t raw_count = fuzz::LoadBE(input, 1, 3);
  const uint32_t count = raw_count < 0xff0000 ? raw_count % 2049 : 65536 + (raw_count & 1);
  const uint64_t offset = fuzz::LoadBE(input, 4, 4);
  const std::span<const std::byte> image =
      input.size() > kPreamble ? input.subspan(kPreamble) : std::span<const std::byte>();
  testing::MemEnv mem;
  mem.SetContents(kPath, image);
  auto file = mem.Open(kPath, OpenOptions{});
  FUZZ_REQUIRE(file.ok(), file.status().ToString());

  auto table = BlockOn(ReadSnapshotTable(**file, offset, count, image.size(), version));
  std::optional<SnapshotTableScan> scan;
  if (count <= kMaxSnapshotCount) {
    auto scanned = BlockOn(ReadSnapshotTableForCheck(**file, offset, count));
    FUZZ_REQUIRE(scanned.ok(), "the check's reader fails: " + scanned.status().ToString());
    scan = std::move(*scanned);
  }
  if (!table.ok()) return;

  FUZZ_REQUIRE(table->size() == count, "entries read != count");
  if (scan) {
    FUZZ_REQUIRE(
        scan->snapshots.size() == count && scan->dropped == 0 && scan->extra_data_cut.empty(),
        "the check's reader cuts a table the strict reader accepts");
    for (size_t i = 0; i < count; i++) {
      // The check's reader ends id and name at a NUL, as QEMU's C strings do;
      // the strict one keeps the bytes as stored.
      Snapshot as_c_strings = (*table)[i];
      as_c_strings.id.resize(std::min(as_c_strings.id.size(), as_c_strings.id.find('\0')));
      as_c_strings.name.resize(std::min(as_c_strings.name.size(), as_c_strings.name.find('\0')));
      FUZZ_REQUIRE(Same(scan->snapshots[i], as_c_strings), "the two readers disagree");
    }
  }
  for (size_t i = 0; i < table->size(); i++) {
    const Snapshot& s = (*table)[i];
    (void)ValidateSnapshotL1Table(s, i, 65536, image.size());
    (void)HasIncompleteExtraData(s, version);
    (void)ToSnapshotInfo(s, 1u << 20);
    (void)FindSnapshot(*table, SnapshotRef{.id = s.id, .name = s.name});
  }

  const Status writable = ValidateSnapshotTableForWrite(*table);
  FUZZ_REQUIRE(writable.ok(), "a table read cannot be written back: " + writable.ToString());
  const std::vector<std::byte> bytes = SerializeSnapshotTable(*table);
  FUZZ_REQUIRE(bytes.size() == SnapshotTableSize(*table), "SnapshotTableSize is wrong");
  mem.SetContents("/f/table", bytes);
  auto written = mem.Open("/f/table", OpenOptions{});
  FUZZ_REQUIRE(written.ok(), written.status().ToString());
  auto back = BlockOn(ReadSnapshotTable(**written, 0, count, bytes.size(), version));
  FUZZ_REQUIRE(back.ok(), "a serialised table does not read back: " + back.status().ToString());
  for (size_t i = 0; i < count; i++) {
    FUZZ_REQUIRE(Same((*back)[i], (*table)[i]), "an entry changes when written and read back");
  }
}

}  // namespace
}  // namespace uq::qcow2

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uq::qcow2::OneInput(uq::fuzz::Bytes(data, size));
  return 0;
}
