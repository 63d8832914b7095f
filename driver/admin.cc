#include "driver/admin.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>

namespace uq::driver {
namespace {

constexpr int kKillWaitMs = 10'000;
// How long `del` waits for a deleted device's id to be freed.
constexpr int kFreeWaitMs = 2'000;

// A pidfd for `pid`, or -1 if it is gone.
int OpenPidfd(int pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

// Waits until the process behind `pidfd` exits; false on timeout.
bool WaitExit(int pidfd, int timeout_ms) {
  pollfd fd{pidfd, POLLIN, 0};
  for (;;) {
    int n = ::poll(&fd, 1, timeout_ms);
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) return false;
  }
}

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Running and not a zombie.
bool ProcessRunning(int pid) {
  if (pid <= 0) return false;
  std::string stat = ReadSmallFile(fmt::format("/proc/{}/stat", pid));
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return false;
  char state = stat[paren + 2];
  return state != 'Z' && state != 'X';
}

void Warn(const std::string& line) {
  std::string text = "ublk-qcow2: warning: " + line + "\n";
  std::fputs(text.c_str(), stderr);
}

std::optional<DeviceRecord> RecordOrNothing(int dev_id) {
  Result<std::optional<DeviceRecord>> record = ReadRecord(dev_id);
  if (!record.ok()) {
    Warn(record.status().ToString());
    return std::nullopt;
  }
  return *record;
}

bool IsNoDevice(const Status& status) { return status.error_number() == ENODEV; }

// The daemon's last word (driver/daemon.cc): "... stopped; image closed
// cleanly" or "... stopped: <error>". OK unless it logged an error.
Status DaemonOutcome(int dev_id) {
  std::string log = ReadSmallFile(LogPath(dev_id));
  while (!log.empty() && log.back() == '\n') log.pop_back();
  std::string last = log.substr(log.rfind('\n') == std::string::npos ? 0 : log.rfind('\n') + 1);
  const std::string marker = " stopped: ";
  size_t at = last.find(marker);
  if (at == std::string::npos) return Status::Ok();
  return Status::IoError(fmt::format("ublk device {}: the daemon stopped with an error: {}", dev_id,
                                     last.substr(at + marker.size())));
}

}  // namespace

bool IsUblkQcow2Process(int pid) {
  if (!ProcessRunning(pid)) return false;
  std::string comm = ReadSmallFile(fmt::format("/proc/{}/comm", pid));
  while (!comm.empty() && comm.back() == '\n') comm.pop_back();
  return comm == "ublk-qcow2";
}

namespace {

// One attempt at stopping device `dev_id` only if nobody uses it (see
// SafeStopFor). The exclusive open is held across STOP_DEV so that nothing
// can mount the device in between; a node that is already gone (a dead
// daemon) is simply stopped.
Status StopIfUnused(ControlDevice& control, int dev_id) {
  if (SafeStopFor(control.features()) == SafeStop::kTryStopDev) {
    return control.TryStopDevice(dev_id);
  }
  const std::string node = BlockDevicePath(dev_id);
  const int fd = ::open(node.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC);
  if (fd < 0 && errno == EBUSY) return Status::IoError(node + ": busy", EBUSY);
  Status stopped = control.StopDevice(dev_id);
  if (fd >= 0) ::close(fd);
  return stopped;
}

// StopIfUnused, retried for about a second while the device is busy: udev
// probes a new device (blkid) and holds it open for a moment.
Status StopUnlessInUse(ControlDevice& control, int dev_id) {
  constexpr int kAttempts = 10;
  for (int attempt = 1;; ++attempt) {
    Status stopped = StopIfUnused(control, dev_id);
    if (stopped.error_number() != EBUSY) return stopped;
    if (attempt == kAttempts) {
      return Status::Busy(fmt::format(
          "ublk device {} is in use ({} is open or mounted); unmount it or close it, or use "
          "del --force",
          dev_id, BlockDevicePath(dev_id)));
    }
    ::usleep(100'000);
  }
}

}  // namespace

Status DeleteDevice(ControlDevice& control, int dev_id, const DeleteOptions& options) {
  const std::optional<DeviceRecord> record = RecordOrNothing(dev_id);
  Result<ublksrv_ctrl_dev_info> info = control.GetInfo(dev_id);
  if (!info.ok()) {
    if (!IsNoDevice(info.status())) return info.status();
    if (record.has_value()) return RemoveRecord(dev_id);  // stale: the device is gone
    return Status::InvalidArgument(fmt::format("ublk device {} does not exist", dev_id));
  }

  // The serving process, if any.
  int pid = 0;
  bool ours = false;
  if (record.has_value() && record->pid > 0 &&
      (info->ublksrv_pid == record->pid || IsUblkQcow2Process(record->pid))) {
    pid = record->pid;
  } else if (info->ublksrv_pid > 0 && ProcessRunning(info->ublksrv_pid)) {
    pid = info->ublksrv_pid;
  }
  int pidfd = pid > 0 ? OpenPidfd(pid) : -1;
  if (pidfd >= 0) ours = IsUblkQcow2Process(pid);

  Status result;
  Status stopped = options.force ? control.StopDevice(dev_id) : StopUnlessInUse(control, dev_id);
  if (!stopped.ok() && !IsNoDevice(stopped)) {
    if (pidfd >= 0) ::close(pidfd);
    return stopped;
  }

  if (pidfd >= 0) {
    if (!WaitExit(pidfd, options.timeout_ms)) {
      if (!ours) {
        ::close(pidfd);
        return Status::Busy(
            fmt::format("ublk device {}: its server (pid {}) did not exit within {} s of STOP_DEV; "
                        "not deleting",
                        dev_id, pid, options.timeout_ms / 1000));
      }
      ::syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0);
      WaitExit(pidfd, kKillWaitMs);
      result = Status::IoError(fmt::format(
          "ublk device {}: daemon pid {} did not exit within {} s of STOP_DEV and was killed; "
          "its image may not be clean (qemu-img check)",
          dev_id, pid, options.timeout_ms / 1000));
    }
    ::close(pidfd);
    if (result.ok() && ours) result = DaemonOutcome(dev_id);
  }

