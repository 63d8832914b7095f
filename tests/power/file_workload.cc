#include "tests/power/file_workload.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>

#include "tests/power/block_pattern.h"

namespace uq::power {
namespace {

constexpr uint64_t kFiles = 24;
constexpr uint64_t kMaxFileBlocks = 32;  // 128 KiB

std::string FileName(uint64_t file) { return "f" + std::to_string(file); }

Status Errno(const std::string& what) { return Status::FromErrno(errno, what); }

// Closes an fd at scope exit.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

Status WriteWhole(int fd, const std::vector<uint8_t>& data, const std::string& what) {
  for (size_t done = 0; done < data.size();) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n <= 0) return Errno(what);
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

Status RunFileWorkload(const std::string& dir, const std::string& journal_path, uint64_t ops,
                       uint64_t seed, const std::function<Status(uint64_t)>& mark) {
  std::unique_ptr<FILE, decltype(&std::fclose)> journal(std::fopen(journal_path.c_str(), "w"),
                                                        &std::fclose);
  if (!journal) return Errno(journal_path);
  Fd dfd{::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dfd.fd < 0) return Errno(dir);
  std::mt19937_64 rng(seed);
  auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  std::set<uint64_t> present;
  uint64_t marks = 0;
  auto sync_and_mark = [&]() -> Status {
    if (::fsync(dfd.fd) != 0) return Errno(dir + ": fsync");
    if (Status st = mark(marks); !st.ok()) return st;
    std::fprintf(journal.get(), "M %llu\n", static_cast<unsigned long long>(marks++));
    std::fflush(journal.get());
    return Status::Ok();
  };
  // m0: the file system as mkfs and mount left it, durable before any file is written.
  if (Status st = sync_and_mark(); !st.ok()) return st;
  for (uint64_t gen = 1; gen <= ops; ++gen) {
    const uint64_t file = pick(kFiles);
    const std::string name = FileName(file);
    if (present.count(file) != 0 && pick(6) == 0) {
      if (::unlinkat(dfd.fd, name.c_str(), 0) != 0) return Errno(dir + "/" + name + ": unlink");
      present.erase(file);
      std::fprintf(journal.get(), "U %llu %llu\n", static_cast<unsigned long long>(gen),
                   static_cast<unsigned long long>(file));
    } else {
      const uint64_t blocks = 1 + pick(kMaxFileBlocks);
      std::vector<uint8_t> data(blocks * kBlockSize);
      for (uint64_t i = 0; i < blocks; ++i) {
        FillBlock(file * kFileStride + i, gen,
                  std::span<uint8_t>(data.data() + i * kBlockSize, kBlockSize));
      }
      // Written and fsynced under a temporary name, then renamed: the name shows the old
      // file or the new one, whole, whatever a power cut leaves.
      const std::string tmp = "tmp." + std::to_string(gen);
      {
        Fd fd{::openat(dfd.fd, tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
        if (fd.fd < 0) return Errno(dir + "/" + tmp);
        if (Status st = WriteWhole(fd.fd, data, dir + "/" + tmp); !st.ok()) return st;
        if (::fsync(fd.fd) != 0) return Errno(dir + "/" + tmp + ": fsync");
      }
      if (::renameat(dfd.fd, tmp.c_str(), dfd.fd, name.c_str()) != 0) {
        return Errno(dir + "/" + name + ": rename");
      }
      present.insert(file);
      std::fprintf(journal.get(), "F %llu %llu %llu\n", static_cast<unsigned long long>(gen),
                   static_cast<unsigned long long>(file), static_cast<unsigned long long>(blocks));
    }
    std::fflush(journal.get());
    if (pick(3) == 0) {
      if (Status st = sync_and_mark(); !st.ok()) return st;
    }
  }
  return sync_and_mark();
}

Result<FileJournal> LoadFileJournal(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::IoError(path + ": cannot open journal", errno);
  FileJournal j;
  std::string line;
  uint64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    std::istringstream s(line);
    char kind = 0;
    s >> kind;
    FileOp op{kind, 0, 0, 0};
    bool ok = false;
    if (kind == 'F') {
      ok = static_cast<bool>(s >> op.gen >> op.file >> op.blocks) && op.blocks > 0 &&
           op.blocks <= kMaxFileBlocks;
    } else if (kind == 'U') {
      ok = static_cast<bool>(s >> op.gen >> op.file);
    } else if (kind == 'M') {
      uint64_t k = 0;
      if (!(s >> k) || k != j.marks.size()) {
        return Status::Corruption(path + ": bad mark at line " + std::to_string(lineno));
      }
      j.marks.push_back(j.ops.size());
      continue;
    } else {
      return Status::Corruption(path + ": unknown line " + std::to_string(lineno));
    }
    if (!ok || op.file >= kFiles || op.gen <= (j.ops.empty() ? 0 : j.ops.back().gen)) {
      return Status::Corruption(path + ": bad operation at line " + std::to_string(lineno));
    }
    j.ops.push_back(op);
  }
  return j;
}

namespace {

// What a file may show: absent (nullopt) or one generation with its size in blocks.
using FileState = std::optional<std::pair<uint64_t, uint64_t>>;

std::string Show(const FileState& s) {
  return s ? "gen " + std::to_string(s->first) + " (" + std::to_string(s->second) + " blocks)"
           : "absent";
}

// What the file at `path` holds: absent, a whole generation, or (error) what is wrong.
Result<FileState> ReadFileState(const std::string& path, uint64_t file) {
  Fd fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) {
    if (errno == ENOENT) return FileState{};
    return Status::FromErrno(errno, path);
  }
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) return Status::FromErrno(errno, path);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size == 0 || size % kBlockSize != 0 || size / kBlockSize > kMaxFileBlocks) {
    return Status::Corruption("size " + std::to_string(size));
  }
  std::vector<uint8_t> data(size);
  for (size_t done = 0; done < size;) {
    ssize_t n = ::pread(fd.fd, data.data() + done, size - done, static_cast<off_t>(done));
    if (n <= 0) return Status::FromErrno(n < 0 ? errno : EIO, path);
    done += static_cast<size_t>(n);
  }
  uint64_t gen = 0;
  for (uint64_t i = 0; i < size / kBlockSize; ++i) {
    const BlockContent c =
        Classify(std::span<const uint8_t>(data.data() + i * kBlockSize, kBlockSize));
    if (c.kind != BlockContent::kValid || c.block != file * kFileStride + i ||
        (i > 0 && c.gen != gen)) {
      return Status::Corruption(
          "block " + std::to_string(i) + " is " +
          (c.kind == BlockContent::kZero ? std::string("zeros")
           : c.kind == BlockContent::kGarbage
               ? std::string("garbage")
               : "block " + std::to_string(c.block) + " gen " + std::to_string(c.gen)));
    }
    gen = c.gen;
  }
  return FileState{{gen, size / kBlockSize}};
}

}  // namespace

