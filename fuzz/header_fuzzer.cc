// libFuzzer target: the qcow2 header and its extensions (qcow2/header.h).
//
// Input: bytes 0-7 the file's size (big-endian; at least the bytes given),
// then the file's first bytes; the rest of the file reads as zeros. So a seed
// is an image's first cluster with the image's real size (fuzz/make-corpus),
// and mutations land in the header rather than in data. ReadHeader reads it
// as OpenImage does (the probe, then the first cluster); ParseHeader gets the
// same first cluster with encryption allowed (as check calls it).
//
// Promises checked beyond "no crash, no out-of-bounds access, no unbounded
// allocation": a refusal names the file; a header that parses and serialises
// parses again from its own bytes and serialises to the same bytes (nothing
// is lost or invented when the header is rewritten).
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "base/task.h"
#include "fuzz/fuzz_util.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/format.h"
#include "qcow2/header.h"

namespace uq::qcow2 {
namespace {

constexpr char kPath[] = "/f/img.qcow2";
constexpr size_t kPreamble = 8;

// A read-only file of `size` bytes: `bytes`, then zeros.
class SpanFile final : public File {
 public:
  SpanFile(std::span<const std::byte> bytes, uint64_t size) : bytes_(bytes), size_(size) {}
  Result<uint64_t> Size() override { return size_; }
  Status Truncate(uint64_t) override { return Status::IoError(path_ + ": read-only", EBADF); }
  const std::string& path() const override { return path_; }
  bool Start(IoRequest& req) override {
    if (req.op != IoRequest::Op::kRead) {
      req.result = -EBADF;
      return true;
    }
    const uint64_t n = req.offset >= size_ ? 0 : std::min(req.length, size_ - req.offset);
    for (uint64_t i = 0; i < n; i++) {
      const uint64_t at = req.offset + i;
      req.data[i] = at < bytes_.size() ? bytes_[at] : std::byte{0};
    }
    req.result = static_cast<int64_t>(n);
    return true;
  }

 private:
  std::span<const std::byte> bytes_;
  uint64_t size_;
  std::string path_ = kPath;
};

void RoundTrip(const Header& header, uint64_t file_size) {
  auto bytes = SerializeHeader(header);
  if (!bytes.ok()) return;  // does not fit in one cluster: refused, fine
  auto again = ParseHeader(*bytes, std::max<uint64_t>(file_size, bytes->size()), kPath, true);
  FUZZ_REQUIRE(again.ok(), "a serialised header does not parse: " + again.status().ToString());
  auto bytes_again = SerializeHeader(*again);
  FUZZ_REQUIRE(bytes_again.ok() && *bytes_again == *bytes,
               "a header changes when parsed and serialised again");
}

void OneInput(std::span<const std::byte> input) {
  const std::span<const std::byte> bytes =
      input.size() > kPreamble ? input.subspan(kPreamble) : std::span<const std::byte>();
  const uint64_t file_size = std::max<uint64_t>(fuzz::LoadBE(input, 0, 8), bytes.size());
  SpanFile file(bytes, file_size);
  auto header = BlockOn(ReadHeader(file));
  if (!header.ok()) {
    FUZZ_REQUIRE(header.status().ToString().find(kPath) != std::string::npos,
                 "error without the file name: " + header.status().ToString());
  } else {
    (void)CheckHeaderForIo(*header, kPath);
    (void)ActiveBitmapsExtension(*header);
    for (int bit = 0; bit < 64; bit += 7) (void)header->FeatureNameFor(bit % 3, bit);
    RoundTrip(*header, file_size);
  }
  // ParseHeader gets the first cluster, as ReadHeader would pass it.
  const uint64_t bits = fuzz::LoadBE(bytes, 20, 4);
  const uint64_t want = bits >= kMinClusterBits && bits <= kMaxClusterBits
                            ? std::min<uint64_t>(file_size, uint64_t{1} << bits)
                            : std::min<uint64_t>(file_size, kHeaderProbeBytes);
  std::vector<std::byte> first(want);
  std::copy_n(bytes.begin(), std::min<uint64_t>(want, bytes.size()), first.begin());
  auto any = ParseHeader(first, file_size, kPath, /*allow_encrypted=*/true);
  if (any.ok()) RoundTrip(*any, file_size);
}

}  // namespace
}  // namespace uq::qcow2

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uq::qcow2::OneInput(uq::fuzz::Bytes(data, size));
  return 0;
}
