#include "tools/features_command.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

#include "driver/control.h"
#include "driver/ublk_abi.h"

namespace uq::tools {
namespace {

struct FeaturesOptions {
  std::string output = "human";  // "human" or "json"
};

class FeaturesCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("--output", options_.output, "Output format")
        ->check(CLI::IsMember({"human", "json"}))
        ->capture_default_str();
  }

  Status Run() override {
    ASSIGN_OR_RETURN(std::unique_ptr<driver::ControlDevice> control, driver::ControlDevice::Open());
    std::string text =
        RenderFeatures(control->features(), control->features_known(), options_.output);
    if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size() ||
        std::fflush(stdout) != 0) {
      return Status::IoError("standard output: write failed");
    }
    return Status::Ok();
  }

 private:
  FeaturesOptions options_;
};

}  // namespace

std::string RenderFeatures(uint64_t features, bool answered, const std::string& output) {
  // What add asks for by default: the opcode encoding and, where offered,
  // user recovery with re-issue (add --recovery) and zero copy (add --zero-copy).
  Result<uint64_t> recovery =
      driver::RecoveryFlags(driver::RecoveryMode::kReissue, /*requested=*/false, features);
  Result<uint64_t> zero_copy = driver::ZeroCopyFlags(driver::ZeroCopyMode::kAuto, features);
  const uint64_t used = driver::AddFlags(features) | (recovery.ok() ? *recovery : 0) |
                        (zero_copy.ok() ? *zero_copy : 0);
  if (output == "json") {
    nlohmann::ordered_json j;
    j["get-features"] = answered;
    j["mask"] = features;
    j["features"] = driver::KnownFlagNames(features);
    j["unknown"] = driver::UnknownFlagBits(features);
    j["used-by-add"] = driver::KnownFlagNames(used);
    return j.dump(4) + "\n";
  }
  if (!answered) {
    return "this kernel's ublk has no GET_FEATURES (Linux before 6.5): no optional features\n";
  }
  // One row per set bit, in bit order; the label is the name or "bit N".
  std::vector<std::vector<std::string>> rows = {{"FEATURE", "BIT", "USED BY ADD"}};
  for (int bit = 0; bit < 64; ++bit) {
    const uint64_t mask = uint64_t{1} << bit;
    if ((features & mask) == 0) continue;
    std::vector<std::string> label = driver::FlagLabels(mask);
    rows.push_back({label.at(0), std::to_string(bit), (used & mask) ? "yes" : "no"});
  }
  size_t name_width = 0;
  size_t bit_width = 0;
  for (const auto& row : rows) {
    name_width = std::max(name_width, row[0].size());
    bit_width = std::max(bit_width, row[1].size());
  }
  std::string text;
  for (const auto& row : rows) {
    text += fmt::format("{:<{}}  {:<{}}  {}\n", row[0], name_width, row[1], bit_width, row[2]);
  }
  return text;
}

std::unique_ptr<Command> MakeFeaturesCommand() { return std::make_unique<FeaturesCommand>(); }

}  // namespace uq::tools
