#include "tools/rebase_command.h"

#include <fmt/format.h>

#include <cstdio>
#include <optional>
#include <string>

#include "qcow2/backing_link.h"
#include "qcow2/open_image.h"
#include "qcow2/paths.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "tools/chain_differences.h"
#include "tools/progress.h"

namespace uq::tools {
namespace {

class RebaseCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", image_, "The qcow2 image whose backing file changes")->required();
    backing_option_ = app.add_option("-b,--backing", backing_, "The new backing file (\"\": none)");
    app.add_option("-F,--backing-format", backing_format_, "The new backing file's format");
    app.add_option("-f,--format", format_, "IMAGE's format (default: probe)");
    app.add_flag("-u,--unsafe", unsafe_,
                 "Change only the header: copy nothing, open no backing file");
    app.add_flag("-p,--progress", progress_, "Show progress on stdout");
    app.add_flag("-q,--quiet", quiet_, "No progress");
    app.add_flag("-U,--force-share", force_share_, "Take no lock on the new backing file");
  }

  Status Run() override {
    const bool has_backing = backing_option_->count() > 0;
    if (!unsafe_ && !has_backing) {
      return Status::InvalidArgument(
          fmt::format("{}: Must specify backing file (-b) or use unsafe mode (-u)", image_));
    }
    for (const std::string* f : {&format_, &backing_format_}) {
      if (!f->empty() && *f != "qcow2" && *f != "raw") {
        return Status::InvalidArgument(
            fmt::format("{}: Invalid format name: '{}' (qcow2 and raw are supported)", image_, *f));
      }
    }
    ProgressMeter meter(progress_ && !quiet_ ? stdout : nullptr);
    meter.Start();
    Status status = BlockOn(Rebase(meter));
    if (!status.ok() && progress_ && !quiet_) std::fputc('\n', stdout);
    if (status.ok()) meter.Finish();
    std::fflush(stdout);
    return status;
  }

 private:
  // "Could not change the backing file to 'X': <reason>".
  Status ChangeError(const std::string& reason) const {
    return Status::InvalidArgument(
        fmt::format("{}: Could not change the backing file to '{}': {}", image_, backing_, reason));
  }

  Task<Status> Rebase(ProgressMeter& meter) {
    qcow2::ImageOptions options;
    options.env = qcow2::SyncEnv();
    options.format = format_;
    options.writable = true;
    options.no_backing = unsafe_;  // a rename must work when the old file is gone
    CO_ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> image,
                        co_await qcow2::OpenImage(image_, options));
    std::unique_ptr<qcow2::BlockDevice> new_backing;
    Status status = co_await RebaseOpen(*image, new_backing, meter);
    if (new_backing) (void)co_await new_backing->Close();
    Status closed = co_await image->Close();
    co_return status.ok() ? closed : status;
  }

  Task<Status> RebaseOpen(qcow2::BlockDevice& device,
                          std::unique_ptr<qcow2::BlockDevice>& new_backing, ProgressMeter& meter) {
    auto* image = dynamic_cast<qcow2::Qcow2Image*>(&device);
    if (image == nullptr) co_return ChangeError("Operation not supported");
    if (!unsafe_ && !backing_.empty()) {
      qcow2::ImageOptions options;
      options.env = qcow2::SyncEnv();
      options.format = backing_format_;
      options.lock = !force_share_;
      Result<std::unique_ptr<qcow2::BlockDevice>> opened =
          co_await qcow2::OpenImage(qcow2::ResolveRelativeTo(image_, backing_), options);
      if (!opened.ok()) {
        co_return opened.status().WithContext(
            fmt::format("{}: Could not open new backing file '{}'", image_, backing_));
      }
      new_backing = std::move(*opened);
    }
    // Everything the header change could refuse, refused before any write.
    if (!backing_.empty() && backing_format_.empty()) {
      co_return ChangeError("backing format must be specified");
    }
    const std::optional<std::string> format =
        backing_format_.empty() ? std::nullopt : std::optional<std::string>(backing_format_);
    Result<qcow2::Header> changed = qcow2::WithBackingFile(image->header(), backing_, format);
    if (!changed.ok()) co_return ChangeError(changed.status().message());
    if (!unsafe_) {
      CO_RETURN_IF_ERROR(co_await CopyChainDifferences(
          *image, new_backing.get(),
          [&meter](uint64_t done, uint64_t total) { meter.Update(done, total); }));
    }
    co_return co_await image->SetBackingFile(backing_, format);
  }

  std::string image_;
  std::string backing_;
  CLI::Option* backing_option_ = nullptr;
  std::string backing_format_;
  std::string format_;
  bool unsafe_ = false;
  bool progress_ = false;
  bool quiet_ = false;
  bool force_share_ = false;
};

}  // namespace

std::unique_ptr<Command> MakeRebaseCommand() { return std::make_unique<RebaseCommand>(); }

}  // namespace uq::tools
