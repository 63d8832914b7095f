#include "qcow2/snapshot_table.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "base/endian.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

using Bytes = std::vector<std::byte>;
using testing::MemEnv;
using testing::MemEnvOptions;

constexpr char kPath[] = "image.qcow2";

// Forwards to a File and remembers the largest read, to show that a hostile
// table never makes the reader allocate or read much.
class ReadRecordingFile final : public File {
 public:
  explicit ReadRecordingFile(std::unique_ptr<File> inner) : inner_(std::move(inner)) {}
  Result<uint64_t> Size() override { return inner_->Size(); }
  Status Truncate(uint64_t size) override { return inner_->Truncate(size); }
  const std::string& path() const override { return inner_->path(); }
  bool Start(IoRequest& req) override {
    if (req.op == IoRequest::Op::kRead) {
      largest_read_ = std::max(largest_read_, req.length);
      ++reads_;
    }
    return inner_->Start(req);
  }
  uint64_t largest_read() const { return largest_read_; }
  int reads() const { return reads_; }

 private:
  std::unique_ptr<File> inner_;
  uint64_t largest_read_ = 0;
  int reads_ = 0;
};

// An in-memory file holding `bytes`, and the table read from it.
struct Fixture {
  explicit Fixture(const Bytes& bytes, MemEnvOptions options = {}) : env(options) {
    env.SetContents(kPath, bytes);
    Result<std::unique_ptr<File>> f = env.Open(kPath, OpenOptions{});
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    file = std::make_unique<ReadRecordingFile>(std::move(f).value());
  }
  Result<std::vector<Snapshot>> Read(uint64_t offset, uint32_t count, int version = 3) {
    uint64_t size = env.FileSize(kPath).value();
    if (env.deferred()) {
      return BlockOn(ReadSnapshotTable(*file, offset, count, size, version), &env);
    }
    return BlockOn(ReadSnapshotTable(*file, offset, count, size, version));
  }
  MemEnv env;
  std::unique_ptr<ReadRecordingFile> file;
};

Bytes Slice(const Bytes& b, uint64_t offset, uint64_t size) {
  return Bytes(b.begin() + offset, b.begin() + offset + size);
}

// A table at `offset` in an otherwise zero file of `file_size` bytes.
Bytes FileWithTable(const Bytes& table, uint64_t offset, uint64_t file_size = 0) {
  Bytes file(std::max<uint64_t>(file_size, offset + table.size()));
  std::copy(table.begin(), table.end(), file.begin() + offset);
  return file;
}

Bytes ExtraBytes(size_t n, uint8_t seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<std::byte>(seed + i * 7);
  return b;
}

// A table exercising every shape of extra data.
std::vector<Snapshot> VariedTable() {
  std::vector<Snapshot> t;
  Snapshot old;  // a pre-extra-data entry: 32-bit VM state size only
  old.l1_table_offset = 0x30000;
  old.l1_size = 1;
  old.id = "1";
  old.name = "old";
  old.date_sec = 1000;
  old.date_nsec = 5;
  old.vm_clock_nsec = 77;
  old.vm_state_size = 0x12345678;
  t.push_back(old);

  Snapshot eight;  // only the 64-bit VM state size
  eight.l1_table_offset = 0x40000;
  eight.l1_size = 2;
  eight.id = "22";
  eight.name = "eight bytes of extra";
  eight.vm_state_size = 0x1'0000'0001ull;  // > 32 bits: the legacy field reads 0
  eight.extra_data = ExtraBytes(8, 0);
  t.push_back(eight);

  Snapshot v3;  // QEMU's current shape
  v3.l1_table_offset = 0x50000;
  v3.l1_size = 16;
  v3.id = "333";
  v3.name = "s";
  v3.date_sec = 0xfffffff0;
  v3.date_nsec = 999999999;
  v3.vm_clock_nsec = 0x0123456789abcdefull;
  v3.vm_state_size = 4096;
  v3.disk_size = 1ull << 40;
  v3.icount = -1;
  v3.extra_data = ExtraBytes(24, 1);
  t.push_back(v3);

  Snapshot future;  // unknown extra data after the known fields
  future.l1_table_offset = 0x60000;
  future.l1_size = 3;
  future.id = "4444";
  future.name = std::string("with\0nul and \xff bytes", 21);
  future.disk_size = 1 << 20;
  future.icount = 123456789;
  future.extra_data = ExtraBytes(37, 9);
  t.push_back(future);

  Snapshot empty;  // empty id and name, 16 bytes of extra data
  empty.disk_size = 0;
  empty.extra_data = ExtraBytes(16, 3);
  t.push_back(empty);
  return t;
}

