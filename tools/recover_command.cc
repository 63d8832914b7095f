#include "tools/recover_command.h"

#include <cstdio>
#include <string>

#include "driver/admin.h"
#include "driver/control.h"
#include "driver/daemon.h"
#include "tools/image_key.h"
#include "tools/serve_device.h"

namespace uq::tools {
namespace {

// How long recover waits for the kernel to quiesce a device whose daemon has
// just died (its rings are torn down asynchronously).
constexpr int kQuiesceWaitMs = 10'000;

class RecoverCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    AddDeviceIdOption(app, options_.id, "The device number N of /dev/ublkbN")->required();
    app.add_flag("--foreground", options_.foreground,
                 "Serve from this process until the device is deleted or a signal arrives");
    app.footer(
        "Starts a new daemon for a device whose daemon died (devices added with\n"
        "--recovery=reissue or fail-io) and prints /dev/ublkbN once it is live again.\n"
        "An encrypted image needs its passphrase again (--key-file FILE, or --object\n"
        "secret,id=ID,file=FILE): no daemon and no file under /run/ublk-qcow2 keeps it.");
  }

  Status Run() override { return RunRecover(options_); }

 private:
  RecoverOptions options_;
};

}  // namespace

Status RunRecover(const RecoverOptions& options) {
  driver::DeviceRecord record;
  {
    ASSIGN_OR_RETURN(std::unique_ptr<driver::ControlDevice> control, driver::ControlDevice::Open());
    ASSIGN_OR_RETURN(record, driver::PrepareRecover(*control, options.id, kQuiesceWaitMs));
  }
  RETURN_IF_ERROR(NeedKeyForDevice(options.id, record.image, record.encrypted, "recover"));
  driver::DeviceOptions device;
  device.key = ImageKeyToWipe();
  device.image = record.image;
  device.working_dir = record.working_dir;
  device.dev_id = options.id;
  device.queues = record.queues;
  device.depth = record.depth;
  device.max_io_buf_bytes = record.max_io;
  device.read_only = record.read_only;
  device.cache_size = record.cache_size;
  device.direct = record.direct;
  device.preallocate = record.preallocate;
  device.poll_us = record.poll_us;
  device.handle_signals = true;
  device.recover = true;
  return ServeAndPrintDevice(device, options.foreground);
}

std::unique_ptr<Command> MakeRecoverCommand() { return std::make_unique<RecoverCommand>(); }

}  // namespace uq::tools
