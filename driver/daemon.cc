#include "driver/daemon.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "driver/state_file.h"

namespace uq::driver {
namespace {

void WriteAll(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the reader is gone; nothing to tell
    done += static_cast<size_t>(n);
  }
}

void Log(const std::string& line) {
  std::string text = "ublk-qcow2: " + line + "\n";
  std::fputs(text.c_str(), stderr);
  std::fflush(stderr);
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

  Result<std::unique_ptr<Device>> device = Device::Create(options);
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
      "pid {}: {} {} as {} ({} bytes, {} queue(s) of depth {}{}; recovery: {}; kernel "
      "features: {})",
      ::getpid(), info.recovered ? "recovered, serving" : "serving", options.image, info.block_path,
      info.size, info.queues, info.depth, info.read_only ? ", read-only" : "",
      RecoveryModeName(RecoveryModeOf(info.flags)), FeatureNames(info.features)));
  ForgetPassphrase(options);
  WriteAll(report_fd, fmt::format("ready {}\n", info.dev_id));
  ::close(report_fd);

  Status served = (*device)->Serve();
  device->reset();
  (void)RemoveRecord(info.dev_id);
  if (served.ok()) {
    Log(fmt::format("{} stopped; image closed cleanly", info.block_path));
  } else {
    Log(fmt::format("{} stopped: {}", info.block_path, served.ToString()));
  }
  ::_exit(served.ok() ? 0 : 1);
}

}  // namespace

Result<DeviceInfo> StartDaemon(const DeviceOptions& options) {
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

  // The daemon's one line, then EOF when it closes the pipe.
  std::string report;
  char buf[512];
  for (;;) {
    ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    report.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  while (!report.empty() && report.back() == '\n') report.pop_back();

  if (report.rfind("ready ", 0) == 0) {
    DeviceInfo info;
    info.dev_id = std::atoi(report.c_str() + 6);
    info.block_path = BlockDevicePath(info.dev_id);
    return info;
  }
  if (report.rfind("error ", 0) == 0) return Status::IoError(report.substr(6));
  return Status::IoError("the daemon ended during setup without reporting why");
}

Status ServeInForeground(const DeviceOptions& options,
                         const std::function<void(const DeviceInfo&)>& on_ready) {
  ASSIGN_OR_RETURN(std::unique_ptr<Device> device, Device::Create(options));
  const DeviceInfo info = device->info();
  // This process logs to its own stderr: a log left by an earlier daemon
  // with this id must not speak for it (`del` reads the last line).
  ::unlink(LogPath(info.dev_id).c_str());
  ForgetPassphrase(options);
  on_ready(info);
  Status served = device->Serve();
  device.reset();
  (void)RemoveRecord(info.dev_id);
  return served;
}

}  // namespace uq::driver
