// libFuzzer target: `check` (qcow2/check/check.h) on a damaged image, through
// the in-memory Env.
//
// The input is a whole image file. It is checked as `qemu-img check` would
// (report only), its output rendered (human and JSON), then repaired as
// `check -r all` would, and checked once more. The refcount array is capped
// at 64 MiB (CheckOptions::max_memory_bytes) and the file at 64 MiB, so one
// input stays within the limits given to libFuzzer (fuzz/README.md).
//
// Promises checked beyond "no crash, no out-of-bounds access, no unbounded
// allocation": a check that finds nothing wrong on an image changes nothing
// in it; a check that refuses an image says why.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "base/task.h"
#include "fuzz/fuzz_util.h"
#include "qcow2/check/check.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

constexpr char kPath[] = "/f/img.qcow2";

// The MemEnv of every input, made once. Why: a repair may grow the file to
// cover a refcount block past its end (up to the 64 MiB cap), and a new
// MemEnv per input made each such growth a fresh allocation that ASan maps,
// faults in page by page and unmaps; SetContents on the kept file reuses its
// buffer. Nothing carries over: the input replaces the file's bytes and size,
// and the check makes no other file (required after each input).
testing::MemEnv& KeptEnv() {
  static testing::MemEnv mem(testing::MemEnvOptions{.max_file_size = 64 << 20});
  return mem;
}

void OneInput(std::span<const std::byte> input) {
  testing::MemEnv& mem = KeptEnv();
  mem.SetContents(kPath, input);
  auto file = mem.Open(kPath, OpenOptions{.writable = true});
  FUZZ_REQUIRE(file.ok(), file.status().ToString());
  const CheckOptions report{
      .repair = RepairMode::kNone, .max_memory_bytes = 64 << 20, .max_messages = 1000};
  auto checked = BlockOn(CheckImage(**file, report));
  if (fuzz::Verbose()) {
    std::fprintf(stderr, "check: %s\n",
                 checked.ok() ? FormatCheckHuman(*checked, kPath).c_str()
                              : checked.status().ToString().c_str());
  }
  if (!checked.ok()) {
    FUZZ_REQUIRE(!checked.status().ToString().empty(), "refusal without a reason");
    return;
  }
  (void)FormatCheckHuman(*checked, kPath);
  (void)CheckJsonFields(*checked, kPath);
  const int exit_code = CheckExitCode(*checked);
  Result<uint64_t> size = mem.FileSize(kPath);
  FUZZ_REQUIRE(size.ok() && *size == input.size(), "a report-only check changed the file");

  CheckOptions repair = report;
  repair.repair = RepairMode::kAll;
  auto repaired = BlockOn(CheckImage(**file, repair));
  if (repaired.ok()) (void)FormatCheckHuman(*repaired, kPath);
  if (exit_code == 0 && repaired.ok() && repaired->error.empty()) {
    FUZZ_REQUIRE(repaired->corruptions_fixed == 0 && repaired->leaks_fixed == 0,
                 "repair fixed something in a clean image");
  }
  (void)BlockOn(CheckImage(**file, report));
}

}  // namespace
}  // namespace uq::qcow2

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uq::fuzz::OnBigStack([&] {
    uq::qcow2::OneInput(uq::fuzz::Bytes(data, size));
    FUZZ_REQUIRE(uq::qcow2::KeptEnv().Paths().size() == 1, "the check made a file");
  });
  return 0;
}
