#include "driver/daemon.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "driver/admin.h"
#include "driver/control.h"
#include "driver/log.h"
#include "driver/service_notify.h"
#include "driver/state_file.h"

namespace uq::driver {
namespace {

using Clock = std::chrono::steady_clock;

// How long a killed daemon may take to be gone (its threads to exit).
constexpr std::chrono::milliseconds kKillWait = std::chrono::seconds(10);

void WriteAll(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the reader is gone; nothing to tell
    done += static_cast<size_t>(n);
  }
}

// Once the image is open the passphrase has done its work: wipe it, so that
// only the master key (locked in memory) stays in the process. Say once if
// the kernel would not lock key material (RLIMIT_MEMLOCK), without any of it.
void ForgetPassphrase(const DeviceOptions& options) {
  if (options.key) options.key->Clear();
  if (qcow2::crypto::LockFailed()) {
    Log("warning: the image's key could not be locked in memory (mlock refused: "
        "RLIMIT_MEMLOCK?); it may be written to swap");
  }
}

// The daemon: creates the device, reports on `report_fd`, serves.
[[noreturn]] void DaemonMain(const DeviceOptions& options, int report_fd) {
  ::signal(SIGPIPE, SIG_IGN);
  int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    ::dup2(null_fd, STDIN_FILENO);
    ::dup2(null_fd, STDOUT_FILENO);
    ::dup2(null_fd, STDERR_FILENO);
    ::close(null_fd);
  }
  if (::chdir("/") != 0) {
    // Not fatal: the image path is absolute.
  }

  // First the pid, so that a caller that gives up can kill this process;
  // then, from Create, the id of the device once it exists.
  WriteAll(report_fd, fmt::format("pid {}\n", ::getpid()));
  DeviceOptions reporting = options;
  reporting.on_added = [report_fd](int dev_id) {
    WriteAll(report_fd, fmt::format("added {}\n", dev_id));
  };
  Result<std::unique_ptr<Device>> device = Device::Create(reporting);
  if (!device.ok()) {
    if (options.key) options.key->Clear();
    WriteAll(report_fd, "error " + device.status().ToString() + "\n");
    ::_exit(1);
  }
  const DeviceInfo info = (*device)->info();
  // A recovering daemon carries on the log of the one it replaces.
  int log_fd =
      ::open(LogPath(info.dev_id).c_str(),
             O_WRONLY | O_CREAT | (info.recovered ? 0 : O_TRUNC) | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd >= 0) {
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    ::close(log_fd);
  }
  Log(fmt::format(
      "pid {}: {} {} as {} ({} bytes, {} queue(s) of depth {}{}; recovery: {}; zero copy: {}; "
      "kernel features: {})",
      ::getpid(), info.recovered ? "recovered, serving" : "serving", options.image, info.block_path,
      info.size, info.queues, info.depth, info.read_only ? ", read-only" : "",
      RecoveryModeName(RecoveryModeOf(info.flags)), UsesZeroCopy(info.flags) ? "on" : "off",
      FeatureNames(info.features)));
  if (!info.leak_repair.empty()) Log(info.leak_repair);
  ForgetPassphrase(options);
  WriteAll(report_fd, fmt::format("ready {}\n", info.dev_id));
  ::close(report_fd);

  Status served = (*device)->Serve();
  const bool handed_over = (*device)->handed_over();
  device->reset();
  if (handed_over) {
    // upgrade: the device and its record are the next daemon's.
    Log(served.ok()
            ? fmt::format("{} handed over to a new daemon; image closed cleanly", info.block_path)
            : fmt::format("{} handed over to a new daemon: {}", info.block_path,
                          served.ToString()));
    ::_exit(served.ok() ? 0 : 1);
  }
  (void)RemoveRecord(info.dev_id);
  if (served.ok()) {
    Log(fmt::format("{} stopped; image closed cleanly", info.block_path));
  } else {
    Log(fmt::format("{} stopped: {}", info.block_path, served.ToString()));
  }
  ::_exit(served.ok() ? 0 : 1);
}

// What a starting daemon has said on its report pipe: its pid, the device it
// added, and its verdict ("ready <id>" or "error <message>").
class ReportReader {
 public:
  explicit ReportReader(int fd) : fd_(fd) {}
  int pid() const { return pid_; }
  int added() const { return added_; }
  const std::string& verdict() const { return verdict_; }

  // Reads lines until a verdict, the end of the pipe (true either way) or
  // `deadline` (false).
  bool ReadUntilVerdict(Clock::time_point deadline) {
    while (verdict_.empty()) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return false;
      pollfd p = {fd_, POLLIN, 0};
      int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 60'000)));
      if (n < 0 && errno == EINTR) continue;
      if (n == 0) continue;
      char buf[512];
      ssize_t got = ::read(fd_, buf, sizeof(buf));
      if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (got <= 0) {
        Parse(true);
        return true;
      }
      pending_.append(buf, static_cast<size_t>(got));
      Parse(false);
    }
    return true;
  }

 private:
  void Parse(bool at_end) {
    size_t nl;
    while (verdict_.empty() && (nl = pending_.find('\n')) != std::string::npos) {
      Line(pending_.substr(0, nl));
      pending_.erase(0, nl + 1);
    }
    if (at_end && verdict_.empty() && !pending_.empty()) Line(pending_);  // no newline
  }
  void Line(const std::string& line) {
    if (line.rfind("pid ", 0) == 0) {
      pid_ = std::atoi(line.c_str() + 4);
    } else if (line.rfind("added ", 0) == 0) {
      added_ = std::atoi(line.c_str() + 6);
    } else if (line.rfind("ready ", 0) == 0 || line.rfind("error ", 0) == 0) {
      verdict_ = line;
    }
  }

  int fd_;
  std::string pending_;
  int pid_ = 0;
  int added_ = -1;
  std::string verdict_;
};

