// Replays a hand-built dm-log-writes log (layout as in log_writes.h) and checks the target.
#include "tests/power/log_writes.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace uq::power {
namespace {

constexpr uint32_t kSector = 512;

void Put64(std::vector<uint8_t>& v, size_t at, uint64_t x) {
  for (int i = 0; i < 8; ++i) v[at + i] = static_cast<uint8_t>(x >> (8 * i));
}

class LogBuilder {
 public:
  LogBuilder() : log_(kSector) {}
  void Entry(uint64_t sector, uint64_t nr, uint64_t flags, const std::string& mark = "",
             uint8_t fill = 0) {
    size_t at = log_.size();
    log_.resize(at + kSector);
    Put64(log_, at, sector);
    Put64(log_, at + 8, nr);
    Put64(log_, at + 16, flags);
    Put64(log_, at + 24, mark.size());
    std::copy(mark.begin(), mark.end(), log_.begin() + at + 32);
    if (!(flags & kLogDiscard)) log_.resize(log_.size() + nr * kSector, fill);
    ++entries_;
  }
  std::string Write(const std::string& path) {
    Put64(log_, 0, 0x6a736677736872ULL);
    Put64(log_, 8, 1);
    Put64(log_, 16, entries_);
    Put64(log_, 24, kSector);  // u32 sectorsize, then padding
    int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
    EXPECT_EQ(::write(fd, log_.data(), log_.size()), static_cast<ssize_t>(log_.size()));
    ::close(fd);
    return path;
  }

 private:
  std::vector<uint8_t> log_;
  uint64_t entries_ = 0;
};

std::string TempPath(const char* name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::vector<uint8_t> v(16 * kSector);
  int fd = ::open(path.c_str(), O_RDONLY);
  EXPECT_EQ(::pread(fd, v.data(), v.size(), 0), static_cast<ssize_t>(v.size()));
  ::close(fd);
  return v;
}

TEST(LogWritesTest, ReadsEntriesAndAppliesThemIncrementally) {
  LogBuilder b;
  b.Entry(2, 3, 0, "", 0xaa);        // 0: write sectors 2-4
  b.Entry(0, 0, kLogFlush);          // 1: flush
  b.Entry(0, 0, kLogMark, "m0");     // 2: mark
  b.Entry(3, 1, kLogFua, "", 0xbb);  // 3: FUA write of sector 3
  b.Entry(2, 1, kLogDiscard);        // 4: discard sector 2 (no data in the log)
  b.Entry(8, 2, 0, "", 0xcc);        // 5: write sectors 8-9
  const std::string log_path = b.Write(TempPath("log"));
  const std::string target = TempPath("target");
  int fd = ::open(target.c_str(), O_CREAT | O_TRUNC | O_RDWR, 0600);
  ASSERT_EQ(::ftruncate(fd, 16 * kSector), 0);

  Result<LogReader> log = LogReader::Open(log_path);
  ASSERT_TRUE(log.ok()) << log.status().ToString();
  EXPECT_EQ(log->nr_entries(), 6u);
  EXPECT_EQ(log->sectorsize(), kSector);
  std::vector<LogEntry> seen;
  for (;;) {
    auto e = log->Next();
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    if (!e->has_value()) break;
    seen.push_back(**e);
    ASSERT_TRUE(log->Apply(**e, fd).ok());
    if (seen.size() == 3) {
      // After the mark: sectors 2-4 hold the first write.
      std::vector<uint8_t> v = ReadAll(target);
      EXPECT_EQ(v[2 * kSector], 0xaa);
      EXPECT_EQ(v[5 * kSector - 1], 0xaa);
      EXPECT_EQ(v[5 * kSector], 0);
    }
  }
  ASSERT_EQ(seen.size(), 6u);
  EXPECT_EQ(seen[2].mark, "m0");
  EXPECT_EQ(seen[1].flags, kLogFlush);
  EXPECT_EQ(seen[4].flags, kLogDiscard);
  std::vector<uint8_t> v = ReadAll(target);
  EXPECT_EQ(v[2 * kSector], 0);  // discarded
  EXPECT_EQ(v[3 * kSector], 0xbb);
  EXPECT_EQ(v[4 * kSector], 0xaa);
  EXPECT_EQ(v[8 * kSector], 0xcc);
  EXPECT_EQ(v[10 * kSector], 0);

  // Resuming at a recorded position reads the same entries as a full pass.
  Result<LogReader> again = LogReader::Open(log_path);
  ASSERT_TRUE(again.ok());
  again->Seek(4, seen[3].data_offset + kSector);
  auto e = again->Next();
  ASSERT_TRUE(e.ok() && e->has_value());
  EXPECT_EQ((*e)->index, 4u);
  EXPECT_EQ((*e)->flags, kLogDiscard);
  e = again->Next();
  ASSERT_TRUE(e.ok() && e->has_value());
  EXPECT_EQ((*e)->sector, 8u);
  ::close(fd);
}

TEST(LogWritesTest, RejectsWhatIsNotALog) {
  const std::string path = TempPath("notalog");
  int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
  std::vector<uint8_t> zeros(kSector);
  ASSERT_EQ(::write(fd, zeros.data(), zeros.size()), static_cast<ssize_t>(zeros.size()));
  ::close(fd);
  Result<LogReader> log = LogReader::Open(path);
  ASSERT_FALSE(log.ok());
  EXPECT_TRUE(log.status().IsCorruption());
}

}  // namespace
}  // namespace uq::power
