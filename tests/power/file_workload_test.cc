// The file workload's rules (file_workload.h): a run in a plain directory verifies clean at
// every mark, and each way a crash could damage a file is told apart: an older generation
// than the mark made durable (lost), a torn, truncated or foreign file (corrupt).
#include "tests/power/file_workload.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include "tests/power/block_pattern.h"

namespace uq::power {
namespace {

namespace fs = std::filesystem;

class FileWorkloadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    root_ = fs::path(tmp ? tmp : "/tmp") /
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(root_);
    fs::create_directories(root_ / "dir");
    dir_ = (root_ / "dir").string();
    journal_path_ = (root_ / "journal").string();
  }
  // Runs the workload; *snapshots[k]: the directory's copy when mark k was put.
  FileJournal Run(uint64_t ops, std::vector<fs::path>* snapshots = nullptr) {
    Status st = RunFileWorkload(dir_, journal_path_, ops, 7, [&](uint64_t k) {
      if (snapshots) {
        fs::path copy = root_ / ("m" + std::to_string(k));
        fs::copy(dir_, copy);
        snapshots->push_back(copy);
      }
      return Status::Ok();
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    Result<FileJournal> j = LoadFileJournal(journal_path_);
    EXPECT_TRUE(j.ok()) << j.status().ToString();
    return j.ok() ? *j : FileJournal{};
  }
  FileReport Verify(const FileJournal& j, int64_t mark, const std::string& dir) {
    Result<FileReport> r = VerifyFiles(j, mark, dir);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : FileReport{};
  }
  // The generation file `f` holds in the journal's last F operation on it before `ops`.
  static const FileOp* LastReplace(const FileJournal& j, uint64_t f, size_t ops) {
    const FileOp* last = nullptr;
    for (size_t i = 0; i < ops; ++i) {
      if (j.ops[i].kind == 'F' && j.ops[i].file == f) last = &j.ops[i];
    }
    return last;
  }
  static void WriteGen(const std::string& path, uint64_t f, uint64_t gen, uint64_t blocks) {
    std::vector<uint8_t> data(blocks * kBlockSize);
    for (uint64_t i = 0; i < blocks; ++i) {
      FillBlock(f * kFileStride + i, gen,
                std::span<uint8_t>(data.data() + i * kBlockSize, kBlockSize));
    }
    std::ofstream(path, std::ios::binary | std::ios::trunc)
        .write(reinterpret_cast<const char*>(data.data()), data.size());
  }

  fs::path root_;
  std::string dir_, journal_path_;
};

TEST_F(FileWorkloadTest, EveryMarkVerifiesCleanAsItWas) {
  std::vector<fs::path> snapshots;
  FileJournal j = Run(120, &snapshots);
  ASSERT_GT(j.marks.size(), 10u);
  ASSERT_EQ(snapshots.size(), j.marks.size());
  for (size_t k = 0; k < snapshots.size(); ++k) {
    FileReport r = Verify(j, static_cast<int64_t>(k), snapshots[k].string());
    EXPECT_EQ(r.lost + r.corrupt, 0u) << "mark " << k << ": " << r.examples.front();
    EXPECT_EQ(r.files_checked, 24u);
  }
  // Before the first mark nothing is durable: an empty directory and the state at m0 (which
  // the operations before it may have left) are both fine.
  FileReport empty = Verify(j, -1, (root_ / "nothing").string());
  EXPECT_EQ(empty.lost + empty.corrupt, 0u);
  EXPECT_EQ(Verify(j, -1, snapshots[0].string()).corrupt, 0u);
}

TEST_F(FileWorkloadTest, OlderGenerationIsLostDamageIsCorrupt) {
  FileJournal j = Run(120);
  const int64_t last = static_cast<int64_t>(j.marks.size()) - 1;
  ASSERT_EQ(Verify(j, last, dir_).lost, 0u);
  // A file replaced at least twice: put its older generation back.
  const FileOp* newest = nullptr;
  const FileOp* older = nullptr;
  for (uint64_t f = 0; f < 24 && older == nullptr; ++f) {
    newest = LastReplace(j, f, j.ops.size());
    if (newest == nullptr || !fs::exists(dir_ + "/f" + std::to_string(f))) continue;
    older = LastReplace(j, f, static_cast<size_t>(newest - j.ops.data()));
  }
  ASSERT_NE(older, nullptr);
  const std::string path = dir_ + "/f" + std::to_string(older->file);
  WriteGen(path, older->file, older->gen, older->blocks);
  FileReport r = Verify(j, last, dir_);
  EXPECT_EQ(r.lost, 1u);
  EXPECT_EQ(r.corrupt, 0u);

  // Torn: the newest generation with one block of the older one.
  WriteGen(path, newest->file, newest->gen, newest->blocks);
  ASSERT_EQ(Verify(j, last, dir_).lost, 0u);
  {
    std::vector<uint8_t> block(kBlockSize);
    FillBlock(older->file * kFileStride, older->gen, block);
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.write(reinterpret_cast<const char*>(block.data()), block.size());
  }
  r = Verify(j, last, dir_);
  EXPECT_EQ(r.corrupt, 1u) << "a mix of generations";
  // Truncated to a size no generation had, and a block of another file.
  WriteGen(path, newest->file, newest->gen, newest->blocks);
  fs::resize_file(path, newest->blocks * kBlockSize - 512);
  EXPECT_EQ(Verify(j, last, dir_).corrupt, 1u) << "a torn size";
  WriteGen(path, newest->file + 1, newest->gen, newest->blocks);
  EXPECT_EQ(Verify(j, last, dir_).corrupt, 1u) << "another file's blocks";
  // Missing where the mark made it durable: lost.
  fs::remove(path);
  EXPECT_EQ(Verify(j, last, dir_).lost, 1u);
}

TEST_F(FileWorkloadTest, BadJournalAndMarkAreErrors) {
  FileJournal j = Run(10);
  EXPECT_FALSE(VerifyFiles(j, static_cast<int64_t>(j.marks.size()), dir_).ok());
  std::ofstream(journal_path_, std::ios::trunc) << "F 1 0 4\nM 1\n";
  EXPECT_FALSE(LoadFileJournal(journal_path_).ok()) << "mark numbers start at 0";
  std::ofstream(journal_path_, std::ios::trunc) << "F 1 99 4\n";
  EXPECT_FALSE(LoadFileJournal(journal_path_).ok()) << "no such file";
  std::ofstream(journal_path_, std::ios::trunc) << "X 1\n";
  EXPECT_FALSE(LoadFileJournal(journal_path_).ok());
}

}  // namespace
}  // namespace uq::power
