#include "qcow2/bitmap_directory.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/endian.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "qcow2/format.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

using Bytes = std::vector<std::byte>;
using testing::MemEnv;

constexpr char kPath[] = "image.qcow2";
constexpr uint64_t kCluster = 64 << 10;
constexpr uint64_t kDirOffset = 4 * kCluster;
constexpr uint64_t kFileSize = 16 * kCluster;

BitmapDirEntry Entry(std::string name, uint8_t granularity_bits = 16, uint32_t flags = kBitmapAuto,
                     uint64_t table_offset = 5 * kCluster) {
  BitmapDirEntry e;
  e.name = std::move(name);
  e.table_offset = table_offset;
  e.table_size = 1;
  e.flags = flags;
  e.granularity_bits = granularity_bits;
  return e;
}

// A 64 MiB disk with 64 KiB clusters whose bitmaps extension names a directory
// of `bytes` at kDirOffset holding `nb_bitmaps` entries.
Header HeaderFor(const Bytes& bytes, uint32_t nb_bitmaps) {
  Header h;
  h.cluster_bits = 16;
  h.size = 64ull << 20;
  h.autoclear_features = kAutoclearBitmaps;
  h.bitmaps = BitmapsExtension{nb_bitmaps, bytes.size(), kDirOffset};
  return h;
}

Result<std::vector<BitmapDirEntry>> Parse(const Bytes& bytes, uint32_t nb_bitmaps,
                                          uint64_t file_size = kFileSize) {
  return ParseBitmapDirectory(bytes, HeaderFor(bytes, nb_bitmaps), file_size, kPath);
}

Result<std::vector<BitmapDirEntry>> ParseEntries(const std::vector<BitmapDirEntry>& entries) {
  return Parse(SerializeBitmapDirectory(entries), static_cast<uint32_t>(entries.size()));
}

// Parse fails with Corruption whose message contains `words`.
void ExpectCorrupt(const Result<std::vector<BitmapDirEntry>>& r, const std::string& words) {
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsCorruption()) << r.status().ToString();
  EXPECT_NE(r.status().ToString().find(words), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().ToString().find(kPath), std::string::npos) << r.status().ToString();
}

TEST(BitmapDirectoryTest, RoundTripsEntriesAndBytes) {
  std::vector<BitmapDirEntry> entries = {
      Entry("b0"), Entry("disabled", 9, 0, 6 * kCluster),
      Entry("in use and a longer name", 31, kBitmapInUse | kBitmapAuto, 7 * kCluster)};
  Bytes bytes = SerializeBitmapDirectory(entries);
  // 24 + 2 -> 32; 24 + 8 -> 32; 24 + 24 -> 48.
  ASSERT_EQ(bytes.size(), 32u + 32u + 48u);
  Result<std::vector<BitmapDirEntry>> parsed = Parse(bytes, 3);
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  ASSERT_EQ(parsed->size(), 3u);
  for (size_t i = 0; i < entries.size(); ++i) {
    EXPECT_EQ((*parsed)[i].name, entries[i].name);
    EXPECT_EQ((*parsed)[i].table_offset, entries[i].table_offset);
    EXPECT_EQ((*parsed)[i].table_size, entries[i].table_size);
    EXPECT_EQ((*parsed)[i].flags, entries[i].flags);
    EXPECT_EQ((*parsed)[i].granularity_bits, entries[i].granularity_bits);
    EXPECT_EQ((*parsed)[i].type, kBitmapTypeDirtyTracking);
    EXPECT_TRUE((*parsed)[i].extra_data.empty());
  }
  EXPECT_EQ((*parsed)[1].granularity(), 512u);
  EXPECT_FALSE((*parsed)[1].enabled());
  EXPECT_TRUE((*parsed)[2].in_use());
  EXPECT_EQ(SerializeBitmapDirectory(*parsed), bytes);
}

// The layout QEMU writes, byte for byte (taken from `qemu-img bitmap --add`).
TEST(BitmapDirectoryTest, MatchesQemuLayout) {
  Bytes bytes = SerializeBitmapDirectory(std::vector<BitmapDirEntry>{Entry("b0", 16, 2, 0x60000)});
  const uint8_t want[] = {0, 0,  0, 0, 0, 6, 0, 0, 0,   0,   0, 1, 0, 0, 0, 2,
                          1, 16, 0, 2, 0, 0, 0, 0, 'b', '0', 0, 0, 0, 0, 0, 0};
  ASSERT_EQ(bytes.size(), sizeof(want));
  for (size_t i = 0; i < sizeof(want); ++i) EXPECT_EQ(bytes[i], std::byte{want[i]}) << i;
}

