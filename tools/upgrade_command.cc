#include "tools/upgrade_command.h"

#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

#include "driver/admin.h"
#include "driver/control.h"
#include "driver/state_file.h"
#include "driver/ublk_abi.h"
#include "tools/image_key.h"
#include "tools/live_device.h"
#include "tools/recover_command.h"

namespace uq::tools {
namespace {

// How long the old daemon may take, after it answered, to finish the
// requests it holds, close the image and exit.
constexpr int kOldDaemonExitMs = 120'000;

class UpgradeCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    AddDeviceIdOption(app, options_.id, "The device number N of /dev/ublkbN")->required();
    app.footer(
        "Hands a live device to a new daemon running this ublk-qcow2 binary, without\n"
        "failing I/O: the old daemon quiesces the device (UBLK_F_QUIESCE, Linux 6.16+),\n"
        "finishes what it holds, closes the image cleanly and exits; the new one\n"
        "recovers the device. Devices added with --recovery=reissue (the default) or\n"
        "fail-io (whose I/O fails during the handover). Prints /dev/ublkbN once live.\n"
        "An encrypted image needs its passphrase again (--key-file FILE, or --object\n"
        "secret,id=ID,file=FILE).");
  }

  Status Run() override { return RunUpgrade(options_); }

 private:
  UpgradeOptions options_;
};

void Warn(const std::string& line) {
  std::fputs(("ublk-qcow2: warning: " + line + "\n").c_str(), stderr);
}

// The last line of the device's daemon log.
std::string LastLogLine(int id) {
  std::ifstream in(driver::LogPath(id));
  std::stringstream text;
  text << in.rdbuf();
  std::string log = text.str();
  while (!log.empty() && log.back() == '\n') log.pop_back();
  const size_t nl = log.rfind('\n');
  return nl == std::string::npos ? log : log.substr(nl + 1);
}

// Waits for the process behind `pidfd` to exit; false after `timeout_ms`.
bool WaitExit(int pidfd, int timeout_ms) {
  pollfd fd{pidfd, POLLIN, 0};
  for (;;) {
    const int n = ::poll(&fd, 1, timeout_ms);
    if (n > 0) return true;
    if (n == 0 || errno != EINTR) return false;
  }
}

// Checks that device `id` can be upgraded; returns its daemon's pid.
Result<int> CheckDevice(int id) {
  ASSIGN_OR_RETURN(std::unique_ptr<driver::ControlDevice> control, driver::ControlDevice::Open());
  Result<ublksrv_ctrl_dev_info> info = control->GetInfo(id);
  if (!info.ok()) {
    if (info.status().error_number() == ENODEV) {
      return Status::InvalidArgument(fmt::format("ublk device {} does not exist", id));
    }
    return info.status();
  }
  RETURN_IF_ERROR(driver::CheckUpgrade(control->features(), info->flags, id));
  ASSIGN_OR_RETURN(std::optional<driver::DeviceRecord> record, driver::ReadRecord(id));
  if (!record.has_value()) {
    return Status::InvalidArgument(fmt::format(
        "ublk device {}: no record in {} (not added by ublk-qcow2?)", id, driver::StateDir()));
  }
  if (!driver::IsUblkQcow2Process(record->pid)) {
    return Status::InvalidArgument(
        fmt::format("ublk device {} is {} and has no running daemon: use recover -n {}", id,
                    driver::DeviceStateName(info->state), id));
  }
  if (info->state != UBLK_S_DEV_LIVE) {
    return Status::Busy(
        fmt::format("ublk device {} is {}, not live", id, driver::DeviceStateName(info->state)));
  }
  RETURN_IF_ERROR(NeedKeyForDevice(id, record->image, record->encrypted, "upgrade"));
  return record->pid;
}

}  // namespace

Status RunUpgrade(const UpgradeOptions& options) {
  const int id = options.id;
  ASSIGN_OR_RETURN(const int old_pid, CheckDevice(id));
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, old_pid, 0));
  if (pidfd < 0)
    return Status::FromErrno(errno, fmt::format("ublk device {}: daemon pid {}", id, old_pid));
  Result<nlohmann::json> answer = CallLiveDevice(id, {{"verb", "upgrade"}});
  if (!answer.ok()) {
    ::close(pidfd);
    return answer.status();
  }
  if (!WaitExit(pidfd, kOldDaemonExitMs)) {
    // Still finishing requests after two minutes: a crash is handled too.
    ::syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0);
    WaitExit(pidfd, 10'000);
    Warn(
        fmt::format("ublk device {}: the old daemon (pid {}) did not exit within {} s of "
                    "quiescing and was killed; the new one recovers after it",
                    id, old_pid, kOldDaemonExitMs / 1000));
  } else {
    const std::string last = LastLogLine(id);
    if (last.find("handed over to a new daemon; image closed cleanly") == std::string::npos) {
      Warn(fmt::format("ublk device {}: the old daemon's last word: {}", id, last));
    }
  }
  ::close(pidfd);
  RecoverOptions recover;
  recover.id = id;
  return RunRecover(recover);
}

std::unique_ptr<Command> MakeUpgradeCommand() { return std::make_unique<UpgradeCommand>(); }

}  // namespace uq::tools
