// plr-replay: replays a dm-log-writes log (log_writes.h) onto a copy of the logged device,
// incrementally, and picks the crash states the power-failure test checks.
//
//   plr-replay plan --log LOG --start MARK [--random N] [--at-least M] [--seed S]
//       One line per state to check, in log order: "<entry> <writer mark> <why>", from the
//       entry of the mark named MARK on: every writer mark (m<k>), every FLUSH and FUA
//       entry, the last entry, and N random entries between them (why: mark, flush, fua,
//       end, random). <writer mark> is k of the last m<k> at or before the entry, -1 if none.
//       --at-least M adds random entries beyond N until M states are planned (or the log
//       has no more), so the count does not hang on how many flushes a seed's run made.
//   plr-replay apply --log LOG --target FILE --state STATE --upto ENTRY [--copy-to COPY]
//       Applies entries to FILE from where STATE says the previous call stopped (entry 0 when
//       STATE does not exist) up to and including ENTRY, then records the position in STATE.
//       FILE starts as the data device was when the log was created (zeros). With --copy-to,
//       then copies FILE to COPY (holes stay holes): the copy a check may mount and change
//       while FILE stays the replayed state (one process less per state under TCG).
//   plr-replay list --log LOG
//       Every entry: "<entry> <flags> <sector> <nr_sectors> [<mark>]".
// Exit 0, or 2 with one line naming the problem.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "tests/power/log_writes.h"
#include "tests/power/tool_flags.h"

