#include "tools/del_command.h"

#include <cstdio>

#include "driver/admin.h"
#include "driver/control.h"

namespace uq::tools {
namespace {

class DelCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    CLI::Option* id = AddDeviceIdOption(app, options_.id, "The device number N of /dev/ublkbN");
    CLI::Option* all = app.add_flag("-a,--all", options_.all, "Every ublk device");
    id->excludes(all);
    app.add_flag("-f,--force", options_.force,
                 "Stop the device even while it is open or mounted (its users get I/O errors)");
    app.add_option("--timeout", options_.timeout_s,
                   "Seconds to wait for a daemon to close its image and exit")
        ->check(CLI::Range(1, 3600))
        ->capture_default_str();
    app.callback([this] {
      if (options_.id < 0 && !options_.all) throw CLI::RequiredError("-n ID or --all");
    });
  }

  Status Run() override { return RunDel(options_); }

 private:
  DelOptions options_;
};

}  // namespace

Status RunDel(const DelOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<driver::ControlDevice> control, driver::ControlDevice::Open());
  driver::DeleteOptions del;
  del.timeout_ms = options.timeout_s * 1000;
  del.force = options.force;
  if (!options.all) return driver::DeleteDevice(*control, options.id, del);

  Status first;
  for (int id : driver::KnownDeviceIds()) {
    Status status = driver::DeleteDevice(*control, id, del);
    if (status.ok()) continue;
    if (first.ok()) {
      first = status;
    } else {
      std::fprintf(stderr, "ublk-qcow2: %s\n", status.ToString().c_str());
    }
  }
  return first;
}

std::unique_ptr<Command> MakeDelCommand() { return std::make_unique<DelCommand>(); }

}  // namespace uq::tools