// Serialising overwrites the known fields in extra_data; what reading back
// must produce is that, not the raw test bytes.
void ExpectSameSnapshot(const Snapshot& a, const Snapshot& b) {
  EXPECT_EQ(a.l1_table_offset, b.l1_table_offset);
  EXPECT_EQ(a.l1_size, b.l1_size);
  EXPECT_EQ(a.id, b.id);
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.date_sec, b.date_sec);
  EXPECT_EQ(a.date_nsec, b.date_nsec);
  EXPECT_EQ(a.vm_clock_nsec, b.vm_clock_nsec);
  EXPECT_EQ(a.vm_state_size, b.vm_state_size);
  EXPECT_EQ(a.disk_size, b.disk_size);
  EXPECT_EQ(a.icount, b.icount);
  EXPECT_EQ(a.extra_data.size(), b.extra_data.size());
}

TEST(SnapshotTableTest, SyntheticTableRoundTrips) {
  std::vector<Snapshot> table = VariedTable();
  ASSERT_TRUE(ValidateSnapshotTableForWrite(table).ok());
  Bytes bytes = SerializeSnapshotTable(table);
  EXPECT_EQ(bytes.size(), SnapshotTableSize(table));

  for (auto completion :
       {MemEnvOptions::Completion::kSynchronous, MemEnvOptions::Completion::kDeferred}) {
    MemEnvOptions options;
    options.completion = completion;
    Fixture fx(FileWithTable(bytes, 0x20000, 0x70000), options);
    Result<std::vector<Snapshot>> read = fx.Read(0x20000, table.size());
    ASSERT_TRUE(read.ok()) << read.status().ToString();
    ASSERT_EQ(read->size(), table.size());
    for (size_t i = 0; i < table.size(); ++i) {
      SCOPED_TRACE(i);
      ExpectSameSnapshot((*read)[i], table[i]);
    }
    EXPECT_EQ(SerializeSnapshotTable(*read), bytes);
    EXPECT_EQ(fx.file->reads(), 1);  // one window holds the whole table
  }
}

TEST(SnapshotTableTest, DecodesFieldsFromTheRightPlaces) {
  Fixture fx(FileWithTable(SerializeSnapshotTable(VariedTable()), 512));
  Result<std::vector<Snapshot>> read = fx.Read(512, 5, 2);
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  const std::vector<Snapshot>& t = *read;
  EXPECT_EQ(t[0].vm_state_size, 0x12345678u);  // from the 32-bit field
  EXPECT_FALSE(t[0].disk_size.has_value());
  EXPECT_FALSE(t[0].icount.has_value());
  EXPECT_TRUE(t[0].extra_data.empty());
  EXPECT_EQ(t[1].vm_state_size, 0x100000001ull);  // from the extra data
  EXPECT_FALSE(t[1].disk_size.has_value());
  EXPECT_EQ(t[2].disk_size, 1ull << 40);
  EXPECT_EQ(t[2].icount, -1);
  EXPECT_EQ(t[3].name, std::string("with\0nul and \xff bytes", 21));
  EXPECT_EQ(t[3].icount, 123456789);
  // Unknown extra data is kept verbatim.
  Bytes tail = ExtraBytes(37, 9);
  EXPECT_EQ(Slice(t[3].extra_data, 24, 13), Slice(tail, 24, 13));
  EXPECT_EQ(t[4].id, "");
  EXPECT_EQ(t[4].name, "");
  EXPECT_EQ(t[4].disk_size, 0u);
}

