#include "qcow2/header.h"

#include <gtest/gtest.h>

#include "base/endian.h"
#include "qcow2/format.h"

namespace uq::qcow2 {
namespace {

constexpr uint64_t kFileSize = 1 << 20;

// A valid v3 image header: 64 KiB clusters, 1 GiB, tables inside a 1 MiB file.
Header ValidHeader() {
  Header h;
  h.version = 3;
  h.cluster_bits = 16;
  h.size = 1ull << 30;
  h.l1_size = 2;
  h.l1_table_offset = 0x30000;
  h.refcount_table_offset = 0x10000;
  h.refcount_table_clusters = 1;
  h.refcount_order = 4;
  h.header_length = 112;
  h.feature_names = {{kFeatureIncompatible, 0, "dirty bit"},
                     {kFeatureIncompatible, 1, "corrupt bit"}};
  return h;
}

std::vector<std::byte> Bytes(const Header& h) {
  auto r = SerializeHeader(h);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  std::vector<std::byte> out = *r;
  out.resize(h.cluster_size());
  return out;
}

Result<Header> Parse(const std::vector<std::byte>& b, uint64_t file_size = kFileSize) {
  return ParseHeader(b, file_size, "t.qcow2");
}

// Expects a Corruption/NotSupported whose message names the file and `needle`.
void ExpectError(const Result<Header>& r, const std::string& needle) {
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("t.qcow2: "), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().message();
}

TEST(HeaderTest, RoundTripsEveryField) {
  Header h = ValidHeader();
  h.backing_file = "base.qcow2";
  h.backing_format = "qcow2";
  h.data_file = std::nullopt;
  h.compatible_features = kCompatLazyRefcounts;
  h.unknown_extensions.push_back({0x12345678, {std::byte{1}, std::byte{2}, std::byte{3}}});
  auto r = Parse(Bytes(h));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->version, 3u);
  EXPECT_EQ(r->size, 1ull << 30);
  EXPECT_EQ(r->backing_file, "base.qcow2");
  EXPECT_EQ(r->backing_format, "qcow2");
  EXPECT_TRUE(r->lazy_refcounts());
  ASSERT_EQ(r->unknown_extensions.size(), 1u);
  EXPECT_EQ(r->unknown_extensions[0].type, 0x12345678u);
  EXPECT_EQ(r->unknown_extensions[0].data.size(), 3u);
  EXPECT_EQ(r->feature_names.size(), 2u);
  // Serialising what was parsed gives the same bytes.
  EXPECT_EQ(Bytes(*r), Bytes(h));
}

TEST(HeaderTest, Version2DefaultsV3Fields) {
  Header h = ValidHeader();
  h.version = 2;
  h.feature_names.clear();
  auto r = Parse(Bytes(h));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->header_length, 72u);
  EXPECT_EQ(r->refcount_order, 4u);
}

TEST(HeaderTest, TruncatedHeader) {
  auto b = Bytes(ValidHeader());
  b.resize(50);
  ExpectError(Parse(b, 50), "too short");
}

TEST(HeaderTest, BadMagicIsNotQcow2) {
  auto b = Bytes(ValidHeader());
  b[0] = std::byte{'X'};
  auto r = Parse(b);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument());
  EXPECT_NE(r.status().message().find("not a qcow2 image"), std::string::npos);
}

TEST(HeaderTest, UnsupportedVersions) {
  for (uint32_t v : {1u, 4u}) {
    auto b = Bytes(ValidHeader());
    StoreBE32(b, 4, v);
    ExpectError(Parse(b), "version");
  }
}

TEST(HeaderTest, ClusterBitsOutOfRange) {
  for (uint32_t bits : {8u, 22u}) {
    auto b = Bytes(ValidHeader());
    StoreBE32(b, 20, bits);
    ExpectError(Parse(b), "cluster_bits");
  }
}

TEST(HeaderTest, HeaderLengthInvalid) {
  for (uint32_t len : {100u, 105u}) {
    auto b = Bytes(ValidHeader());
    StoreBE32(b, 100, len);
    ExpectError(Parse(b), "header_length");
  }
}

TEST(HeaderTest, L1TablePastEndOfFile) {
  Header h = ValidHeader();
  h.l1_table_offset = kFileSize;
  ExpectError(Parse(Bytes(h)), "L1 table");
}

TEST(HeaderTest, L1TableMisaligned) {
  Header h = ValidHeader();
  h.l1_table_offset = 0x30200;
  ExpectError(Parse(Bytes(h)), "not aligned");
}

TEST(HeaderTest, L1SizeHuge) {
  Header h = ValidHeader();
  h.l1_size = 0x7fffffff;
  ExpectError(Parse(Bytes(h)), "L1 table has");
}

TEST(HeaderTest, L1SizeTooSmallForVirtualSize) {
  Header h = ValidHeader();
  h.l1_size = 1;  // 1 GiB with 64 KiB clusters needs 2 L2 tables
  ExpectError(Parse(Bytes(h)), "too few");
}

