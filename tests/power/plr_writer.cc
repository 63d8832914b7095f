// plr-writer: the workload and the checker of the power-failure test
// (tests/vm/e2e/23-power-failure.sh).
//
//   plr-writer write --dev /dev/ublkbN --journal FILE [--ops N] [--seed S] [--dm NAME]
//       O_DIRECT on the device, one request at a time: random and sequential writes
//       (allocating and overwriting; a hot region gets most overwrites), some with
//       RWF_DSYNC, BLKZEROOUT and BLKDISCARD ranges, and fdatasync flushes. Each acknowledged
//       operation is appended to the journal (see journal.h); after each flush and each
//       DSYNC write returns, `dmsetup message NAME 0 mark m<k>` puts a mark in the
//       dm-log-writes log and the journal records it. Ends with a flush.
//   plr-writer verify --journal FILE --raw RAW --mark K
//       Checks every block of RAW (the device's content in a replayed state whose last
//       writer mark is m<K>; -1 before the first) against the journal. Prints one line
//       "blocks N lost L corrupt C" (and examples); exit 0 if both are 0, 1 if not, 2 on
//       bad usage or input.
//   plr-writer files --dir DIR --journal FILE [--ops N] [--seed S] [--dm NAME]
//       The file workload (file_workload.h) in DIR, a mounted file system on the device:
//       files replaced atomically or unlinked, some directory fsyncs, a mark after each.
//   plr-writer verify-files --journal FILE --dir DIR --mark K
//       Checks the files in DIR (the file system of a replayed state, mounted) against the
//       journal. Prints "files N lost L corrupt C" (and examples); exits as verify does.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tests/power/block_pattern.h"
#include "tests/power/file_workload.h"
#include "tests/power/journal.h"
#include "tests/power/tool_flags.h"