TEST(SnapshotTableTest, SerializeLaysOutEntriesOnEightByteBoundaries) {
  std::vector<Snapshot> t(2);
  t[0].id = "1";
  t[0].name = "abc";  // 40 + 0 + 1 + 3 = 44 bytes, padded to 48
  t[1].id = "2";
  t[1].name = "d";
  Bytes b = SerializeSnapshotTable(t);
  ASSERT_EQ(b.size(), 48u + 42u);  // no padding after the last entry
  EXPECT_EQ(LoadBE16(b, 12), 1);
  EXPECT_EQ(LoadBE16(b, 14), 3);
  EXPECT_EQ(static_cast<char>(b[40]), '1');
  EXPECT_EQ(static_cast<char>(b[43]), 'c');
  EXPECT_EQ(Slice(b, 44, 4), Bytes(4));
  EXPECT_EQ(static_cast<char>(b[88]), '2');
}

TEST(SnapshotTableTest, SerializeGrowsExtraDataForTheFieldsSet) {
  Snapshot s;
  s.id = "1";
  s.vm_state_size = 5ull << 32;
  Bytes b = SerializeSnapshotTable({s});
  EXPECT_EQ(LoadBE32(b, 32), 0u);  // does not fit the legacy field
  EXPECT_EQ(LoadBE32(b, 36), 8u);
  EXPECT_EQ(LoadBE64(b, 40), 5ull << 32);

  s.disk_size = 1 << 30;
  b = SerializeSnapshotTable({s});
  EXPECT_EQ(LoadBE32(b, 36), 16u);
  EXPECT_EQ(LoadBE64(b, 48), 1u << 30);

  s.icount = -1;
  b = SerializeSnapshotTable({s});
  EXPECT_EQ(LoadBE32(b, 36), 24u);
  EXPECT_EQ(LoadBE64(b, 56), ~0ull);
}

TEST(SnapshotTableTest, EmptyTableReadsNothing) {
  Fixture fx(Bytes(4096));
  Result<std::vector<Snapshot>> read = fx.Read(0, 0);
  ASSERT_TRUE(read.ok());
  EXPECT_TRUE(read->empty());
  EXPECT_EQ(fx.file->reads(), 0);
  EXPECT_TRUE(SerializeSnapshotTable({}).empty());
}

TEST(SnapshotTableTest, UnknownVersionIsInvalidArgument) {
  Fixture fx(SerializeSnapshotTable(VariedTable()));
  Result<std::vector<Snapshot>> read = fx.Read(0, 5, 4);
  ASSERT_FALSE(read.ok());
  EXPECT_TRUE(read.status().IsInvalidArgument()) << read.status().ToString();
}

// --- Malformed tables -------------------------------------------------------

void ExpectCorruption(const Result<std::vector<Snapshot>>& r,
                      std::initializer_list<std::string> words) {
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsCorruption()) << r.status().ToString();
  for (const std::string& w : words) {
    EXPECT_NE(r.status().message().find(w), std::string::npos)
        << "'" << w << "' not in: " << r.status().ToString();
  }
}

TEST(SnapshotTableTest, TooManySnapshots) {
  Fixture fx(Bytes(1 << 20));
  Result<std::vector<Snapshot>> r = fx.Read(0, 65537);
  ExpectCorruption(r, {kPath, "65537 snapshots"});
  EXPECT_EQ(fx.file->reads(), 0);
  r = fx.Read(0, 0xffffffffu);
  ExpectCorruption(r, {"4294967295 snapshots"});
}