TEST(HeaderTest, RefcountTableTooLarge) {
  Header h = ValidHeader();
  h.refcount_table_clusters = 1000;
  ExpectError(Parse(Bytes(h), 1ull << 40), "refcount table is");
}

TEST(HeaderTest, RefcountOrderTooLarge) {
  Header h = ValidHeader();
  h.refcount_order = 7;
  ExpectError(Parse(Bytes(h)), "refcount_order");
}

TEST(HeaderTest, UnknownIncompatibleBitIsNamed) {
  Header h = ValidHeader();
  h.incompatible_features = 1ull << 20;
  ExpectError(Parse(Bytes(h)), "bit 20");
  h.feature_names.push_back({kFeatureIncompatible, 20, "time travel"});
  auto r = Parse(Bytes(h));
  ExpectError(r, "'time travel' (bit 20)");
  EXPECT_TRUE(r.status().IsNotSupported());
}

// Legacy AES parses (read-only use: OpenImage); an unknown method is refused
// in QEMU's words.
TEST(HeaderTest, LegacyAesParsesUnknownMethodsRefused) {
  Header h = ValidHeader();
  h.crypt_method = kCryptAes;
  EXPECT_TRUE(Parse(Bytes(h)).ok());
  h.crypt_method = 3;
  auto r = Parse(Bytes(h));
  ExpectError(r, "Unsupported encryption method 3");
  EXPECT_TRUE(r.status().IsNotSupported());
}

// LUKS parses (the key is asked for at open) but needs its extension, inside
// the file and clear of the other metadata.
TEST(HeaderTest, LuksNeedsItsAreaClearOfMetadata) {
  Header h = ValidHeader();
  h.crypt_method = kCryptLuks;
  ExpectError(Parse(Bytes(h)), "without the encryption header extension");
  h.crypto = CryptoExtension{0x40000, 0x1000};
  auto r = Parse(Bytes(h));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  h.crypto = CryptoExtension{0, 0x1000};
  ExpectError(Parse(Bytes(h)), "overlaps the header cluster");
  h.crypto = CryptoExtension{h.l1_table_offset, 0x1000};
  ExpectError(Parse(Bytes(h)), "overlaps the L1 table");
  h.crypto = CryptoExtension{h.refcount_table_offset, 0x1000};
  ExpectError(Parse(Bytes(h)), "overlaps the refcount table");
  h.crypto = CryptoExtension{0x40000, 0};
  ExpectError(Parse(Bytes(h)), "encryption header is empty");
  h.crypto = CryptoExtension{0x40000, kFileSize};
  ExpectError(Parse(Bytes(h)), "past the end of the file");
}

TEST(HeaderTest, CompressionTypeMustMatchItsBit) {
  Header h = ValidHeader();
  h.compression_type = kCompressionZstd;
  ExpectError(Parse(Bytes(h)), "without the compression type bit");
  h.incompatible_features = kIncompatCompression;
  EXPECT_TRUE(Parse(Bytes(h)).ok());
  h.compression_type = 9;
  ExpectError(Parse(Bytes(h)), "unknown compression type 9");
}

TEST(HeaderTest, ExtendedL2NeedsLargeClusters) {
  Header h = ValidHeader();
  h.cluster_bits = 12;
  h.l1_size = 1024;
  h.l1_table_offset = 0x3000;
  h.refcount_table_offset = 0x1000;
  h.incompatible_features = kIncompatExtendedL2;
  ExpectError(Parse(Bytes(h)), "16 KiB");
}

TEST(HeaderTest, BackingFileNameTooLong) {
  auto b = Bytes(ValidHeader());
  StoreBE64(b, 8, 4096);
  StoreBE32(b, 16, 2000);
  ExpectError(Parse(b), "backing file name is 2000 bytes");
}

TEST(HeaderTest, TooManySnapshots) {
  Header h = ValidHeader();
  h.nb_snapshots = 1u << 20;
  h.snapshots_offset = 0x40000;
  ExpectError(Parse(Bytes(h)), "snapshots");
}

TEST(HeaderTest, SnapshotTablePastEndOfFile) {
  Header h = ValidHeader();
  h.nb_snapshots = 1;
  h.snapshots_offset = kFileSize;
  ExpectError(Parse(Bytes(h)), "snapshot table");
}

TEST(HeaderTest, ExtensionOverflowingTheClusterIsCorrupt) {
  auto b = Bytes(ValidHeader());
  // The first extension starts right after the 112-byte header.
  StoreBE32(b, 112 + 4, 1u << 30);
  ExpectError(Parse(b), "runs past the first cluster");
}

TEST(HeaderTest, DirtyAndCorruptBitsAreReported) {
  Header h = ValidHeader();
  h.incompatible_features = kIncompatDirty | kIncompatCorrupt;
  auto r = Parse(Bytes(h));
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->dirty());
  EXPECT_TRUE(r->corrupt());
}

}  // namespace
}  // namespace uq::qcow2