  // A daemon deletes its device before exiting; do it if it did not. The id
  // is freed once the last reference goes: at once, unless a file system is
  // still mounted on a force-stopped device, which then keeps /dev/ublkcN
  // (shown as dead by `list`) until it is unmounted.
  Result<ublksrv_ctrl_dev_info> still = control.GetInfo(dev_id);
  if (still.ok()) {
    Status deleted = control.DeleteDeviceNoWait(dev_id);
    if (!deleted.ok() && !IsNoDevice(deleted) && result.ok()) result = deleted;
  } else if (!IsNoDevice(still.status()) && result.ok()) {
    result = still.status();
  }
  if (still.ok()) {
    bool freed = false;
    for (int i = 0; i < kFreeWaitMs / 50 && !freed; ++i) {
      freed = IsNoDevice(control.GetInfo(dev_id).status());
      if (!freed) ::usleep(50'000);
    }
    if (!freed) {
      Warn(
          fmt::format("ublk device {} is stopped and deleted, but {} stays until its last user "
                      "lets go of {} (a file system still mounted: unmount it)",
                      dev_id, CharDevicePath(dev_id), BlockDevicePath(dev_id)));
    }
  }
  Status removed = RemoveRecord(dev_id);
  if (!removed.ok() && result.ok()) result = removed;
  return result;
}

std::vector<int> KnownDeviceIds() {
  std::set<int> ids;
  for (int id : KernelDeviceIds()) ids.insert(id);
  for (int id : RecordIds()) ids.insert(id);
  return {ids.begin(), ids.end()};
}

Result<DeviceStatus> DescribeDevice(ControlDevice& control, int dev_id) {
  const std::optional<DeviceRecord> record = RecordOrNothing(dev_id);
  DeviceStatus s;
  s.id = dev_id;
  s.block_path = BlockDevicePath(dev_id);
  if (record.has_value()) {
    s.queues = record->queues;
    s.depth = record->depth;
    s.pid = record->pid;
    s.size = record->size;
    s.read_only = record->read_only;
    s.image = record->image;
  }
  Result<ublksrv_ctrl_dev_info> info = control.GetInfo(dev_id);
  if (!info.ok()) {
    if (!IsNoDevice(info.status())) return info.status();
    if (!record.has_value()) {
      return Status::InvalidArgument(fmt::format("ublk device {} does not exist", dev_id));
    }
    s.state = "gone";
    s.daemon_running = ProcessRunning(s.pid);
    return s;
  }
  s.state = DeviceStateName(info->state);
  s.flags = info->flags;
  s.recovery = RecoveryModeName(RecoveryModeOf(info->flags));
  s.queues = info->nr_hw_queues;
  s.depth = info->queue_depth;
  if (s.pid <= 0 && info->ublksrv_pid > 0) s.pid = info->ublksrv_pid;
  s.daemon_running = ProcessRunning(s.pid);
  if (AwaitsRecovery(info->state) && !s.daemon_running) s.state = "awaiting-recovery";
  if (!record.has_value()) {
    Result<ublk_params> params = control.GetParams(dev_id);
    if (params.ok() && (params->types & UBLK_PARAM_TYPE_BASIC)) {
      s.size = params->basic.dev_sectors << 9;
      s.read_only = (params->basic.attrs & UBLK_ATTR_READ_ONLY) != 0;
    }
  }
  return s;
}

Result<DeviceRecord> PrepareRecover(ControlDevice& control, int dev_id, int timeout_ms) {
  Result<ublksrv_ctrl_dev_info> info = control.GetInfo(dev_id);
  if (!info.ok()) {
    if (IsNoDevice(info.status())) {
      return Status::InvalidArgument(fmt::format("ublk device {} does not exist", dev_id));
    }
    return info.status();
  }
  Result<std::optional<DeviceRecord>> record = ReadRecord(dev_id);
  if (!record.ok()) return record.status();
  if (!record->has_value()) {
    return Status::InvalidArgument(fmt::format(
        "ublk device {}: no record in {} (not added by ublk-qcow2?)", dev_id, StateDir()));
  }
  if (!(info->flags & UBLK_F_USER_RECOVERY)) {
    return Status::InvalidArgument(fmt::format(
        "ublk device {} was added without user recovery (--recovery=off, or a kernel without "
        "UBLK_F_USER_RECOVERY): its daemon cannot be replaced",
        dev_id));
  }
  const int pid = (*record)->pid;
  for (int waited = 0;; waited += 50) {
    if (IsUblkQcow2Process(pid)) {
      return Status::Busy(
          fmt::format("ublk device {} is live: its daemon (pid {}) is running", dev_id, pid));
    }
    if (AwaitsRecovery(info->state)) return std::move(**record);
    if (waited >= timeout_ms) {
      return Status::Busy(
          fmt::format("ublk device {} is {} and its daemon (pid {}) is gone, but "
                      "the kernel has not quiesced it within {} s",
                      dev_id, DeviceStateName(info->state), pid, timeout_ms / 1000));
    }
    ::usleep(50'000);
    info = control.GetInfo(dev_id);
    if (!info.ok()) return info.status();
  }
}

}  // namespace uq::driver