TEST(SnapshotTableTest, CountThatCannotFitInTheFile) {
  Fixture fx(Bytes(1 << 20));
  Result<std::vector<Snapshot>> r = fx.Read(4096, 65536);
  ExpectCorruption(r, {"cannot hold 65536 snapshots"});
  EXPECT_EQ(fx.file->reads(), 0);
  r = fx.Read(2 << 20, 1);  // table offset past the end
  ExpectCorruption(r, {"cannot hold 1 snapshots"});
}

// A table of a few entries costs a small read, not a 256 KiB window, through
// both readers (a big buffer per open is what made the fuzz targets slow);
// a big table still costs few reads (the window doubles up to 256 KiB).
TEST(SnapshotTableTest, WindowGrowsFromSmall) {
  const std::vector<Snapshot> table = VariedTable();
  Bytes bytes = SerializeSnapshotTable(table);
  ASSERT_LT(bytes.size(), 4096u);
  Fixture fx(FileWithTable(bytes, 0x20000, 0x70000));
  ASSERT_TRUE(fx.Read(0x20000, table.size()).ok());
  EXPECT_EQ(fx.file->reads(), 1);
  EXPECT_LE(fx.file->largest_read(), 4096u);

  // check's reader, which has no limit but the count.
  Fixture fx2(FileWithTable(bytes, 0x20000, 0x70000));
  Result<SnapshotTableScan> scan =
      BlockOn(ReadSnapshotTableForCheck(*fx2.file, 0x20000, table.size()));
  ASSERT_TRUE(scan.ok()) << scan.status().ToString();
  EXPECT_EQ(scan->snapshots.size(), table.size());
  EXPECT_EQ(fx2.file->reads(), 1);
  EXPECT_LE(fx2.file->largest_read(), 4096u);

  // 65536 entries of zeros past the end of the file (2.5 MiB): windows of
  // 4, 8, ... 256 KiB, then 256 KiB each: 16 reads (11 with 256 KiB
  // windows throughout).
  Fixture fx3(Bytes(512));
  scan = BlockOn(ReadSnapshotTableForCheck(*fx3.file, 0, kMaxSnapshotCount));
  ASSERT_TRUE(scan.ok()) << scan.status().ToString();
  EXPECT_EQ(scan->snapshots.size(), kMaxSnapshotCount);
  EXPECT_LE(fx3.file->largest_read(), 256u << 10);
  EXPECT_LE(fx3.file->reads(), 16);
}

TEST(SnapshotTableTest, HugeExtraDataSize) {
  Bytes table = SerializeSnapshotTable(VariedTable());
  // Entry 0 is 40 + 0 + 1 + 3 = 44 bytes; entry 1 starts at 48.
  StoreBE32(table, 48 + 36, 0xffffffffu);
  Fixture fx(FileWithTable(table, 0, 1 << 20));
  ExpectCorruption(fx.Read(0, 5), {"entry 1 of 5", "extra_data_size", "4294967295"});
  EXPECT_LE(fx.file->largest_read(), 256u << 10);

  StoreBE32(table, 48 + 36, 1025);  // just over QEMU's limit
  Fixture fx2(FileWithTable(table, 0, 1 << 20));
  ExpectCorruption(fx2.Read(0, 5), {"entry 1 of 5", "extra_data_size", "1025"});
}

