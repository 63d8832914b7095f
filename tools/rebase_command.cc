#include "tools/rebase_command.h"

#include <fmt/format.h>

#include <cstdio>
#include <string>

#include "qcow2/sync_env.h"
#include "tools/progress.h"
#include "tools/rebase_image.h"

namespace uq::tools {
namespace {

class RebaseCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", request_.image, "The qcow2 image whose backing file changes")
        ->required();
    backing_option_ =
        app.add_option("-b,--backing", request_.backing, "The new backing file (\"\": none)");
    app.add_option("-F,--backing-format", request_.backing_format, "The new backing file's format");
    app.add_option("-f,--format", request_.format, "IMAGE's format (default: probe)");
    app.add_flag("-u,--unsafe", request_.unsafe,
                 "Change only the header: copy nothing, open no backing file");
    app.add_flag("-p,--progress", progress_, "Show progress on stdout");
    app.add_flag("-q,--quiet", quiet_, "No progress");
    app.add_flag("-U,--force-share", force_share_, "Take no lock on the new backing file");
  }

  Status Run() override {
    if (!request_.unsafe && backing_option_->count() == 0) {
      return Status::InvalidArgument(fmt::format(
          "{}: Must specify backing file (-b) or use unsafe mode (-u)", request_.image));
    }
    for (const std::string* f : {&request_.format, &request_.backing_format}) {
      if (!f->empty() && *f != "qcow2" && *f != "raw") {
        return Status::InvalidArgument(fmt::format(
            "{}: Invalid format name: '{}' (qcow2 and raw are supported)", request_.image, *f));
      }
    }
    const bool progress = progress_ && !quiet_;
    ProgressMeter meter(progress ? stdout : nullptr);
    request_.env = qcow2::SyncEnv();
    request_.lock_new_backing = !force_share_;
    request_.on_progress = [&meter](uint64_t done, uint64_t total) { meter.Update(done, total); };
    meter.Start();
    Status status = BlockOn(RebaseImage(request_));
    if (status.ok()) {
      meter.Finish();
    } else if (progress) {
      std::fputc('\n', stdout);
    }
    std::fflush(stdout);
    return status;
  }

 private:
  RebaseRequest request_;
  CLI::Option* backing_option_ = nullptr;
  bool progress_ = false;
  bool quiet_ = false;
  bool force_share_ = false;
};

}  // namespace

std::unique_ptr<Command> MakeRebaseCommand() { return std::make_unique<RebaseCommand>(); }

}  // namespace uq::tools
