#include "qcow2/compression.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "base/endian.h"

namespace uq::qcow2 {
namespace {

using Bytes = std::vector<std::byte>;

constexpr CompressionType kTypes[] = {CompressionType::kDeflate, CompressionType::kZstd};

// Compressible but not trivial: text lines that name their own offset.
Bytes PatternAt(uint64_t offset, size_t size) {
  Bytes out(size);
  std::string line;
  size_t i = 0;
  while (i < size) {
    uint64_t at = offset + i;
    line = fmt::format("offset {:012x} holds the qcow2 test pattern, line {}\n", at, at / 64);
    size_t n = std::min(line.size(), size - i);
    std::memcpy(out.data() + i, line.data(), n);
    i += n;
  }
  return out;
}

Bytes RandomBytes(size_t size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes out(size);
  for (auto& b : out) b = static_cast<std::byte>(rng());
  return out;
}

// Compresses `data` into at most data.size() - 1 bytes, as QEMU does.
Bytes MustCompress(CompressionType type, const Bytes& data) {
  Bytes out(data.size() - 1);
  Result<size_t> n = Compress(type, data, out);
  EXPECT_TRUE(n.ok()) << n.status().ToString();
  out.resize(n.ok() ? *n : 0);
  return out;
}

std::string TypeName(CompressionType type) { return std::string(CompressionTypeName(type)); }

TEST(CompressionTest, RoundTripsEveryClusterSize) {
  for (CompressionType type : kTypes) {
    for (int bits = 9; bits <= 21; ++bits) {
      SCOPED_TRACE(fmt::format("{} cluster_bits={}", TypeName(type), bits));
      size_t cluster = size_t{1} << bits;
      Bytes data = PatternAt(cluster * 3, cluster);
      Bytes packed = MustCompress(type, data);
      ASSERT_FALSE(packed.empty());
      EXPECT_LT(packed.size(), cluster);
      Bytes back(cluster);
      Status s = Decompress(type, packed, back);
      ASSERT_TRUE(s.ok()) << s.ToString();
      EXPECT_EQ(back, data);
    }
  }
}

TEST(CompressionTest, AllZeroClusterRoundTrips) {
  for (CompressionType type : kTypes) {
    Bytes data(65536);
    Bytes packed = MustCompress(type, data);
    EXPECT_LT(packed.size(), 512u) << TypeName(type);
    Bytes back(65536, std::byte{0xAA});
    ASSERT_TRUE(Decompress(type, packed, back).ok());
    EXPECT_EQ(back, data);
  }
}

TEST(CompressionTest, IncompressibleDataDoesNotFit) {
  for (CompressionType type : kTypes) {
    for (size_t cluster : {size_t{512}, size_t{65536}, size_t{2} << 20}) {
      SCOPED_TRACE(fmt::format("{} cluster={}", TypeName(type), cluster));
      Bytes data = RandomBytes(cluster, cluster);
      Bytes out(cluster - 1);
      Result<size_t> n = Compress(type, data, out);
      ASSERT_FALSE(n.ok());
      EXPECT_TRUE(n.status().IsNoSpace()) << n.status().ToString();
      EXPECT_NE(n.status().message().find("does not fit"), std::string::npos);
    }
  }
}

TEST(CompressionTest, OutputTooSmallForCompressibleDataDoesNotFit) {
  for (CompressionType type : kTypes) {
    Bytes data = PatternAt(0, 65536);
    Bytes out(16);
    Result<size_t> n = Compress(type, data, out);
    ASSERT_FALSE(n.ok()) << TypeName(type);
    EXPECT_TRUE(n.status().IsNoSpace()) << n.status().ToString();
  }
}

TEST(CompressionTest, TrailingBytesAfterTheStreamAreIgnored) {
  for (CompressionType type : kTypes) {
    SCOPED_TRACE(TypeName(type));
    Bytes data = PatternAt(4096, 65536);
    Bytes packed = MustCompress(type, data);
    // Sector padding of zeros, then garbage (the next cluster's bytes).
    Bytes padded = packed;
    padded.resize((packed.size() + 511) / 512 * 512);
    Bytes garbage = RandomBytes(1024, 7);
    padded.insert(padded.end(), garbage.begin(), garbage.end());
    Bytes back(65536);
    Status s = Decompress(type, padded, back);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(back, data);

    Bytes ff = packed;
    ff.resize(packed.size() + 700, std::byte{0xff});
    ASSERT_TRUE(Decompress(type, ff, back).ok());
    EXPECT_EQ(back, data);
  }
}

TEST(CompressionTest, StreamLongerThanTheClusterFillsItAndStops) {
  for (CompressionType type : kTypes) {
    Bytes data = PatternAt(0, 8192);
    Bytes packed = MustCompress(type, data);
    Bytes half(4096);
    Status s = Decompress(type, packed, half);
    ASSERT_TRUE(s.ok()) << TypeName(type) << ": " << s.ToString();
    EXPECT_EQ(0, std::memcmp(half.data(), data.data(), half.size()));
  }
}

// A raw deflate stream with no final block (flushed, never finished) that
// fills the cluster exactly: QEMU accepts it, and so do we (zlib decides it;
// libdeflate, our fast path, asks for a finished stream).
TEST(CompressionTest, UnfinishedDeflateStreamThatFillsTheClusterIsAccepted) {
  Bytes data = PatternAt(0, 65536);
  z_stream s{};
  ASSERT_EQ(deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY), Z_OK);
  Bytes packed(data.size() + 1024);
  s.next_in = reinterpret_cast<Bytef*>(data.data());
  s.avail_in = static_cast<uInt>(data.size());
  s.next_out = reinterpret_cast<Bytef*>(packed.data());
  s.avail_out = static_cast<uInt>(packed.size());
  ASSERT_EQ(deflate(&s, Z_SYNC_FLUSH), Z_OK);
  packed.resize(packed.size() - s.avail_out);
  deflateEnd(&s);
  Bytes back(data.size());
  Status st = Decompress(CompressionType::kDeflate, packed, back);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(back, data);
}

TEST(CompressionTest, ZstdAcceptsSeveralFrames) {
  Bytes data = PatternAt(0, 65536);
  Bytes first(data.begin(), data.begin() + 20000);
  Bytes second(data.begin() + 20000, data.end());
  Bytes packed = MustCompress(CompressionType::kZstd, first);
  Bytes more = MustCompress(CompressionType::kZstd, second);
  packed.insert(packed.end(), more.begin(), more.end());
  Bytes back(65536);
  Status s = Decompress(CompressionType::kZstd, packed, back);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(back, data);
}

TEST(CompressionTest, TruncatedInputIsCorruption) {
  for (CompressionType type : kTypes) {
    SCOPED_TRACE(TypeName(type));
    Bytes data = PatternAt(0, 65536);
    Bytes packed = MustCompress(type, data);
    // (Cutting only the last byte or two of a deflate stream may still leave
    // every data byte decodable: the cluster is then complete, as in QEMU.)
    for (size_t keep :
         {size_t{0}, size_t{1}, size_t{5}, packed.size() / 2, packed.size() * 3 / 4}) {
      Bytes cut(packed.begin(), packed.begin() + keep);
      Bytes back(65536);
      Status s = Decompress(type, cut, back);
      ASSERT_FALSE(s.ok()) << "keep=" << keep;
      EXPECT_TRUE(s.IsCorruption()) << s.ToString();
      EXPECT_NE(s.message().find("does not decompress to a full cluster"), std::string::npos)
          << s.ToString();
    }
  }
}

TEST(CompressionTest, StreamEndingBeforeTheClusterIsFullIsCorruption) {
  for (CompressionType type : kTypes) {
    Bytes data = PatternAt(0, 4096);
    Bytes packed = MustCompress(type, data);
    packed.resize(packed.size() + 512);  // zero padding after the stream
    Bytes back(8192);
    Status s = Decompress(type, packed, back);
    EXPECT_TRUE(s.IsCorruption()) << TypeName(type) << ": " << s.ToString();
  }
}

TEST(CompressionTest, GarbageIsCorruption) {
  for (CompressionType type : kTypes) {
    Bytes garbage = RandomBytes(4096, 99);
    Bytes back(65536);
    Status s = Decompress(type, garbage, back);
    EXPECT_TRUE(s.IsCorruption()) << TypeName(type) << ": " << s.ToString();
  }
}

TEST(CompressionTest, ErrorsDoNotPoisonTheNextCluster) {
  // A failed or partial decompression leaves per-thread codec state behind;
  // the next call must start clean.
  for (CompressionType type : kTypes) {
    Bytes data = PatternAt(0, 65536);
    Bytes packed = MustCompress(type, data);
    Bytes back(65536);
    Bytes cut(packed.begin(), packed.begin() + packed.size() / 2);
    EXPECT_FALSE(Decompress(type, cut, back).ok());
    Bytes small(100);
    EXPECT_TRUE(Decompress(type, packed, small).ok());
    ASSERT_TRUE(Decompress(type, packed, back).ok()) << TypeName(type);
    EXPECT_EQ(back, data);
  }
}

TEST(CompressionTest, UnknownTypeIsInvalidArgument) {
  Bytes in(16), out(512);
  EXPECT_TRUE(Decompress(static_cast<CompressionType>(7), in, out).IsInvalidArgument());
  Result<size_t> n = Compress(static_cast<CompressionType>(7), out, in);
  ASSERT_FALSE(n.ok());
  EXPECT_TRUE(n.status().IsInvalidArgument());
}

// --- Interoperability with images written by qemu-img -----------------------

std::string TempDir() {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/compression_test.XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) return "";
  return buf.data();
}