TEST(SnapshotTableTest, EntryPastTheEndOfTheFile) {
  Bytes table = SerializeSnapshotTable(VariedTable());
  // The file ends right after entry 0 (44 bytes), but the header claims 5.
  Fixture fx(Slice(table, 0, 44));
  Result<std::vector<Snapshot>> r = fx.Read(0, 1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  Fixture fx2(Slice(table, 0, 200));  // 200 >= 5 * 40, so the count check passes
  ExpectCorruption(fx2.Read(0, 5), {"entry 3 of 5", "fixed part", "past the end of the file"});
}

TEST(SnapshotTableTest, ExtraDataIdOrNamePastTheEndOfTheFile) {
  Snapshot s;
  s.id = "12";
  s.name = "name";
  s.disk_size = 1;
  Bytes one = SerializeSnapshotTable({s});  // 40 + 16 + 2 + 4 = 62 bytes
  ASSERT_EQ(one.size(), 62u);
  {
    Fixture fx(Slice(one, 0, 61));
    ExpectCorruption(fx.Read(0, 1), {"entry 0 of 1", "name (4 bytes at offset 58)",
                                     "past the end of the file (61 bytes)"});
  }
  {
    Fixture fx(Slice(one, 0, 57));
    ExpectCorruption(fx.Read(0, 1), {"entry 0 of 1", "id (2 bytes at offset 56)"});
  }
  {
    Fixture fx(Slice(one, 0, 50));
    ExpectCorruption(fx.Read(0, 1), {"extra data (16 bytes at offset 40)"});
  }
  {
    // A name size of 65535 in a small file: refused before any read of it.
    Bytes b = one;
    StoreBE16(b, 14, 0xffff);
    Fixture fx(b);
    ExpectCorruption(fx.Read(0, 1), {"name (65535 bytes"});
    EXPECT_LE(fx.file->largest_read(), 62u);
  }
}

TEST(SnapshotTableTest, TableLargerThanQemuAllows) {
  // Entries of 40 + 1024 + 65535 + 65535 bytes: 508 of them pass 64 MiB.
  Snapshot big;
  big.id.assign(65535, 'i');
  big.name.assign(65535, 'n');
  big.extra_data = ExtraBytes(1024, 0);
  Bytes entry = SerializeSnapshotTable({big});
  const uint64_t stride = (entry.size() + 7) / 8 * 8;
  const uint32_t count = 600;
  Bytes file(stride * count);
  for (uint32_t i = 0; i < count; ++i)
    std::copy(entry.begin(), entry.end(), file.begin() + i * stride);
  Fixture fx(file);
  ExpectCorruption(fx.Read(0, count), {"entry 507 of 600", "grows past 67108864 bytes"});
  EXPECT_LE(fx.file->largest_read(), 256u << 10);

  std::vector<Snapshot> too_many(508, big);
  Status s = ValidateSnapshotTableForWrite(too_many);
  EXPECT_TRUE(s.IsNoSpace()) << s.ToString();
  too_many.resize(507);
  EXPECT_TRUE(ValidateSnapshotTableForWrite(too_many).ok());
}

TEST(SnapshotTableTest, ShortReadIsCorruptionNotACrash) {
  // The caller's file size is stale: the file is shorter than it claims.
  Bytes table = SerializeSnapshotTable(VariedTable());
  Fixture fx(Slice(table, 0, 100));
  Result<std::vector<Snapshot>> r = BlockOn(ReadSnapshotTable(*fx.file, 0, 5, table.size(), 3));
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsCorruption()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("snapshot table entry"), std::string::npos);
}

TEST(SnapshotTableTest, ValidateForWrite) {
  std::vector<Snapshot> t(1);
  t[0].name.assign(65536, 'x');
  Status s = ValidateSnapshotTableForWrite(t);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("name is 65536 bytes"), std::string::npos) << s.ToString();
  t[0].name = "ok";
  t[0].id.assign(70000, '1');
  EXPECT_TRUE(ValidateSnapshotTableForWrite(t).IsInvalidArgument());
  t[0].id = "1";
  t[0].extra_data.resize(1025);
  EXPECT_TRUE(ValidateSnapshotTableForWrite(t).IsInvalidArgument());
  t[0].extra_data.resize(1024);
  EXPECT_TRUE(ValidateSnapshotTableForWrite(t).ok());
  EXPECT_TRUE(ValidateSnapshotTableForWrite(std::vector<Snapshot>(65537)).IsNoSpace());
}

