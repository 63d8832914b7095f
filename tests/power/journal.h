// journal: what the power-failure writer did and saw acknowledged, and what a replayed crash
// state may therefore hold.
//
// The writer appends one text line per acknowledged operation and per mark it put in the
// dm-log-writes log (each line is written after the operation returned, in issue order; the
// writer has one operation in flight at a time):
//   W <gen> <block> <count>   wrote blocks [block, block+count) with pattern generation gen
//   Z <gen> <block> <count>   BLKZEROOUT of those blocks
//   D <gen> <block> <count>   BLKDISCARD of those blocks (they read back zero or old data)
//   M <k> 0                   flush returned, then mark "m<k>": everything before is durable
//   M <k> <gen>               RWF_DSYNC write <gen> returned, then mark "m<k>": it is durable
// gen numbers the operations from 1. Marks are numbered from 0 without gaps.
//
// A state replayed up to a log entry whose last writer mark is m<k> must hold, for every
// block, the content of its last operation durable at m<k> or of an operation that followed
// it before mark m<k+1> (later ones cannot be in the log yet); a discard also allows zeros and
// any older content. Blocks never written read zero.
#ifndef UBLK_QCOW2_TESTS_POWER_JOURNAL_H_
#define UBLK_QCOW2_TESTS_POWER_JOURNAL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace uq::power {

struct JournalOp {
  char kind;  // 'W', 'Z', 'D'
  uint64_t gen, block, count;
};

struct JournalMark {
  uint64_t ops_before;  // how many operations precede the mark
  uint64_t dsync_gen;   // 0: a flush mark; else the DSYNC write it makes durable
};

struct Journal {
  std::vector<JournalOp> ops;
  std::vector<JournalMark> marks;  // marks[k] is "m<k>"
};

Result<Journal> LoadJournal(const std::string& path);

struct VerifyReport {
  uint64_t blocks_checked = 0;
  uint64_t lost = 0;     // valid content, but older than the durable one (or zero instead)
  uint64_t corrupt = 0;  // torn, misplaced, unknown or not-yet-written content
  std::vector<std::string> examples;  // the first few problems, one line each
};

// Checks every block of the raw image `raw_path` (the device's content in a replayed state)
// against what the journal allows at mark `mark` (-1: before the first mark).
Result<VerifyReport> VerifyRaw(const Journal& journal, int64_t mark, const std::string& raw_path);

}  // namespace uq::power

#endif  // UBLK_QCOW2_TESTS_POWER_JOURNAL_H_
