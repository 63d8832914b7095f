#include "tools/info_command.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <cstdio>
#include <utility>

#include "qcow2/open_image.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"
#include "tools/info_format.h"

namespace uq::tools {
namespace {

// IMAGE read as a plain raw image (-f raw), whatever its contents.
Task<Result<qcow2::ImageInfo>> DescribeAsRaw(qcow2::Env* env, std::string path, bool lock) {
  qcow2::ImageOptions options;
  UseImageKey(options);
  options.env = env;
  options.lock = lock;
  options.format = "raw";
  options.no_backing = true;
  CO_ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                      co_await qcow2::OpenImage(path, options));
  qcow2::ImageInfo info;
  info.filename = path;
  info.format = "raw";
  // qemu counts raw images in 512-byte sectors, rounding a partial one up.
  info.virtual_size = (device->size() + 511) / 512 * 512;
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) info.actual_size = static_cast<uint64_t>(st.st_blocks) * 512;
  CO_RETURN_IF_ERROR(co_await device->Close());
  co_return info;
}

class InfoCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", options_.image, "The image to describe")->required();
    app.add_option("--output", options_.output, "Output format")
        ->check(CLI::IsMember({"human", "json"}))
        ->capture_default_str();
    app.add_flag("--backing-chain", options_.backing_chain,
                 "Describe every image of the backing chain, top first");
    app.add_option("-f,--format", options_.format, "IMAGE's format (default: probe)")
        ->check(CLI::IsMember({"qcow2", "raw"}));
    app.add_flag("-U,--force-share", options_.force_share,
                 "Take no image locks: describe an image another process writes");
  }

  Status Run() override {
    // Metadata only: blocking I/O is all info needs.
    Result<std::vector<qcow2::ImageInfo>> infos =
        BlockOn(CollectImageInfo(qcow2::SyncEnv(), options_));
    if (!infos.ok()) return infos.status();
    std::string text = RenderImageInfo(*infos, options_);
    if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size() ||
        std::fflush(stdout) != 0) {
      return Status::IoError("standard output: write failed");
    }
    return Status::Ok();
  }

 private:
  InfoOptions options_;
};

}  // namespace

Task<Result<std::vector<qcow2::ImageInfo>>> CollectImageInfo(qcow2::Env* env, InfoOptions options) {
  if (options.format == "raw") {
    CO_ASSIGN_OR_RETURN(qcow2::ImageInfo info,
                        co_await DescribeAsRaw(env, options.image, !options.force_share));
    co_return std::vector<qcow2::ImageInfo>{std::move(info)};
  }
  qcow2::ImageInfoOptions info_options;
  info_options.backing_chain = options.backing_chain;
  info_options.lock = !options.force_share;
  CO_ASSIGN_OR_RETURN(std::vector<qcow2::ImageInfo> infos,
                      co_await qcow2::GetImageInfo(env, options.image, info_options));
  if (!options.format.empty() && !infos.empty() && infos[0].format != options.format) {
    co_return Status::InvalidArgument(
        fmt::format("{}: image is not in {} format", options.image, options.format));
  }
  co_return infos;
}

std::string RenderImageInfo(const std::vector<qcow2::ImageInfo>& infos,
                            const InfoOptions& options) {
  if (options.output == "json") return FormatInfoJson(infos, options.backing_chain);
  return FormatInfoHumanList(infos);
}

std::unique_ptr<Command> MakeInfoCommand() { return std::make_unique<InfoCommand>(); }

}  // namespace uq::tools