TEST(SnapshotTableTest, ValidateL1Table) {
  Snapshot s;
  s.id = "7";
  s.l1_table_offset = 0x30000;
  s.l1_size = 4;
  EXPECT_TRUE(ValidateSnapshotL1Table(s, 0, 65536, 0x40000).ok());
  Status st = ValidateSnapshotL1Table(s, 2, 65536, 0x30010);
  EXPECT_TRUE(st.IsCorruption());
  EXPECT_NE(st.message().find("entry 2 (id '7')"), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find("past the end"), std::string::npos) << st.ToString();
  s.l1_table_offset = 0x30200;
  st = ValidateSnapshotL1Table(s, 0, 65536, 1 << 30);
  EXPECT_NE(st.message().find("not aligned"), std::string::npos) << st.ToString();
  s.l1_table_offset = 0x30000;
  s.l1_size = (32 << 20) / 8 + 1;
  st = ValidateSnapshotL1Table(s, 0, 65536, 1ull << 40);
  EXPECT_NE(st.message().find("at most"), std::string::npos) << st.ToString();
}

TEST(SnapshotTableTest, IncompleteExtraData) {
  std::vector<Snapshot> t = VariedTable();
  EXPECT_TRUE(HasIncompleteExtraData(t[0], 3));
  EXPECT_TRUE(HasIncompleteExtraData(t[1], 3));
  EXPECT_FALSE(HasIncompleteExtraData(t[1], 2));
  EXPECT_FALSE(HasIncompleteExtraData(t[2], 3));
}

// Mirrors SnapshotInfo (qcow2/image_info.h, in a target this test cannot use).
struct InfoLike {
  std::string id;
  std::string name;
  uint64_t vm_state_size = 0;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  int64_t icount = -1;
  uint64_t disk_size = 0;
};

TEST(SnapshotTableTest, ToSnapshotInfo) {
  std::vector<Snapshot> t = VariedTable();
  InfoLike a = ToSnapshotInfo<InfoLike>(t[0], 999);
  EXPECT_EQ(a.id, "1");
  EXPECT_EQ(a.name, "old");
  EXPECT_EQ(a.vm_state_size, 0x12345678u);
  EXPECT_EQ(a.date_sec, 1000u);
  EXPECT_EQ(a.date_nsec, 5u);
  EXPECT_EQ(a.vm_clock_nsec, 77u);
  EXPECT_EQ(a.icount, -1);
  EXPECT_EQ(a.disk_size, 999u);  // not recorded: the current size
  InfoLike d = ToSnapshotInfo<InfoLike>(t[3], 999);
  EXPECT_EQ(d.icount, 123456789);
  EXPECT_EQ(d.disk_size, 1u << 20);
}

// --- Tables written by qemu-img ---------------------------------------------

std::string TempDir() {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/snapshot_table_test.XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) return "";
  return buf.data();
}

void Run(const std::string& cmd) { ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd; }

struct QemuImage {
  Bytes bytes;
  std::vector<std::string> names;
};

// Creates a 1 MiB image with qemu-img and takes snapshots named `names`.
QemuImage MakeQemuImage(const std::string& compat, std::vector<std::string> names) {
  QemuImage out;
  EXPECT_EQ(std::system("qemu-img --version >/dev/null 2>&1"), 0)
      << "qemu-img is required for this test and was not found";
  std::string dir = TempDir();
  EXPECT_FALSE(dir.empty());
  std::string img = dir + "/x.qcow2";
  Run(fmt::format("qemu-img create -q -f qcow2 -o compat={} '{}' 1M", compat, img));
  // Some data, so the snapshots share clusters.
  Run(fmt::format("qemu-io -c 'write -P 0x5a 0 128k' '{}' >/dev/null 2>&1 || true", img));
  for (const std::string& n : names) Run(fmt::format("qemu-img snapshot -c '{}' '{}'", n, img));
  MemEnv env;
  Status s = env.ImportFromHostFile(img, kPath);
  EXPECT_TRUE(s.ok()) << s.ToString();
  out.bytes = env.Contents(kPath);
  out.names = std::move(names);
  Run(fmt::format("rm -rf '{}'", dir));
  return out;
}