TEST(BitmapDirectoryTest, EntryPastTheDirectory) {
  Bytes bytes = SerializeBitmapDirectory(std::vector<BitmapDirEntry>{Entry("b0"), Entry("b1")});
  bytes.resize(bytes.size() - 8);  // the second entry's name and padding cut short
  ExpectCorrupt(Parse(bytes, 2), "broken directory");
  bytes.resize(32 + 16);  // the second entry's fixed part cut short
  ExpectCorrupt(Parse(bytes, 2), "broken directory");
}

TEST(BitmapDirectoryTest, NameTooLong) {
  ASSERT_TRUE(ParseEntries({Entry(std::string(1023, 'n'))}).ok());
  ExpectCorrupt(ParseEntries({Entry(std::string(1024, 'n'))}), "name of 1024 bytes");
}

TEST(BitmapDirectoryTest, EmptyOrRepeatedName) {
  ExpectCorrupt(ParseEntries({Entry("")}), "empty name");
  ExpectCorrupt(ParseEntries({Entry("a"), Entry("b", 16, 2, 6 * kCluster), Entry("a")}),
                "two bitmaps are named 'a'");
}

TEST(BitmapDirectoryTest, GranularityRange) {
  EXPECT_TRUE(ParseEntries({Entry("min", 9)}).ok());
  EXPECT_TRUE(ParseEntries({Entry("max", 31)}).ok());
  ExpectCorrupt(ParseEntries({Entry("small", 8)}), "granularity_bits 8");
  ExpectCorrupt(ParseEntries({Entry("big", 32)}), "granularity_bits 32");
}

TEST(BitmapDirectoryTest, ReservedFlags) {
  ExpectCorrupt(ParseEntries({Entry("x", 16, kBitmapAuto | 4)}), "reserved flags set (0x4)");
  ExpectCorrupt(ParseEntries({Entry("x", 16, 0x80000000u)}), "reserved flags");
}

TEST(BitmapDirectoryTest, TypeOtherThanDirtyTracking) {
  BitmapDirEntry e = Entry("x");
  e.type = 2;
  ExpectCorrupt(ParseEntries({e}), "type 2");
}

TEST(BitmapDirectoryTest, CountMustEqualTheExtension) {
  Bytes bytes = SerializeBitmapDirectory(std::vector<BitmapDirEntry>{Entry("b0"), Entry("b1")});
  ExpectCorrupt(Parse(bytes, 1), "more bitmaps found");
  ExpectCorrupt(Parse(bytes, 3), "fewer bitmaps found (2)");
  EXPECT_TRUE(Parse(bytes, 2).ok());
}

TEST(BitmapDirectoryTest, BitmapTablePlace) {
  ExpectCorrupt(ParseEntries({Entry("x", 16, 2, 5 * kCluster + 512)}), "not cluster-aligned");
  ExpectCorrupt(ParseEntries({Entry("x", 16, 2, 0)}), "offset is 0");
  ExpectCorrupt(ParseEntries({Entry("x", 16, 2, kFileSize)}), "outside the file");
  BitmapDirEntry e = Entry("x");
  e.table_size = 0;
  ExpectCorrupt(ParseEntries({e}), "table size is 0");
  e.table_size = kMaxBitmapTableEntries + 1;
  ExpectCorrupt(ParseEntries({e}), "bitmap table of");
  // 8193 clusters of 64 KiB is over QEMU's 512 MiB of bitmap.
  e.table_size = 8193;
  e.table_offset = kCluster;
  ExpectCorrupt(Parse(SerializeBitmapDirectory(std::vector<BitmapDirEntry>{e}), 1, 1ull << 30),
                "bytes of bitmap");
  // A table that ends past the file.
  e.table_size = kCluster / 8;
  e.table_offset = kFileSize - kCluster;
  Bytes bytes = SerializeBitmapDirectory(std::vector<BitmapDirEntry>{e});
  EXPECT_TRUE(Parse(bytes, 1, kFileSize).ok());
  ExpectCorrupt(Parse(bytes, 1, kFileSize - 8), "outside the file");
}

// QEMU's rules alone (what qemu-img check applies): an empty or repeated name
// and a table outside the file pass; QEMU's own constraints still refuse.
TEST(BitmapDirectoryTest, QemuRulesLeaveTheSpecsMustsOut) {
  auto parse = [](const std::vector<BitmapDirEntry>& entries) {
    Bytes bytes = SerializeBitmapDirectory(entries);
    return ParseBitmapDirectory(bytes, HeaderFor(bytes, static_cast<uint32_t>(entries.size())),
                                kFileSize, kPath, BitmapDirectoryRules::kQemu);
  };
  Result<std::vector<BitmapDirEntry>> r =
      parse({Entry(""), Entry("a", 16, 2, 6 * kCluster), Entry("a", 16, 2, 100 * kCluster)});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ((*r)[0].name, "");
  EXPECT_EQ((*r)[2].table_offset, 100 * kCluster);
  ExpectCorrupt(parse({Entry("x", 16, 2, 5 * kCluster + 512)}), "not cluster-aligned");
  ExpectCorrupt(parse({Entry("x", 8)}), "granularity_bits 8");
  ExpectCorrupt(parse({Entry(std::string(1024, 'n'))}), "name of 1024 bytes");
}

