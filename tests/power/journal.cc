#include "tests/power/journal.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <unordered_map>

#include "tests/power/block_pattern.h"

namespace uq::power {

Result<Journal> LoadJournal(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::IoError(path + ": cannot open journal", errno);
  Journal j;
  std::string line;
  uint64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    std::istringstream s(line);
    char kind = 0;
    s >> kind;
    if (kind == 'W' || kind == 'Z' || kind == 'D') {
      JournalOp op{kind, 0, 0, 0};
      if (!(s >> op.gen >> op.block >> op.count) || op.gen != j.ops.size() + 1) {
        return Status::Corruption(path + ": bad operation at line " + std::to_string(lineno));
      }
      j.ops.push_back(op);
    } else if (kind == 'M') {
      uint64_t k = 0, gen = 0;
      if (!(s >> k >> gen) || k != j.marks.size()) {
        return Status::Corruption(path + ": bad mark at line " + std::to_string(lineno));
      }
      j.marks.push_back({j.ops.size(), gen});
    } else {
      return Status::Corruption(path + ": unknown line " + std::to_string(lineno));
    }
  }
  return j;
}

namespace {

struct History {
  std::vector<const JournalOp*> ops;  // operations on this block in the window, in order
  int64_t durable = -1;               // index into ops of the last durable one
};

// Whether `c` is an allowed content of block `b` with history `h`.
bool Allowed(const History& h, const BlockContent& c) {
  const size_t start = h.durable < 0 ? 0 : static_cast<size_t>(h.durable);
  bool zero_ok = h.durable < 0;
  std::set<uint64_t> gens;
  for (size_t i = start; i < h.ops.size(); ++i) {
    const JournalOp* op = h.ops[i];
    if (op->kind == 'W') gens.insert(op->gen);
    if (op->kind == 'Z') zero_ok = true;
    if (op->kind == 'D') {
      zero_ok = true;
      for (size_t e = 0; e < i; ++e) {
        if (h.ops[e]->kind == 'W') gens.insert(h.ops[e]->gen);
      }
    }
  }
  if (c.kind == BlockContent::kZero) return zero_ok;
  return c.kind == BlockContent::kValid && gens.count(c.gen) != 0;
}

}  // namespace

Result<VerifyReport> VerifyRaw(const Journal& journal, int64_t mark, const std::string& raw_path) {
  if (mark >= static_cast<int64_t>(journal.marks.size())) {
    return Status::InvalidArgument("mark m" + std::to_string(mark) + " is not in the journal");
  }
  // Operations issued before the next mark are the only ones that can be in the log.
  const uint64_t window_end = mark + 1 < static_cast<int64_t>(journal.marks.size())
                                  ? journal.marks[mark + 1].ops_before
                                  : journal.ops.size();
  std::unordered_map<uint64_t, History> blocks;
  std::set<uint64_t> since_flush;
  size_t next_mark = 0;
  for (uint64_t i = 0; i <= window_end; ++i) {
    // Marks placed after operation i-1 and before operation i.
    while (mark >= 0 && next_mark <= static_cast<size_t>(mark) &&
           journal.marks[next_mark].ops_before == i) {
      const JournalMark& m = journal.marks[next_mark++];
      if (m.dsync_gen == 0) {
        for (uint64_t b : since_flush) blocks[b].durable = blocks[b].ops.size() - 1;
        since_flush.clear();
      } else {
        const JournalOp& op = journal.ops[m.dsync_gen - 1];
        for (uint64_t b = op.block; b < op.block + op.count; ++b) {
          History& h = blocks[b];
          for (size_t e = h.ops.size(); e-- > 0;) {
            if (h.ops[e] == &op) {
              if (static_cast<int64_t>(e) > h.durable) h.durable = e;
              break;
            }
          }
        }
      }
    }
    if (i == window_end) break;
    const JournalOp& op = journal.ops[i];
    for (uint64_t b = op.block; b < op.block + op.count; ++b) {
      blocks[b].ops.push_back(&op);
      since_flush.insert(b);
    }
  }

  int fd = ::open(raw_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::IoError(raw_path + ": cannot open", errno);
  std::unique_ptr<int, void (*)(int*)> closer(&fd, [](int* f) { ::close(*f); });
  VerifyReport report;
  const History empty;
  auto judge = [&](uint64_t block, const BlockContent& c) {
    ++report.blocks_checked;
    auto it = blocks.find(block);
    const History& h = it == blocks.end() ? empty : it->second;
    const bool misplaced = c.kind == BlockContent::kValid && c.block != block;
    if (!misplaced && Allowed(h, c)) return;
    // Valid content of this block that is allowed by the whole history but not by the
    // durable window is a lost flushed write; anything else is corruption.
    History all = h;
    all.durable = -1;
    const bool lost = !misplaced && c.kind != BlockContent::kGarbage && Allowed(all, c);
    (lost ? report.lost : report.corrupt)++;
    if (report.examples.size() < 8) {
      std::string what = c.kind == BlockContent::kZero ? "zeros"
                         : c.kind == BlockContent::kGarbage
                             ? "garbage"
                             : "block " + std::to_string(c.block) + " gen " + std::to_string(c.gen);
      std::string durable = h.durable < 0 ? "none"
                                          : std::string(1, h.ops[h.durable]->kind) + " gen " +
                                                std::to_string(h.ops[h.durable]->gen);
      report.examples.push_back("block " + std::to_string(block) + ": " + what +
                                (lost ? " (lost)" : " (corrupt)") + ", durable " + durable);
    }
  };

  // qemu-img convert leaves zero runs as holes: judge those blocks as zeros unread (this
  // runs once per replayed state under TCG, where reading 64 MiB costs most of a second).
  const off_t size = ::lseek(fd, 0, SEEK_END);
  if (size < 0) return Status::IoError(raw_path + ": cannot seek", errno);
  const uint64_t nblocks = static_cast<uint64_t>(size) / kBlockSize;
  const size_t kChunk = 256 * kBlockSize;
  std::vector<uint8_t> buf(kChunk);
  uint64_t block = 0;
  while (block < nblocks) {
    off_t data = ::lseek(fd, block * kBlockSize, SEEK_DATA);
    const uint64_t data_block =
        data < 0 ? nblocks : std::min<uint64_t>(nblocks, static_cast<uint64_t>(data) / kBlockSize);
    for (; block < data_block; ++block) judge(block, {BlockContent::kZero});
    if (block >= nblocks) break;
    off_t hole = ::lseek(fd, block * kBlockSize, SEEK_HOLE);
    const uint64_t end =
        hole < 0 ? nblocks
                 : std::min<uint64_t>(nblocks,
                                      (static_cast<uint64_t>(hole) + kBlockSize - 1) / kBlockSize);
    while (block < end) {
      const size_t want = std::min<uint64_t>(kChunk / kBlockSize, end - block) * kBlockSize;
      ssize_t n = ::pread(fd, buf.data(), want, block * kBlockSize);
      if (n < 0) return Status::IoError(raw_path + ": read failed", errno);
      if (static_cast<size_t>(n) != want) return Status::IoError(raw_path + ": short read");
      for (size_t off = 0; off < want; off += kBlockSize, ++block) {
        judge(block, Classify(std::span<const uint8_t>(buf.data() + off, kBlockSize)));
      }
    }
  }
  return report;
}

}  // namespace uq::power
