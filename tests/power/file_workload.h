// file_workload: the power-failure test's second workload, files on a file system on the
// device (ext4 on /dev/ublkbN), and what a replayed crash state may hold of them.
//
// The writer keeps a few dozen files f<N> in one directory. It first fsyncs the directory
// and puts mark m0 (the file system is durable from then on). Each operation replaces one
// file atomically (a temporary file written and fsynced, renamed over f<N>) or unlinks it;
// some operations then fsync the directory and put a mark in the dm-log-writes log. The
// journal has one line per completed operation and per mark:
//   F <gen> <file> <blocks>   f<file> now holds generation gen: `blocks` 4 KiB blocks,
//                             block i filled by FillBlock(file * kFileStride + i, gen)
//   U <gen> <file>            f<file> was unlinked
//   M <k>                     the directory's fsync returned, then mark "m<k>": every
//                             operation before it is durable
// A state whose last writer mark is m<k> must show each file as it was at m<k> (absent if
// never written or unlinked) or as a later operation left it, whole: never an older
// generation (lost), never a mix of generations, a wrong size or foreign blocks (corrupt).
// Before m0 nothing is promised, not even a file system that mounts.
// Other names in the directory (a temporary file whose rename never landed) are allowed.
#ifndef UBLK_QCOW2_TESTS_POWER_FILE_WORKLOAD_H_
#define UBLK_QCOW2_TESTS_POWER_FILE_WORKLOAD_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/status.h"

namespace uq::power {

// Files' block indexes are file * kFileStride + i, so a block in the wrong file shows.
inline constexpr uint64_t kFileStride = 1 << 20;

struct FileOp {
  char kind;  // 'F' (replaced) or 'U' (unlinked)
  uint64_t gen, file, blocks;
};

struct FileJournal {
  std::vector<FileOp> ops;
  std::vector<uint64_t> marks;  // marks[k]: how many operations precede "m<k>"
};

// Runs `ops` operations on files in `dir` (seeded), appending to the journal at
// `journal_path`; `mark(k)` puts mark m<k> in the log. Returns the first failure.
Status RunFileWorkload(const std::string& dir, const std::string& journal_path, uint64_t ops,
                       uint64_t seed, const std::function<Status(uint64_t)>& mark);

Result<FileJournal> LoadFileJournal(const std::string& path);

struct FileReport {
  uint64_t files_checked = 0;
  uint64_t lost = 0;     // older than what m<k> made durable, or missing
  uint64_t corrupt = 0;  // torn, wrong size, foreign or never-written content
  std::vector<std::string> examples;
};

// Checks the files in `dir` (the mounted file system of a replayed state whose last writer
// mark is `mark`, -1 before the first) against the journal.
Result<FileReport> VerifyFiles(const FileJournal& journal, int64_t mark, const std::string& dir);

}  // namespace uq::power

#endif  // UBLK_QCOW2_TESTS_POWER_FILE_WORKLOAD_H_