namespace uq::power {
namespace {

const char kTool[] = "plr-replay";

[[noreturn]] void Die(const std::string& message) { power::Die(kTool, message); }

LogReader OpenLog(const std::string& path) {
  Result<LogReader> log = LogReader::Open(path);
  if (!log.ok()) Die(log.status().ToString());
  return std::move(*log);
}

// Calls fn(entry) for every entry of the log.
template <typename Fn>
void ForEach(LogReader& log, Fn fn) {
  for (;;) {
    Result<std::optional<LogEntry>> e = log.Next();
    if (!e.ok()) Die(e.status().ToString());
    if (!e->has_value()) return;
    fn(**e);
  }
}

// k for a writer mark "m<k>", else -1.
int64_t WriterMark(const std::string& name) {
  if (name.size() < 2 || name[0] != 'm') return -1;
  for (size_t i = 1; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
  }
  return std::stoll(name.substr(1));
}

int PlanMain(int argc, char** argv) {
  const ToolFlags flags(kTool, argc, argv);
  LogReader log = OpenLog(flags.Need("log"));
  const std::string start_mark = flags.Need("start");
  const uint64_t random = flags.Number("random", 0);
  const uint64_t at_least = flags.Number("at-least", 0);
  std::mt19937_64 rng(flags.Number("seed", 1));

  struct State {
    int64_t mark;
    std::string why;
  };
  std::map<uint64_t, State> chosen;
  std::vector<std::pair<uint64_t, int64_t>> others;  // entries not chosen: (index, mark)
  int64_t start = -1, mark = -1;
  uint64_t last = 0;
  ForEach(log, [&](const LogEntry& e) {
    last = e.index;
    if ((e.flags & kLogMark) && WriterMark(e.mark) >= 0) mark = WriterMark(e.mark);
    if (start < 0) {
      if ((e.flags & kLogMark) && e.mark == start_mark) start = e.index;
      if (start < 0) return;
    }
    if ((e.flags & kLogMark) && WriterMark(e.mark) >= 0) {
      chosen[e.index] = {mark, "mark"};
    } else if (e.flags & kLogFlush) {
      chosen[e.index] = {mark, "flush"};
    } else if (e.flags & kLogFua) {
      chosen[e.index] = {mark, "fua"};
    } else {
      others.push_back({e.index, mark});
    }
  });
  if (start < 0) Die("no mark named '" + start_mark + "' in the log");
  if (!chosen.count(last)) {
    for (auto it = others.begin(); it != others.end(); ++it) {
      if (it->first == last) {
        chosen[last] = {it->second, "end"};
        others.erase(it);
        break;
      }
    }
  }
  std::shuffle(others.begin(), others.end(), rng);
  const uint64_t wanted =
      std::max<uint64_t>(random, at_least > chosen.size() ? at_least - chosen.size() : 0);
  for (uint64_t i = 0; i < wanted && i < others.size(); ++i) {
    chosen[others[i].first] = {others[i].second, "random"};
  }
  for (const auto& [index, s] : chosen) {
    std::printf("%llu %lld %s\n", static_cast<unsigned long long>(index),
                static_cast<long long>(s.mark), s.why.c_str());
  }
  return 0;
}

// Copies `src_fd` to a new file `dst`, data segments only.
void CopySparse(int src_fd, const std::string& src, const std::string& dst) {
  const off_t size = ::lseek(src_fd, 0, SEEK_END);
  if (size < 0) Die(src + ": " + std::strerror(errno));
  int out = ::open(dst.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  if (out < 0 || ::ftruncate(out, size) != 0) Die(dst + ": " + std::strerror(errno));
  std::vector<uint8_t> buf(1 << 20);
  off_t pos = 0;
  while (pos < size) {
    off_t data = ::lseek(src_fd, pos, SEEK_DATA);
    if (data < 0) break;  // ENXIO: only a hole is left
    off_t hole = ::lseek(src_fd, data, SEEK_HOLE);
    if (hole < 0) hole = size;
    for (off_t at = data; at < hole;) {
      size_t n = std::min<off_t>(buf.size(), hole - at);
      ssize_t got = ::pread(src_fd, buf.data(), n, at);
      if (got <= 0 || ::pwrite(out, buf.data(), got, at) != got) {
        Die("copying " + src + " to " + dst + ": " + std::strerror(errno));
      }
      at += got;
    }
    pos = hole;
  }
  if (::close(out) != 0) Die(dst + ": " + std::strerror(errno));
}

int ApplyMain(int argc, char** argv) {
  const ToolFlags flags(kTool, argc, argv);
  LogReader log = OpenLog(flags.Need("log"));
  const std::string target = flags.Need("target");
  const std::string state_path = flags.Need("state");
  const uint64_t upto = flags.NeedNumber("upto");
  uint64_t index = 0, offset = log.sectorsize();
  {
    std::ifstream in(state_path);
    if (in && !(in >> index >> offset)) Die(state_path + ": bad state file");
  }
  if (upto + 1 < index) {
    Die("entry " + std::to_string(upto) + " is behind the replayed state (entry " +
        std::to_string(index) + ")");
  }
  if (upto >= log.nr_entries()) {
    Die("entry " + std::to_string(upto) + " is past the log's end (" +
        std::to_string(log.nr_entries()) + " entries)");
  }
  int fd = ::open(target.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) Die(target + ": " + std::strerror(errno));
  log.Seek(index, offset);
  while (log.next_index() <= upto) {
    Result<std::optional<LogEntry>> e = log.Next();
    if (!e.ok()) Die(e.status().ToString());
    if (!e->has_value()) break;
    Status s = log.Apply(**e, fd);
    if (!s.ok()) Die(s.ToString());
  }
  if (flags.Has("copy-to")) CopySparse(fd, target, flags.Get("copy-to", ""));
  if (::close(fd) != 0) Die(target + ": " + std::strerror(errno));
  std::ofstream out(state_path, std::ios::trunc);
  out << log.next_index() << ' ' << log.next_offset() << '\n';
  if (!out.flush()) Die(state_path + ": cannot write");
  return 0;
}

int ListMain(int argc, char** argv) {
  const ToolFlags flags(kTool, argc, argv);
  LogReader log = OpenLog(flags.Need("log"));
  ForEach(log, [](const LogEntry& e) {
    std::printf("%llu %llu %llu %llu%s%s\n", static_cast<unsigned long long>(e.index),
                static_cast<unsigned long long>(e.flags), static_cast<unsigned long long>(e.sector),
                static_cast<unsigned long long>(e.nr_sectors), e.mark.empty() ? "" : " ",
                e.mark.c_str());
  });
  return 0;
}

}  // namespace
}  // namespace uq::power

int main(int argc, char** argv) {
  const std::string verb = argc > 1 ? argv[1] : "";
  if (verb == "plan") return uq::power::PlanMain(argc, argv);
  if (verb == "apply") return uq::power::ApplyMain(argc, argv);
  if (verb == "list") return uq::power::ListMain(argc, argv);
  std::fprintf(
      stderr,
      "usage: plr-replay plan --log LOG --start MARK [--random N] [--at-least M] [--seed S]\n"
      "       plr-replay apply --log LOG --target FILE --state STATE --upto ENTRY\n"
      "       plr-replay list --log LOG\n");
  return 2;
}