// One 64 KiB cluster of bitmap at 512-byte granularity covers 256 MiB; a disk
// bigger than that needs a bigger table, unless the bitmap is in use (QEMU:
// possibly stale after a resize).
TEST(BitmapDirectoryTest, TableMustCoverTheDisk) {
  Bytes bytes = SerializeBitmapDirectory(std::vector<BitmapDirEntry>{Entry("x", 9)});
  Header h = HeaderFor(bytes, 1);
  h.size = 256ull << 20;
  EXPECT_TRUE(ParseBitmapDirectory(bytes, h, kFileSize, kPath).ok());
  h.size += 512;
  ExpectCorrupt(ParseBitmapDirectory(bytes, h, kFileSize, kPath), "too small for the virtual disk");
  bytes = SerializeBitmapDirectory(std::vector<BitmapDirEntry>{Entry("x", 9, kBitmapInUse)});
  EXPECT_TRUE(ParseBitmapDirectory(bytes, h, kFileSize, kPath).ok());
}

TEST(BitmapDirectoryTest, ExtraDataIsNotSupported) {
  BitmapDirEntry e = Entry("x");
  e.extra_data = Bytes(8, std::byte{1});
  Result<std::vector<BitmapDirEntry>> r = ParseEntries({e});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotSupported()) << r.status().ToString();
  // The serialiser writes it where the spec says: between the fixed part and the name.
  Bytes bytes = SerializeBitmapDirectory(std::vector<BitmapDirEntry>{e});
  ASSERT_EQ(bytes.size(), 40u);
  EXPECT_EQ(LoadBE32(bytes, 20), 8u);
  EXPECT_EQ(bytes[24], std::byte{1});
  EXPECT_EQ(bytes[32], std::byte{'x'});
}

// ReadBitmapDirectory on an in-memory file holding `dir` at kDirOffset.
struct ReadFixture {
  explicit ReadFixture(const Bytes& dir) {
    Bytes file(kFileSize);
    std::copy(dir.begin(), dir.end(), file.begin() + kDirOffset);
    env.SetContents(kPath, file);
    file_ = env.Open(kPath, OpenOptions{}).value();
  }
  Result<std::vector<BitmapDirEntry>> Read(const Header& h) {
    return BlockOn(ReadBitmapDirectory(*file_, h));
  }
  MemEnv env;
  std::unique_ptr<File> file_;
};

TEST(BitmapDirectoryTest, ReadsTheDirectoryTheHeaderNames) {
  Bytes dir = SerializeBitmapDirectory(std::vector<BitmapDirEntry>{Entry("b0"), Entry("b1", 20)});
  ReadFixture f(dir);
  Result<std::vector<BitmapDirEntry>> r = f.Read(HeaderFor(dir, 2));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[1].name, "b1");
  EXPECT_EQ((*r)[1].granularity(), 1u << 20);
}

// Without the autoclear bit the extension is stale: QEMU ignores it, so do we
// (the directory is not even read).
TEST(BitmapDirectoryTest, IgnoredWithoutTheAutoclearBit) {
  ReadFixture f(Bytes(64, std::byte{0xff}));
  Header h = HeaderFor(Bytes(64), 3);
  h.autoclear_features = 0;
  EXPECT_EQ(ActiveBitmapsExtension(h), nullptr);
  Result<std::vector<BitmapDirEntry>> r = f.Read(h);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->empty());
  h.bitmaps.reset();
  h.autoclear_features = kAutoclearBitmaps;
  EXPECT_TRUE(f.Read(h).value().empty());
}

TEST(BitmapDirectoryTest, DirectorySizeAndPlaceCheckedBeforeReading) {
  ReadFixture f(Bytes{});
  Header h = HeaderFor(Bytes{}, 1);
  ExpectCorrupt(f.Read(h), "directory size is 0");
  h.bitmaps->directory_size = kMaxBitmapDirectorySize + 8;
  ExpectCorrupt(f.Read(h), "at most");
  h.bitmaps->directory_size = kFileSize - kDirOffset + 8;
  ExpectCorrupt(f.Read(h), "outside the file");
  h.bitmaps->directory_offset = ~uint64_t{0} - 7;
  h.bitmaps->directory_size = 16;
  ExpectCorrupt(f.Read(h), "outside the file");
}

}  // namespace
}  // namespace uq::qcow2
