#include "tools/commit_command.h"

#include <cstdio>
#include <string>

#include "qcow2/sync_env.h"
#include "tools/commit_image.h"
#include "tools/progress.h"

namespace uq::tools {
namespace {

class CommitCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", image_, "The overlay whose data goes down")->required();
    base_option_ = app.add_option("-b,--base", base_name_,
                                  "The image further down the chain to commit into (implies -d)");
    app.add_flag("-d,--keep", keep_, "Do not empty IMAGE afterwards");
    app.add_option("-f,--format", format_, "IMAGE's format (default: probe)")
        ->check(CLI::IsMember({"qcow2", "raw"}));
    app.add_flag("-p,--progress", progress_, "Show progress on stdout");
    app.add_flag("-q,--quiet", quiet_, "Print nothing but errors");
  }

  Status Run() override {
    const bool progress = progress_ && !quiet_;
    ProgressMeter meter(progress ? stdout : nullptr);
    CommitRequest request;
    request.env = qcow2::SyncEnv();
    request.image = image_;
    request.format = format_;
    if (base_option_->count() > 0) request.base = base_name_;
    request.keep = keep_ || request.base.has_value();  // as qemu-img: -b implies -d
    request.on_progress = [&meter](uint64_t done, uint64_t total) { meter.Update(done, total); };
    meter.Start();
    Status status = BlockOn(CommitImage(request));
    if (!status.ok()) {
      if (progress) std::fputc('\n', stdout);
      std::fflush(stdout);
      return status;
    }
    meter.Finish();
    if (!quiet_) std::printf("Image committed.\n");
    std::fflush(stdout);
    return Status::Ok();
  }

 private:
  std::string image_;
  std::string base_name_;
  CLI::Option* base_option_ = nullptr;
  std::string format_;
  bool keep_ = false;
  bool progress_ = false;
  bool quiet_ = false;
};

}  // namespace

std::unique_ptr<Command> MakeCommitCommand() { return std::make_unique<CommitCommand>(); }

}  // namespace uq::tools