Result<FileReport> VerifyFiles(const FileJournal& journal, int64_t mark, const std::string& dir) {
  if (mark >= static_cast<int64_t>(journal.marks.size())) {
    return Status::InvalidArgument("mark m" + std::to_string(mark) + " is not in the journal");
  }
  // Operations durable at the mark, and those that may have landed after it (up to the next
  // mark: later ones were issued after it reached the log).
  const uint64_t durable_end = mark < 0 ? 0 : journal.marks[static_cast<size_t>(mark)];
  const uint64_t window_end = static_cast<size_t>(mark + 1) < journal.marks.size()
                                  ? journal.marks[static_cast<size_t>(mark + 1)]
                                  : journal.ops.size();
  std::map<uint64_t, FileState> durable;
  std::map<uint64_t, std::vector<FileState>> later;
  for (uint64_t i = 0; i < window_end; ++i) {
    const FileOp& op = journal.ops[i];
    FileState s = op.kind == 'F' ? FileState{{op.gen, op.blocks}} : FileState{};
    if (i < durable_end) {
      durable[op.file] = s;
    } else {
      later[op.file].push_back(s);
    }
  }
  FileReport report;
  auto problem = [&](uint64_t* counter, const std::string& what) {
    ++*counter;
    if (report.examples.size() < 8) report.examples.push_back(what);
  };
  for (uint64_t file = 0; file < kFiles; ++file) {
    const std::string path = dir + "/" + FileName(file);
    Result<FileState> seen = ReadFileState(path, file);
    ++report.files_checked;
    if (!seen.ok()) {
      if (!seen.status().IsCorruption()) return seen.status();
      problem(&report.corrupt, FileName(file) + ": " + seen.status().message());
      continue;
    }
    const FileState want = durable.count(file) ? durable[file] : FileState{};
    bool allowed = *seen == want;
    for (const FileState& s : later[file]) allowed = allowed || *seen == s;
    if (allowed) continue;
    // A generation the journal has for this file, but too old: lost; anything else: corrupt.
    bool known = !seen->has_value();
    for (uint64_t i = 0; i < durable_end && !known; ++i) {
      const FileOp& op = journal.ops[i];
      known = op.kind == 'F' && op.file == file && op.gen == (*seen)->first &&
              op.blocks == (*seen)->second;
    }
    problem(known ? &report.lost : &report.corrupt,
            FileName(file) + ": " + Show(*seen) + ", durable " + Show(want));
  }
  return report;
}

}  // namespace uq::power