// After its daemon was killed or died in setup: the device it added goes,
// as `del --force` would remove it.
Status RemoveAbandoned(int dev_id) {
  ASSIGN_OR_RETURN(std::unique_ptr<ControlDevice> control, ControlDevice::Open());
  DeleteOptions options;
  options.force = true;
  options.timeout_ms = static_cast<int>(kKillWait.count());
  return DeleteDevice(*control, dev_id, options);
}

}  // namespace

Result<DeviceInfo> StartDaemon(const DeviceOptions& options, std::chrono::milliseconds timeout) {
  std::fflush(stdout);
  std::fflush(stderr);
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe");
  pid_t child = ::fork();
  if (child < 0) {
    int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    return Status::FromErrno(err, "fork");
  }
  if (child == 0) {
    ::close(fds[0]);
    ::setsid();
    pid_t daemon = ::fork();
    if (daemon < 0) {
      WriteAll(fds[1], fmt::format("error fork: {}\n", std::strerror(errno)));
      ::_exit(1);
    }
    if (daemon > 0) ::_exit(0);
    DaemonMain(options, fds[1]);
  }
  ::close(fds[1]);
  int wstatus;
  while (::waitpid(child, &wstatus, 0) < 0 && errno == EINTR) {
  }

  ReportReader report(fds[0]);
  const bool ended = report.ReadUntilVerdict(Clock::now() + timeout);
  if (report.verdict().rfind("ready ", 0) == 0) {
    ::close(fds[0]);
    DeviceInfo info;
    info.dev_id = std::atoi(report.verdict().c_str() + 6);
    info.block_path = BlockDevicePath(info.dev_id);
    return info;
  }
  if (report.verdict().rfind("error ", 0) == 0) {
    ::close(fds[0]);  // the daemon undid its setup itself
    return Status::IoError(report.verdict().substr(6));
  }

  // No verdict: the daemon hangs, or died. Make sure it is gone (the pipe's
  // end: its last thread has exited), then remove what it left.
  if (!ended && report.pid() > 0) ::kill(report.pid(), SIGKILL);
  const bool gone = ended || report.ReadUntilVerdict(Clock::now() + kKillWait);
  ::close(fds[0]);
  std::string what = ended ? "the daemon ended during setup without reporting why"
                           : fmt::format("the daemon did not report the device live within {:g} s",
                                         std::chrono::duration<double>(timeout).count());
  if (!gone) return Status::IoError(what + "; it could not be killed");
  if (report.added() < 0 || options.recover) {
    // Recover: the device waits for a daemon again, as after any failed
    // recovery. Add, before ADD_DEV: there is no device.
    if (!ended) what += "; it was killed";
    if (options.recover)
      what += fmt::format("; ublk device {} still waits for recovery", options.dev_id);
    return Status::IoError(fmt::format("{}: {}", options.image, what));
  }
  Status removed = RemoveAbandoned(report.added());
  what += ended ? "" : "; it was killed";
  what += removed.ok() ? fmt::format(" and ublk device {} removed", report.added())
                       : fmt::format("; removing ublk device {} failed: {}", report.added(),
                                     removed.ToString());
  return Status::IoError(fmt::format("{}: {}", options.image, what));
}

Status ServeInForeground(const DeviceOptions& options,
                         const std::function<void(const DeviceInfo&)>& on_ready) {
  ASSIGN_OR_RETURN(std::unique_ptr<Device> device, Device::Create(options));
  const DeviceInfo info = device->info();
  // This process logs to its own stderr: a log left by an earlier daemon
  // with this id must not speak for it (`del` reads the last line).
  ::unlink(LogPath(info.dev_id).c_str());
  if (!info.leak_repair.empty()) Log(info.leak_repair);
  ForgetPassphrase(options);
  on_ready(info);
  // Under systemd (Type=notify) the unit is started once the device is live.
  Status notified = NotifyServiceManager("READY=1");
  if (!notified.ok()) Log("telling the service manager: " + notified.ToString());
  Status served = device->Serve();
  const bool handed_over = device->handed_over();
  device.reset();
  if (handed_over) {
    Log(fmt::format("{} handed over to a new daemon{}", info.block_path,
                    served.ok() ? "; image closed cleanly" : ": " + served.ToString()));
  } else {
    (void)RemoveRecord(info.dev_id);
  }
  return served;
}

}  // namespace uq::driver
