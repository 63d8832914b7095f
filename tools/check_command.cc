#include "tools/check_command.h"

#include <fmt/format.h>

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <variant>

#include "qcow2/check/check.h"
#include "qcow2/image_lock.h"
#include "qcow2/open_image.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"

namespace uq::tools {
namespace {

class CheckCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", image_, "The image to check")->required();
    app.add_option("-r,--repair", repair_, "Repair leaks, or everything that can be repaired")
        ->check(CLI::IsMember({"leaks", "all"}));
    app.add_option("--output", output_, "Output format")->check(CLI::IsMember({"human", "json"}));
    app.add_option("-f,--format", format_, "Image format (default: probed)")
        ->check(CLI::IsMember({"qcow2", "raw"}));
    app.add_flag("-q,--quiet", quiet_, "Print nothing; only the exit status tells");
    app.add_flag("-U,--force-share", force_share_,
                 "Take no image lock: check an image another process writes (its half-done "
                 "updates may show as errors); not with --repair");
    app.footer(
        "Exit status: 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check failed\n"
        "(or the image, its backing chain or its data file cannot be opened), 63 the format\n"
        "has no checks (raw), as with qemu-img check.");
  }

  Status Run() override {
    const bool repair = !repair_.empty();
    if (repair && force_share_) {  // qemu-img refuses this too (exit 1)
      return Status::InvalidArgument(
          fmt::format("{}: --force-share can only be used without --repair (read-only)", image_));
    }
    qcow2::OpenOptions open;
    open.writable = repair;
    ASSIGN_OR_RETURN(std::unique_ptr<qcow2::File> file, qcow2::SyncEnv()->Open(image_, open));
    // Checking an image another process writes would report its half-done
    // updates; repairing it would destroy them.
    if (!force_share_) RETURN_IF_ERROR(qcow2::LockImage(file->fd(), image_, repair));
    ASSIGN_OR_RETURN(bool is_qcow2, BlockOn(qcow2::IsQcow2(*file)));
    if (format_ == "raw" || (format_.empty() && !is_qcow2)) {
      // qemu-img's answer for a raw image, printed even with -q.
      std::cerr << "ublk-qcow2: " << image_ << ": This image format does not support checks\n";
      exit_code_ = kExitNoChecks;
      return Status::Ok();
    }
    // qemu-img check opens the image whole before checking: a backing file
    // or data file that cannot be opened fails it (exit 1).
    qcow2::ImageOptions dependencies;
    UseImageKey(dependencies);
    dependencies.env = qcow2::SyncEnv();
    dependencies.lock = !force_share_;
    RETURN_IF_ERROR(BlockOn(qcow2::OpenDependencies(*file, image_, dependencies)));
    qcow2::CheckOptions options;
    options.repair = repair_ == "all"     ? qcow2::RepairMode::kAll
                     : repair_ == "leaks" ? qcow2::RepairMode::kLeaks
                                          : qcow2::RepairMode::kNone;
    ASSIGN_OR_RETURN(qcow2::CheckResult result, BlockOn(qcow2::CheckImage(*file, options)));
    if (!quiet_) {
      for (const std::string& m : result.messages) std::cerr << m << '\n';
      if (!result.error.empty()) std::cerr << "Check failed: " << result.error << '\n';
      if (output_ == "json") {
        nlohmann::ordered_json j;
        for (const auto& [key, value] : qcow2::CheckJsonFields(result, image_)) {
          std::visit([&j, &k = key](const auto& v) { j[k] = v; }, value);
        }
        std::cout << j.dump(4) << '\n';
      } else {
        std::cout << qcow2::FormatCheckHuman(result, image_);
      }
    }
    exit_code_ = qcow2::CheckExitCode(result);
    return Status::Ok();
  }
  int exit_code() const override { return exit_code_; }

 private:
  // qemu-img check's exit status for a format without checks (raw).
  static constexpr int kExitNoChecks = 63;

  std::string image_, repair_, output_ = "human", format_;
  bool quiet_ = false;
  bool force_share_ = false;
  int exit_code_ = 0;
};

}  // namespace

std::unique_ptr<Command> MakeCheckCommand() { return std::make_unique<CheckCommand>(); }

}  // namespace uq::tools