void CheckQemuTable(const QemuImage& image, int version) {
  const Bytes& b = image.bytes;
  ASSERT_GE(b.size(), 72u);
  ASSERT_EQ(LoadBE32(b, 4), static_cast<uint32_t>(version));
  const uint32_t count = LoadBE32(b, 60);
  const uint64_t offset = LoadBE64(b, 64);
  const uint64_t cluster_size = uint64_t{1} << LoadBE32(b, 20);
  const uint64_t virtual_size = LoadBE64(b, 24);
  ASSERT_EQ(count, image.names.size());

  Fixture fx(b);
  Result<std::vector<Snapshot>> read = fx.Read(offset, count, version);
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  ASSERT_EQ(read->size(), count);
  for (uint32_t i = 0; i < count; ++i) {
    SCOPED_TRACE(i);
    const Snapshot& s = (*read)[i];
    EXPECT_EQ(s.id, std::to_string(i + 1));
    EXPECT_EQ(s.name, image.names[i]);
    EXPECT_EQ(s.vm_state_size, 0u);
    EXPECT_GT(s.date_sec, 1500000000u);  // taken just now
    EXPECT_LT(s.date_nsec, 1000000000u);
    EXPECT_GE(s.extra_data.size(), 16u);  // QEMU always writes disk_size
    EXPECT_EQ(s.disk_size, virtual_size);
    EXPECT_FALSE(HasIncompleteExtraData(s, version));
    EXPECT_GE(s.l1_size, 1u);
    Status l1 = ValidateSnapshotL1Table(s, i, cluster_size, b.size());
    EXPECT_TRUE(l1.ok()) << l1.ToString();
  }
  // Byte for byte what qemu-img wrote.
  Bytes again = SerializeSnapshotTable(*read);
  ASSERT_EQ(again.size(), SnapshotTableSize(*read));
  ASSERT_LE(offset + again.size(), b.size());
  EXPECT_EQ(again, Slice(b, offset, again.size()));
}

TEST(SnapshotTableTest, FindSnapshotAsQemu) {
  // QEMU's find_snapshot_by_id_and_name: every field given must match; the
  // first match wins; a ref naming nothing matches nothing.
  std::vector<Snapshot> snaps(3);
  snaps[0].id = "1";
  snaps[0].name = "s1";
  snaps[1].id = "2";
  snaps[1].name = "1";
  snaps[2].id = "3";
  snaps[2].name = "s1";
  EXPECT_EQ(FindSnapshot(snaps, {"1", std::nullopt}), 0u);
  EXPECT_EQ(FindSnapshot(snaps, {std::nullopt, "1"}), 1u);
  EXPECT_EQ(FindSnapshot(snaps, {std::nullopt, "s1"}), 0u);
  EXPECT_EQ(FindSnapshot(snaps, {"3", "s1"}), 2u);
  EXPECT_EQ(FindSnapshot(snaps, {"2", "s1"}), std::nullopt);
  EXPECT_EQ(FindSnapshot(snaps, {"9", std::nullopt}), std::nullopt);
  EXPECT_EQ(FindSnapshot(snaps, {}), std::nullopt);
}

TEST(SnapshotTableQemuTest, V3TableFromQemuImg) {
  QemuImage image = MakeQemuImage("1.1", {"s1", "s2", "a longer snapshot name", "x"});
  CheckQemuTable(image, 3);
}

TEST(SnapshotTableQemuTest, V2TableFromQemuImg) {
  QemuImage image = MakeQemuImage("0.10", {"s1", "second"});
  CheckQemuTable(image, 2);
}

}  // namespace
}  // namespace uq::qcow2
