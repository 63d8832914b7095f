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

TEST(HeaderTest, EncryptionRefused) {
  Header h = ValidHeader();
  h.crypt_method = kCryptLuks;
  ExpectError(Parse(Bytes(h)), "encrypted images (LUKS)");
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
  ExpectError(Parse(b), "overflows");
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
