#include "driver/control.h"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "driver/uring_cmd.h"

namespace uq::driver {
namespace {

// Waits for the one CQE of a control command.
struct CommandWaiter final : uring::Completion {
  int32_t res = 0;
  bool done = false;
  void Complete(int32_t r, uint32_t) override {
    res = r;
    done = true;
  }
};

std::string DeviceName(int dev_id) { return fmt::format("ublk device {}", dev_id); }

}  // namespace

Result<std::unique_ptr<ControlDevice>> ControlDevice::Open() {
  auto control = std::make_unique<ControlDevice>(Key());
  control->fd_ = ::open(kControlPath, O_RDWR | O_CLOEXEC);
  if (control->fd_ < 0) {
    int err = errno;
    if (err == ENOENT || err == ENODEV || err == ENXIO) return Status::NotSupported(kNoUblkMessage);
    return Status::FromErrno(err, kControlPath);
  }
  uring::RingOptions options;
  options.entries = 4;
  options.sqe128 = true;
  options.extra_opcodes = {IORING_OP_URING_CMD};
  Result<std::unique_ptr<uring::Ring>> ring = uring::Ring::Create(options);
  if (!ring.ok()) return ring.status().WithContext("ublk control ring");
  control->ring_ = std::move(ring).value();

  uint64_t features = 0;
  ublksrv_ctrl_cmd cmd = Header(-1);
  cmd.addr = reinterpret_cast<uintptr_t>(&features);
  cmd.len = sizeof(features);
  Result<int> got = control->Run("GET_FEATURES", UBLK_U_CMD_GET_FEATURES, cmd);
  // Kernels before 6.5 do not know the command (EOPNOTSUPP or EINVAL):
  // they offer no optional feature and speak the legacy opcodes.
  control->features_known_ = got.ok();
  control->features_ = got.ok() ? features : 0;
  control->ops_ = Opcodes::For(control->features_);
  return control;
}

ControlDevice::~ControlDevice() {
  ring_.reset();
  if (fd_ >= 0) ::close(fd_);
}

ublksrv_ctrl_cmd ControlDevice::Header(int dev_id) {
  ublksrv_ctrl_cmd cmd{};
  cmd.dev_id = static_cast<uint32_t>(dev_id);
  cmd.queue_id = 0xffff;  // not a queue command
  return cmd;
}

Result<int> ControlDevice::Run(const char* name, uint32_t op, const ublksrv_ctrl_cmd& cmd) {
  CommandWaiter waiter;
  PrepUringCmd(ring_->GetSqe(), fd_, op, cmd, uring::UserData::ForCompletion(&waiter));
  while (!waiter.done) {
    if (!ring_->Poll()) break;
  }
  if (!waiter.done) return Status::IoError(fmt::format("{}: no completion", name));
  if (waiter.res < 0) {
    const int dev_id = static_cast<int>(cmd.dev_id);
    std::string who = dev_id < 0 ? std::string("ublk") : DeviceName(dev_id);
    return Status::IoError(fmt::format("{}: {}: {}", who, name, std::strerror(-waiter.res)),
                           -waiter.res);
  }
  return waiter.res;
}

Result<ublksrv_ctrl_dev_info> ControlDevice::AddDevice(const AddRequest& request) {
  ublksrv_ctrl_dev_info info{};
  info.nr_hw_queues = request.queues;
  info.queue_depth = request.depth;
  info.max_io_buf_bytes = request.max_io_buf_bytes;
  info.dev_id = static_cast<uint32_t>(request.dev_id);
  info.ublksrv_pid = static_cast<int32_t>(::getpid());
  info.flags = request.flags;
  info.flags |= AddFlags(features_);
  ublksrv_ctrl_cmd cmd = Header(request.dev_id);
  cmd.addr = reinterpret_cast<uintptr_t>(&info);
  cmd.len = sizeof(info);
  Result<int> r = Run("ADD_DEV", ops_.add_dev, cmd);
  if (!r.ok()) {
    Status s = r.status();
    if (request.dev_id >= 0 && s.error_number() == EEXIST) {
      return Status::Busy(fmt::format("ublk device {} already exists", request.dev_id));
    }
    return s;
  }
  return info;
}

Status ControlDevice::SetParams(int dev_id, const ublk_params& params) {
  ublk_params copy = params;
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.addr = reinterpret_cast<uintptr_t>(&copy);
  cmd.len = sizeof(copy);
  return Run("SET_PARAMS", ops_.set_params, cmd).status();
}

Status ControlDevice::StartDevice(int dev_id, int daemon_pid) {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.data[0] = static_cast<uint64_t>(daemon_pid);
  return Run("START_DEV", ops_.start_dev, cmd).status();
}

Status ControlDevice::StartUserRecovery(int dev_id) {
  return Run("START_USER_RECOVERY", ops_.start_user_recovery, Header(dev_id)).status();
}

Status ControlDevice::EndUserRecovery(int dev_id, int daemon_pid) {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.data[0] = static_cast<uint64_t>(daemon_pid);
  return Run("END_USER_RECOVERY", ops_.end_user_recovery, cmd).status();
}

Status ControlDevice::StopDevice(int dev_id) {
  return Run("STOP_DEV", ops_.stop_dev, Header(dev_id)).status();
}

Status ControlDevice::DeleteDeviceNoWait(int dev_id) {
  // DEL_DEV_ASYNC has no feature bit: a kernel before 6.9 answers it as an
  // unknown command (EOPNOTSUPP; ENOTSUPP, 524, from some versions).
  if (ops_.del_dev == UBLK_U_CMD_DEL_DEV) {
    Status deleted = Run("DEL_DEV_ASYNC", UBLK_U_CMD_DEL_DEV_ASYNC, Header(dev_id)).status();
    const int err = deleted.error_number();
    if (err != EOPNOTSUPP && err != 524 && err != EINVAL) return deleted;
  }
  return DeleteDevice(dev_id);
}

Status ControlDevice::TryStopDevice(int dev_id) {
  return Run("TRY_STOP_DEV", UBLK_U_CMD_TRY_STOP_DEV, Header(dev_id)).status();
}

Status ControlDevice::DeleteDevice(int dev_id) {
  return Run("DEL_DEV", ops_.del_dev, Header(dev_id)).status();
}

Status ControlDevice::UpdateSize(int dev_id, uint64_t sectors) {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.data[0] = sectors;
  return Run("UPDATE_SIZE", UBLK_U_CMD_UPDATE_SIZE, cmd).status();
}

Status ControlDevice::QuiesceDevice(int dev_id, uint32_t timeout_ms) {
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.data[0] = timeout_ms;
  return Run("QUIESCE_DEV", UBLK_U_CMD_QUIESCE_DEV, cmd).status();
}

Result<ublksrv_ctrl_dev_info> ControlDevice::GetInfo(int dev_id) {
  ublksrv_ctrl_dev_info info{};
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.addr = reinterpret_cast<uintptr_t>(&info);
  cmd.len = sizeof(info);
  Result<int> r = Run("GET_DEV_INFO", ops_.get_dev_info, cmd);
  if (!r.ok()) return r.status();
  return info;
}

Result<ublk_params> ControlDevice::GetParams(int dev_id) {
  ublk_params params{};
  params.len = sizeof(params);
  ublksrv_ctrl_cmd cmd = Header(dev_id);
  cmd.addr = reinterpret_cast<uintptr_t>(&params);
  cmd.len = sizeof(params);
  Result<int> r = Run("GET_PARAMS", ops_.get_params, cmd);
  if (!r.ok()) return r.status();
  return params;
}

std::vector<int> KernelDeviceIds() {
  std::vector<int> ids;
  DIR* dir = ::opendir("/sys/class/ublk-char-device");
  if (dir == nullptr) return ids;
  while (dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name.size() <= 5 || name.compare(0, 5, "ublkc") != 0 || name.size() > 14) continue;
    std::string digits = name.substr(5);
    if (!std::all_of(digits.begin(), digits.end(), ::isdigit)) continue;
    ids.push_back(std::stoi(digits));
  }
  ::closedir(dir);
  std::sort(ids.begin(), ids.end());
  return ids;
}

}  // namespace uq::driver
