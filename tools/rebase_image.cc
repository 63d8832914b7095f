#include "tools/rebase_image.h"

#include <fmt/format.h>

#include <memory>
#include <optional>

#include "qcow2/backing_link.h"
#include "qcow2/open_image.h"
#include "qcow2/paths.h"
#include "qcow2/qcow2_image.h"
#include "tools/chain_differences.h"
#include "tools/image_key.h"

namespace uq::tools {
namespace {

using DevicePtr = std::unique_ptr<qcow2::BlockDevice>;

// "Could not change the backing file to 'X': <reason>".
Status ChangeError(const RebaseRequest& r, const std::string& reason) {
  return Status::InvalidArgument(
      fmt::format("{}: Could not change the backing file to '{}': {}", r.image, r.backing, reason));
}

Task<Status> RebaseOpen(const RebaseRequest& r, qcow2::BlockDevice& device,
                        DevicePtr& new_backing) {
  auto* image = dynamic_cast<qcow2::Qcow2Image*>(&device);
  if (image == nullptr) co_return ChangeError(r, "Operation not supported");
  if (!r.unsafe && !r.backing.empty()) {
    qcow2::ImageOptions options;
    UseImageKey(options);
    options.env = r.env;
    options.format = r.backing_format;
    options.lock = r.lock_new_backing;
    Result<DevicePtr> opened =
        co_await qcow2::OpenImage(qcow2::ResolveRelativeTo(r.image, r.backing), options);
    if (!opened.ok()) {
      co_return opened.status().WithContext(
          fmt::format("{}: Could not open new backing file '{}'", r.image, r.backing));
    }
    new_backing = std::move(*opened);
  }
  // Everything the header change could refuse, refused before any write.
  if (!r.backing.empty() && r.backing_format.empty()) {
    co_return ChangeError(r, "backing format must be specified");
  }
  const std::optional<std::string> format =
      r.backing_format.empty() ? std::nullopt : std::optional<std::string>(r.backing_format);
  Result<qcow2::Header> changed = qcow2::WithBackingFile(image->header(), r.backing, format);
  if (!changed.ok()) co_return ChangeError(r, changed.status().message());
  if (!r.unsafe) {
    CO_RETURN_IF_ERROR(co_await CopyChainDifferences(*image, new_backing.get(), r.on_progress));
  }
  co_return co_await image->SetBackingFile(r.backing, format);
}

}  // namespace

Task<Status> RebaseImage(const RebaseRequest& request) {
  if (request.env == nullptr) co_return Status::InvalidArgument("RebaseImage: no Env given");
  qcow2::ImageOptions options;
  UseImageKey(options);
  options.env = request.env;
  options.format = request.format;
  options.writable = true;
  options.no_backing = request.unsafe;  // a rename must work when the old file is gone
  CO_ASSIGN_OR_RETURN(DevicePtr image, co_await qcow2::OpenImage(request.image, options));
  DevicePtr new_backing;
  Status status = co_await RebaseOpen(request, *image, new_backing);
  if (new_backing) (void)co_await new_backing->Close();
  Status closed = co_await image->Close();
  co_return status.ok() ? closed : status;
}

}  // namespace uq::tools
