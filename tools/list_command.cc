#include "tools/list_command.h"

#include <fmt/format.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "driver/control.h"
#include "driver/ublk_abi.h"
#include "tools/size_format.h"

namespace uq::tools {
namespace {

class ListCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("--output", options_.output, "Output format")
        ->check(CLI::IsMember({"human", "json"}))
        ->capture_default_str();
  }

  Status Run() override { return RunList(options_); }

 private:
  ListOptions options_;
};

}  // namespace

std::string RenderDeviceList(const std::vector<driver::DeviceStatus>& devices,
                             const std::string& output) {
  if (output == "json") {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const driver::DeviceStatus& d : devices) {
      nlohmann::ordered_json j;
      j["id"] = d.id;
      j["device"] = d.block_path;
      j["state"] = d.state;
      j["queues"] = d.queues;
      j["depth"] = d.depth;
      j["pid"] = d.pid > 0 ? nlohmann::ordered_json(d.pid) : nlohmann::ordered_json(nullptr);
      j["daemon_running"] = d.daemon_running;
      j["size"] = d.size;
      j["read_only"] = d.read_only;
      j["image"] =
          d.image.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(d.image);
      j["flags"] = d.flags.has_value() ? nlohmann::ordered_json(driver::FlagLabels(*d.flags))
                                       : nlohmann::ordered_json(nullptr);
      j["recovery"] =
          d.recovery.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(d.recovery);
      list.push_back(std::move(j));
    }
    return list.dump(4) + "\n";
  }
  if (devices.empty()) return "";
  std::vector<std::vector<std::string>> rows = {
      {"ID", "DEVICE", "STATE", "QUEUES", "DEPTH", "PID", "SIZE", "IMAGE"}};
  for (const driver::DeviceStatus& d : devices) {
    std::string image = d.image.empty() ? "-" : d.image;
    if (d.read_only && !d.image.empty()) image += " (read-only)";
    rows.push_back({std::to_string(d.id), d.block_path, d.state, std::to_string(d.queues),
                    std::to_string(d.depth), d.daemon_running ? std::to_string(d.pid) : "-",
                    d.size > 0 ? HumanSize(d.size) : "-", image});
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  }
  std::string text;
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += i + 1 < row.size() ? fmt::format("{:<{}}  ", row[i], width[i]) : row[i];
    }
    text += line + "\n";
  }
  return text;
}

Status RunList(const ListOptions& options) {
  std::vector<int> ids = driver::KnownDeviceIds();
  std::vector<driver::DeviceStatus> devices;
  if (!ids.empty()) {
    ASSIGN_OR_RETURN(std::unique_ptr<driver::ControlDevice> control, driver::ControlDevice::Open());
    for (int id : ids) {
      Result<driver::DeviceStatus> status = driver::DescribeDevice(*control, id);
      // A device deleted since the ids were read is simply not listed.
      if (!status.ok()) {
        if (status.status().IsInvalidArgument()) continue;
        return status.status();
      }
      devices.push_back(std::move(status).value());
    }
  }
  std::string text = RenderDeviceList(devices, options.output);
  if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size() || std::fflush(stdout) != 0) {
    return Status::IoError("standard output: write failed");
  }
  return Status::Ok();
}

std::unique_ptr<Command> MakeListCommand() { return std::make_unique<ListCommand>(); }

}  // namespace uq::tools
