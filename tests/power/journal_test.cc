// What a replayed state may hold, by the journal's rules (journal.h).
#include "tests/power/journal.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <vector>

#include "tests/power/block_pattern.h"

namespace uq::power {
namespace {

std::string TempPath(const char* name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

// An 8-block raw image; blocks[i] < 0 means zeros, else the pattern of (i, gen).
std::string Raw(const std::vector<int>& gens, int torn_block = -1) {
  std::vector<uint8_t> data(gens.size() * kBlockSize);
  for (size_t i = 0; i < gens.size(); ++i) {
    if (gens[i] >= 0) {
      FillBlock(i, gens[i], std::span<uint8_t>(data.data() + i * kBlockSize, kBlockSize));
    }
  }
  if (torn_block >= 0) data[torn_block * kBlockSize + 2048] ^= 1;
  const std::string path = TempPath("raw");
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(data.data()), data.size());
  return path;
}

Journal Load(const std::string& text) {
  const std::string path = TempPath("journal");
  std::ofstream(path, std::ios::trunc) << text;
  Result<Journal> j = LoadJournal(path);
  EXPECT_TRUE(j.ok()) << j.status().ToString();
  return *j;
}

VerifyReport Verify(const Journal& j, int64_t mark, const std::string& raw) {
  Result<VerifyReport> r = VerifyRaw(j, mark, raw);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return *r;
}

// gen 1 writes blocks 0-1, flush (m0), gen 2 overwrites block 0, DSYNC gen 3 writes block 2
// (m1), gen 4 zeroes block 1, gen 5 discards block 3 (never written), flush (m2).
const char kJournal[] = "W 1 0 2\nM 0 0\nW 2 0 1\nW 3 2 1\nM 1 3\nZ 4 1 1\nD 5 3 1\nM 2 0\n";

TEST(JournalTest, AcceptsDurableAndLaterContent) {
  Journal j = Load(kJournal);
  // Before m0 anything written up to m0 or zeros.
  EXPECT_EQ(Verify(j, -1, Raw({-1, 1, -1, -1})).lost, 0u);
  // At m0: blocks 0-1 are durable with gen 1; block 0 may already hold gen 2.
  VerifyReport r = Verify(j, 0, Raw({2, 1, -1, -1}));
  EXPECT_EQ(r.lost + r.corrupt, 0u);
  EXPECT_EQ(r.blocks_checked, 4u);
  // At m1: block 2 (DSYNC gen 3) is durable; block 1 may be zeroed already.
  r = Verify(j, 1, Raw({1, -1, 3, -1}));
  EXPECT_EQ(r.lost + r.corrupt, 0u);
}

TEST(JournalTest, FindsLostFlushedWrites) {
  Journal j = Load(kJournal);
  VerifyReport r = Verify(j, 0, Raw({-1, 1, -1, -1}));  // block 0 lost gen 1
  EXPECT_EQ(r.lost, 1u);
  EXPECT_EQ(r.corrupt, 0u);
  r = Verify(j, 1, Raw({1, 1, -1, -1}));  // the DSYNC write to block 2 is gone
  EXPECT_EQ(r.lost, 1u);
  r = Verify(j, 2, Raw({1, 1, 3, -1}));  // block 0 went back to gen 1, block 1 not zeroed
  EXPECT_EQ(r.lost, 2u);
}

TEST(JournalTest, FindsTornMisplacedAndFutureBlocks) {
  Journal j = Load(kJournal);
  EXPECT_EQ(Verify(j, 0, Raw({1, 1, -1, -1}, 1)).corrupt, 1u);  // torn
  // Block 0 holding block 1's content is misplaced.
  std::vector<uint8_t> data(4 * kBlockSize);
  FillBlock(1, 1, std::span<uint8_t>(data.data(), kBlockSize));
  FillBlock(1, 1, std::span<uint8_t>(data.data() + kBlockSize, kBlockSize));
  const std::string path = TempPath("misplaced");
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(data.data()), data.size());
  EXPECT_EQ(Verify(j, 0, path).corrupt, 1u);
  // Before m0, gen 2 (issued after m0) cannot be on disk yet.
  EXPECT_EQ(Verify(j, -1, Raw({2, 1, -1, -1})).corrupt, 1u);
  // A discarded block may read zero or old data, but not data it never had.
  EXPECT_EQ(Verify(j, 2, Raw({2, -1, 3, 1})).corrupt, 1u);
}

}  // namespace
}  // namespace uq::power