namespace uq::power {
namespace {

const char kTool[] = "plr-writer";

[[noreturn]] void Die(const std::string& message) { power::Die(kTool, message); }
[[noreturn]] void DieErrno(const std::string& what) { power::DieErrno(kTool, what); }

// `dmsetup message DM 0 mark m<k>` (nothing without a DM name: unit runs).
void DmMark(const std::string& dm_name, uint64_t k) {
  if (dm_name.empty()) return;
  const std::string name = "m" + std::to_string(k);
  pid_t pid = ::fork();
  if (pid < 0) DieErrno("fork");
  if (pid == 0) {
    ::execlp("dmsetup", "dmsetup", "message", dm_name.c_str(), "0", "mark", name.c_str(),
             static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    Die("dmsetup message " + dm_name + " 0 mark " + name + " failed");
  }
}

class Writer {
 public:
  Writer(int fd, FILE* journal, std::string dm_name, uint64_t blocks, uint64_t seed)
      : fd_(fd), journal_(journal), dm_name_(std::move(dm_name)), blocks_(blocks), rng_(seed) {
    void* p = nullptr;
    if (posix_memalign(&p, kBlockSize, kMaxBlocks * kBlockSize) != 0) Die("out of memory");
    buf_.reset(static_cast<uint8_t*>(p));
  }

  void Run(uint64_t ops) {
    for (uint64_t i = 0; i < ops; ++i) {
      const uint32_t r = Pick(100);
      if (r < 45) {
        Write(RandomStart(Pick(8) + 1), false);
      } else if (r < 60) {
        Write(Sequential(Pick(16) + 1), false);
      } else if (r < 72) {
        Write(RandomStart(Pick(4) + 1), true);
      } else if (r < 84) {
        Range(RandomStart(Pick(16) + 1), 'Z');
      } else {
        // Discards: half of them whole 64 KiB clusters (which the image can free).
        uint64_t count = Pick(2) ? 16 * (Pick(2) + 1) : Pick(16) + 1;
        Extent e = RandomStart(count);
        if (count % 16 == 0) e.block -= e.block % 16;
        Range(e, 'D');
      }
      if (Pick(6) == 0) Flush();
    }
    Flush();
  }

 private:
  static constexpr uint64_t kMaxBlocks = 32;
  struct Extent {
    uint64_t block, count;
  };

  uint32_t Pick(uint32_t n) { return std::uniform_int_distribution<uint32_t>(0, n - 1)(rng_); }

  // Half the random extents land in a hot region of 512 blocks (2 MiB) so that blocks get
  // overwritten, the rest anywhere (allocating).
  Extent RandomStart(uint64_t count) {
    const uint64_t span = Pick(2) ? std::min<uint64_t>(512, blocks_) : blocks_;
    return {std::uniform_int_distribution<uint64_t>(0, span - count)(rng_), count};
  }

  Extent Sequential(uint64_t count) {
    if (seq_next_ + count > blocks_) seq_next_ = 0;
    Extent e{seq_next_, count};
    seq_next_ += count;
    return e;
  }

  void Write(Extent e, bool dsync) {
    const uint64_t gen = ++gen_;
    for (uint64_t i = 0; i < e.count; ++i) {
      FillBlock(e.block + i, gen, std::span<uint8_t>(buf_.get() + i * kBlockSize, kBlockSize));
    }
    iovec iov{buf_.get(), e.count * kBlockSize};
    ssize_t n = ::pwritev2(fd_, &iov, 1, e.block * kBlockSize, dsync ? RWF_DSYNC : 0);
    if (n != static_cast<ssize_t>(iov.iov_len)) DieErrno("write gen " + std::to_string(gen));
    Record("W", gen, e);
    if (dsync) Mark(gen);
  }

  void Range(Extent e, char kind) {
    const uint64_t gen = ++gen_;
    uint64_t range[2] = {e.block * kBlockSize, e.count * kBlockSize};
    if (::ioctl(fd_, kind == 'Z' ? BLKZEROOUT : BLKDISCARD, range) != 0) {
      DieErrno(std::string(kind == 'Z' ? "BLKZEROOUT" : "BLKDISCARD") + " gen " +
               std::to_string(gen));
    }
    Record(kind == 'Z' ? "Z" : "D", gen, e);
  }

  void Flush() {
    if (::fdatasync(fd_) != 0) DieErrno("fdatasync");
    Mark(0);
  }

  void Record(const char* kind, uint64_t gen, Extent e) {
    std::fprintf(journal_, "%s %llu %llu %llu\n", kind, static_cast<unsigned long long>(gen),
                 static_cast<unsigned long long>(e.block),
                 static_cast<unsigned long long>(e.count));
    std::fflush(journal_);
  }

  // Puts mark m<k> in the log (after the acknowledged flush or DSYNC write), then records it.
  void Mark(uint64_t dsync_gen) {
    DmMark(dm_name_, marks_);
    std::fprintf(journal_, "M %llu %llu\n", static_cast<unsigned long long>(marks_),
                 static_cast<unsigned long long>(dsync_gen));
    std::fflush(journal_);
    ++marks_;
  }

  const int fd_;
  FILE* const journal_;
  const std::string dm_name_;
  const uint64_t blocks_;
  std::mt19937_64 rng_;
  std::unique_ptr<uint8_t, decltype(&std::free)> buf_{nullptr, &std::free};
  uint64_t gen_ = 0;
  uint64_t marks_ = 0;
  uint64_t seq_next_ = 0;
};

int WriteMain(int argc, char** argv) {
  const ToolFlags flags(kTool, argc, argv);
  const std::string dev = flags.Need("dev");
  const std::string journal_path = flags.Need("journal");
  const uint64_t ops = flags.Number("ops", 300);
  const uint64_t seed = flags.Number("seed", 1);
  int fd = ::open(dev.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  if (fd < 0) DieErrno(dev);
  uint64_t bytes = 0;
  if (::ioctl(fd, BLKGETSIZE64, &bytes) != 0) {
    // A regular file (unit runs without a device).
    off_t end = ::lseek(fd, 0, SEEK_END);
    if (end < 0) DieErrno(dev);
    bytes = static_cast<uint64_t>(end);
  }
  const uint64_t blocks = bytes / kBlockSize;
  if (blocks < 64) Die(dev + ": too small (" + std::to_string(bytes) + " bytes)");
  FILE* journal = std::fopen(journal_path.c_str(), "w");
  if (journal == nullptr) DieErrno(journal_path);
  Writer w(fd, journal, flags.Get("dm", ""), blocks, seed);
  w.Run(ops);
  std::fclose(journal);
  ::close(fd);
  return 0;
}

int VerifyMain(int argc, char** argv) {
  const ToolFlags flags(kTool, argc, argv);
  Result<Journal> journal = LoadJournal(flags.Need("journal"));
  if (!journal.ok()) Die(journal.status().ToString());
  Result<VerifyReport> report = VerifyRaw(*journal, flags.SignedNumber("mark"), flags.Need("raw"));
  if (!report.ok()) Die(report.status().ToString());
  std::printf("blocks %llu lost %llu corrupt %llu\n",
              static_cast<unsigned long long>(report->blocks_checked),
              static_cast<unsigned long long>(report->lost),
              static_cast<unsigned long long>(report->corrupt));
  for (const std::string& e : report->examples) std::printf("  %s\n", e.c_str());
  return report->lost == 0 && report->corrupt == 0 ? 0 : 1;
}

int FilesMain(int argc, char** argv) {
  const ToolFlags flags(kTool, argc, argv);
  const std::string dm = flags.Get("dm", "");
  Status st = RunFileWorkload(flags.Need("dir"), flags.Need("journal"), flags.Number("ops", 100),
                              flags.Number("seed", 1), [&](uint64_t k) {
                                DmMark(dm, k);
                                return Status::Ok();
                              });
  if (!st.ok()) Die(st.ToString());
  return 0;
}

int VerifyFilesMain(int argc, char** argv) {
  const ToolFlags flags(kTool, argc, argv);
  Result<FileJournal> journal = LoadFileJournal(flags.Need("journal"));
  if (!journal.ok()) Die(journal.status().ToString());
  Result<FileReport> report = VerifyFiles(*journal, flags.SignedNumber("mark"), flags.Need("dir"));
  if (!report.ok()) Die(report.status().ToString());
  std::printf("files %llu lost %llu corrupt %llu\n",
              static_cast<unsigned long long>(report->files_checked),
              static_cast<unsigned long long>(report->lost),
              static_cast<unsigned long long>(report->corrupt));
  for (const std::string& e : report->examples) std::printf("  %s\n", e.c_str());
  return report->lost == 0 && report->corrupt == 0 ? 0 : 1;
}

}  // namespace
}  // namespace uq::power

int main(int argc, char** argv) {
  const std::string verb = argc > 1 ? argv[1] : "";
  if (verb == "write") return uq::power::WriteMain(argc, argv);
  if (verb == "verify") return uq::power::VerifyMain(argc, argv);
  if (verb == "files") return uq::power::FilesMain(argc, argv);
  if (verb == "verify-files") return uq::power::VerifyFilesMain(argc, argv);
  std::fprintf(stderr,
               "usage: plr-writer write --dev DEV --journal FILE [--ops N] [--seed S] [--dm NAME]\n"
               "       plr-writer verify --journal FILE --raw RAW --mark K\n"
               "       plr-writer files --dir DIR --journal FILE [--ops N] [--seed S] [--dm NAME]\n"
               "       plr-writer verify-files --journal FILE --dir DIR --mark K\n");
  return 2;
}