Bytes ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes out(chars.size());
  if (!chars.empty()) std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

bool WriteWholeFile(const std::string& path, const Bytes& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  return static_cast<bool>(out);
}

bool HaveQemuImg() { return std::system("qemu-img --version >/dev/null 2>&1") == 0; }

// Converts a raw file with the test pattern to a compressed qcow2 image with
// qemu-img, then finds every compressed cluster by walking L1/L2 and checks
// that it decompresses to the pattern.
void CheckQemuCompressedImage(const std::string& qemu_type, CompressionType type,
                              int cluster_bits) {
  ASSERT_TRUE(HaveQemuImg()) << "qemu-img is required for this test and was not found";
  std::string dir = TempDir();
  ASSERT_FALSE(dir.empty());
  const uint64_t cluster_size = uint64_t{1} << cluster_bits;
  const uint64_t disk_size = 1 << 20;
  Bytes raw = PatternAt(0, disk_size);
  // One incompressible cluster, which qemu-img must store uncompressed.
  Bytes noise = RandomBytes(cluster_size, 5);
  std::memcpy(raw.data() + 2 * cluster_size, noise.data(), noise.size());
  std::string raw_path = dir + "/disk.raw";
  std::string img_path = dir + "/disk.qcow2";
  ASSERT_TRUE(WriteWholeFile(raw_path, raw));
  std::string cmd = fmt::format(
      "qemu-img convert -q -c -f raw -O qcow2 -o compression_type={},cluster_size={} '{}' '{}'",
      qemu_type, cluster_size, raw_path, img_path);
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;

  Bytes img = ReadWholeFile(img_path);
  ASSERT_GE(img.size(), 112u);
  ASSERT_EQ(LoadBE32(img, 20), static_cast<uint32_t>(cluster_bits));
  if (LoadBE32(img, 4) >= 3 && LoadBE32(img, 100) >= 105) {
    ASSERT_EQ(Load8(img, 104), static_cast<uint8_t>(type));
  }
  uint32_t l1_size = LoadBE32(img, 36);
  uint64_t l1_offset = LoadBE64(img, 40);
  ASSERT_LE(l1_offset + 8 * uint64_t{l1_size}, img.size());

  const uint64_t l2_entries = cluster_size / 8;
  const int x = 62 - (cluster_bits - 8);
  int compressed = 0;
  int plain = 0;
  for (uint32_t i = 0; i < l1_size; ++i) {
    uint64_t l2_offset = LoadBE64(img, l1_offset + 8 * i) & 0x00fffffffffffe00ull;
    if (l2_offset == 0) continue;
    ASSERT_LE(l2_offset + cluster_size, img.size());
    for (uint64_t j = 0; j < l2_entries; ++j) {
      uint64_t guest = (i * l2_entries + j) * cluster_size;
      if (guest >= disk_size) break;
      uint64_t entry = LoadBE64(img, l2_offset + 8 * j);
      if ((entry & (1ull << 62)) == 0) {
        if ((entry & 0x00fffffffffffe00ull) != 0) ++plain;
        continue;
      }
      uint64_t desc = entry & ((1ull << 62) - 1);
      uint64_t host = desc & ((1ull << x) - 1);
      uint64_t sectors = desc >> x;
      uint64_t length = (sectors + 1) * 512 - (host & 511);
      SCOPED_TRACE(fmt::format("guest cluster at {}, host {}, {} bytes", guest, host, length));
      ASSERT_LT(host, img.size());
      length = std::min<uint64_t>(length, img.size() - host);
      std::span<const std::byte> in(img.data() + host, length);
      Bytes out(cluster_size);
      Status s = Decompress(type, in, out);
      ASSERT_TRUE(s.ok()) << s.ToString();
      Bytes expected(raw.begin() + guest, raw.begin() + guest + cluster_size);
      ASSERT_EQ(out, expected);
      ++compressed;
    }
  }
  EXPECT_EQ(compressed, static_cast<int>(disk_size / cluster_size) - 1);
  EXPECT_EQ(plain, 1);  // the incompressible cluster
  EXPECT_EQ(std::system(fmt::format("rm -rf '{}'", dir).c_str()), 0);
}

TEST(CompressionInteropTest, QemuZlibImage64K) {
  CheckQemuCompressedImage("zlib", CompressionType::kDeflate, 16);
}
TEST(CompressionInteropTest, QemuZlibImage4K) {
  CheckQemuCompressedImage("zlib", CompressionType::kDeflate, 12);
}
TEST(CompressionInteropTest, QemuZstdImage64K) {
  CheckQemuCompressedImage("zstd", CompressionType::kZstd, 16);
}
TEST(CompressionInteropTest, QemuZstdImage512) {
  CheckQemuCompressedImage("zstd", CompressionType::kZstd, 9);
}

}  // namespace
}  // namespace uq::qcow2