namespace uq::qcow2 {
namespace {

// Extensions QEMU refuses to open an image with (qcow2_read_extensions,
// qcow2_do_open), and the valid neighbours of each.
Header WithBitmaps(uint32_t nb, uint64_t dir_size, uint64_t dir_offset) {
  Header h = ValidHeader();
  h.autoclear_features = kAutoclearBitmaps;
  h.bitmaps = BitmapsExtension{nb, dir_size, dir_offset};
  return h;
}

TEST(HeaderExtensionTest, BitmapsExtensionFieldsAreChecked) {
  ASSERT_TRUE(Parse(Bytes(WithBitmaps(1, 40, 0x40000))).ok());
  ExpectError(Parse(Bytes(WithBitmaps(0, 40, 0x40000))), "no bitmaps");
  ExpectError(Parse(Bytes(WithBitmaps(1, 0, 0x40000))), "directory size is 0");
  ExpectError(Parse(Bytes(WithBitmaps(70000, 40, 0x40000))), "70000 bitmaps");
  ExpectError(Parse(Bytes(WithBitmaps(1, 40, 0x40200))), "not aligned");
  ExpectError(Parse(Bytes(WithBitmaps(1, 1ull << 40, 0x40000))), "at most");
  // The bitmaps extension is the first after the header's 112 bytes? Find it.
  std::vector<std::byte> b = Bytes(WithBitmaps(1, 40, 0x40000));
  size_t pos = 112;
  while (LoadBE32(b, pos) != kExtBitmaps) pos += 8 + ((LoadBE32(b, pos + 4) + 7) & ~7u);
  std::vector<std::byte> reserved = b;
  StoreBE32(std::span<std::byte>(reserved), pos + 12, 1);
  ExpectError(Parse(reserved), "reserved");
  std::vector<std::byte> short_ext = b;
  StoreBE32(std::span<std::byte>(short_ext), pos + 4, 16);
  ExpectError(Parse(short_ext), "not 24");
}

TEST(HeaderExtensionTest, StaleBitmapsExtensionIsIgnored) {
  // Autoclear bit clear: a program without bitmap support wrote the image;
  // QEMU ignores the extension whatever it says.
  Header h = WithBitmaps(0, 0, 0x12345);
  std::vector<std::byte> b = Bytes(h);
  StoreBE64(std::span<std::byte>(b), 88, 0);  // autoclear_features
  auto r = Parse(b);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->bitmaps.has_value());
}

TEST(HeaderExtensionTest, CryptoExtensionNeedsLuks) {
  Header h = ValidHeader();
  h.crypto = CryptoExtension{0x40000, 0x1000};
  ExpectError(Parse(Bytes(h)), "encryption header extension");
  h.crypt_method = kCryptLuks;
  auto r = ParseHeader(Bytes(h), kFileSize, "t.qcow2", /*allow_encrypted=*/true);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->crypto->offset, 0x40000u);
}

TEST(HeaderExtensionTest, DataFileRawNeedsADataFile) {
  Header h = ValidHeader();
  h.autoclear_features = kAutoclearDataFileRaw;
  // qemu-img info opens it; I/O (convert, check, the device) refuses it.
  auto r = Parse(Bytes(h));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  Status io = CheckHeaderForIo(*r, "t.qcow2");
  EXPECT_TRUE(io.IsCorruption()) << io.ToString();
  EXPECT_NE(io.message().find("t.qcow2: the data_file_raw bit"), std::string::npos);
  h.incompatible_features |= kIncompatDataFile;
  h.data_file = "d.raw";
  r = Parse(Bytes(h));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(CheckHeaderForIo(*r, "t.qcow2").ok());
}

TEST(HeaderExtensionTest, BackingFormatOf16BytesIsRefused) {
  Header h = ValidHeader();
  h.backing_file = "b.qcow2";
  h.backing_format = std::string(15, 'q');
  EXPECT_TRUE(Parse(Bytes(h)).ok());
  h.backing_format = std::string(16, 'q');
  ExpectError(Parse(Bytes(h)), "backing file format name");
}

// The backing file name is a C string (QEMU reads it so).
TEST(HeaderExtensionTest, BackingFileNameEndsAtNul) {
  Header h = ValidHeader();
  h.backing_file = std::string("base.raw\0junk", 13);
  auto r = Parse(Bytes(h));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->backing_file, "base.raw");
  h.backing_file = std::string("\0base.raw", 9);
  r = Parse(Bytes(h));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->backing_file, "");  // no backing file
}

TEST(HeaderExtensionTest, ExtensionRunningIntoTheBackingFileNameIsRefused) {
  Header h = ValidHeader();
  h.backing_file = "base.qcow2";
  std::vector<std::byte> b = Bytes(h);
  const uint64_t name_at = LoadBE64(b, 8);
  EXPECT_TRUE(Parse(b).ok());
  // Move the name into the feature name table (the first extension).
  StoreBE64(std::span<std::byte>(b), 8, 112 + 8 + 48);
  std::copy(b.begin() + name_at, b.begin() + name_at + 10, b.begin() + 112 + 8 + 48);
  ExpectError(Parse(b), "runs past the start of the backing file name");
}

}  // namespace
}  // namespace uq::qcow2
