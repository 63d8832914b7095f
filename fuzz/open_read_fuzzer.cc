// libFuzzer target: open an image from the input through the in-memory Env
// and read all of it, as a device would serve it.
//
// The input is a whole image file, /f/img.qcow2 in a MemEnv that also holds
// /f/base.raw and /f/base.qcow2 (backing files the seeds name) and
// /f/data.raw (an external data file; the working directory is /f). The
// image is opened read-only (qcow2 or raw, probed, backing chain and all);
// then the guest disk is walked from offset 0: ranges ZeroPrefix says read
// as zeros are skipped unread, the rest is read in 64 KiB requests, with
// BlockStatus asked at each. One input costs at most kMaxSteps requests and
// kMaxReadBytes of reads, whatever its virtual size. Then `info` on the same
// file, and an open at internal snapshot "1" that reads its first clusters.
//
// Promises checked beyond "no crash, no out-of-bounds access, no unbounded
// allocation": a refusal names a file; ZeroPrefix and BlockStatus stay
// inside the range asked; a range ZeroPrefix calls zero reads as zeros.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/task.h"
#include "fuzz/fuzz_util.h"
#include "qcow2/image_info.h"
#include "qcow2/open_image.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

constexpr char kPath[] = "/f/img.qcow2";
constexpr uint64_t kChunk = 64 << 10;
constexpr int kMaxSteps = 128;
constexpr uint64_t kMaxReadBytes = 2 << 20;

std::vector<std::byte> Pattern(size_t size, int seed) {
  std::vector<std::byte> out(size);
  for (size_t i = 0; i < size; i++) out[i] = static_cast<std::byte>((i / 512 + seed) * 37 + 1);
  return out;
}

constexpr uint64_t kBaseRawSize = 192 << 10;
constexpr uint64_t kDataRawSize = 256 << 10;

// The MemEnv of every input, made once with the other files of the seeds'
// images. Why one for the process: copying the two companions (448 KiB) into
// a new MemEnv per input cost ASan an mmap, page faults and a munmap for
// each, and SetContents on a kept file reuses its buffer. Nothing carries
// over: each input replaces both of the files it brings, the opens are
// read-only (a MemEnv write through such a handle fails), and OneInput
// requires afterwards that no file appeared or changed size.
testing::MemEnv& KeptEnv() {
  static const std::unique_ptr<testing::MemEnv> mem = [] {
    auto m = std::make_unique<testing::MemEnv>(testing::MemEnvOptions{.max_file_size = 64 << 20});
    m->SetContents("/f/base.raw", Pattern(kBaseRawSize, 3));
    m->SetContents("/f/data.raw", Pattern(kDataRawSize, 5));
    return m;
  }();
  return *mem;
}

void RequireCompanionsUnchanged(testing::MemEnv& mem) {
  FUZZ_REQUIRE(mem.Paths().size() == 4, "a read-only open made a file");
  auto size = [&](const char* path) {
    Result<uint64_t> r = mem.FileSize(path);
    return r.ok() ? *r : 0;
  };
  FUZZ_REQUIRE(size("/f/base.raw") == kBaseRawSize && size("/f/data.raw") == kDataRawSize,
               "a read-only open resized a file");
}

void RequireNamesAFile(const Status& status) {
  FUZZ_REQUIRE(status.ToString().find("/f/") != std::string::npos ||
                   status.ToString().find("snapshot") != std::string::npos,
               "error names no file: " + status.ToString());
}

void ReadAll(BlockDevice& dev) {
  const uint64_t size = dev.size();
  std::vector<std::byte> buf(kChunk);
  uint64_t at = 0, read_bytes = 0;
  for (int step = 0; step < kMaxSteps && at < size && read_bytes < kMaxReadBytes; step++) {
    auto zeros = BlockOn(dev.ZeroPrefix(at, size - at));
    if (zeros.ok() && *zeros > 0) {
      FUZZ_REQUIRE(*zeros <= size - at, "ZeroPrefix beyond the range");
      // Spot-check the claim on its first bytes.
      const uint64_t n = std::min<uint64_t>(*zeros, 4096);
      if (BlockOn(dev.Read(at, std::span(buf).first(n))).ok()) {
        for (uint64_t i = 0; i < n; i++) {
          FUZZ_REQUIRE(buf[i] == std::byte{0}, "ZeroPrefix range reads non-zero");
        }
      }
      at += *zeros;
      continue;
    }
    const uint64_t n = std::min(kChunk - at % kChunk, size - at);
    auto status = BlockOn(dev.BlockStatus(at, n));
    if (status.ok()) {
      FUZZ_REQUIRE(status->length > 0 && status->length <= n, "BlockStatus length out of range");
    }
    (void)BlockOn(dev.Read(at, std::span(buf).first(n)));
    read_bytes += n;
    at += n;
  }
}

void OneInput(std::span<const std::byte> input) {
  testing::MemEnv& mem = KeptEnv();
  mem.SetContents(kPath, input);
  // A qcow2 backing file: the input itself (a chain that names itself is a
  // loop, which must be refused, not followed).
  mem.SetContents("/f/base.qcow2", input);
  const ImageOptions options{.env = &mem,
                             .writable = false,
                             .cache_size = 4 << 20,
                             .lock = false,
                             .working_dir = "/f",
                             .max_chain_depth = 8};

  auto dev = BlockOn(OpenImage(kPath, options));
  if (fuzz::Verbose()) {
    std::fprintf(stderr, "open: %s\n", dev.ok() ? "ok" : dev.status().ToString().c_str());
  }
  if (!dev.ok()) {
    RequireNamesAFile(dev.status());
  } else {
    ReadAll(**dev);
    (void)BlockOn((*dev)->Close());
  }

  auto info = BlockOn(GetImageInfo(&mem, kPath, ImageInfoOptions{.lock = false}));
  if (!info.ok()) RequireNamesAFile(info.status());

  ImageOptions at_snapshot = options;
  at_snapshot.snapshot = {SnapshotRef{.id = "1"}};
  auto snap = BlockOn(OpenImage(kPath, at_snapshot));
  if (fuzz::Verbose()) {
    std::fprintf(stderr, "open at snapshot 1: %s\n",
                 snap.ok() ? "ok" : snap.status().ToString().c_str());
  }
  if (snap.ok()) {
    std::vector<std::byte> buf(kChunk);
    const uint64_t n = std::min<uint64_t>(kChunk, (*snap)->size());
    (void)BlockOn((*snap)->Read(0, std::span(buf).first(n)));
    (void)BlockOn((*snap)->Close());
  }
  RequireCompanionsUnchanged(mem);
}

}  // namespace
}  // namespace uq::qcow2

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uq::fuzz::OnBigStack([&] { uq::qcow2::OneInput(uq::fuzz::Bytes(data, size)); });
  return 0;
}
