#include "tools/resize_command.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "qcow2/create/option_list.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"
#include "tools/live_device.h"

namespace uq::tools {

Result<uint64_t> SizeChange::Apply(uint64_t current) const {
  // qemu-img computes in int64_t: anything at or past 2^63 is "negative".
  constexpr uint64_t kMax = std::numeric_limits<int64_t>::max();
  auto not_positive = [] { return Status::InvalidArgument("New image size must be positive"); };
  switch (kind) {
    case Kind::kAbsolute:
      if (bytes == 0 || bytes > kMax) return not_positive();
      return bytes;
    case Kind::kGrow:
      if (bytes > kMax - current || current + bytes == 0) return not_positive();
      return current + bytes;
    case Kind::kShrink:
      if (bytes >= current) return not_positive();
      return current - bytes;
  }
  return not_positive();
}

Result<SizeChange> ParseSizeChange(std::string_view text) {
  SizeChange change;
  if (!text.empty() && (text[0] == '+' || text[0] == '-')) {
    change.kind = text[0] == '+' ? SizeChange::Kind::kGrow : SizeChange::Kind::kShrink;
    text.remove_prefix(1);
  }
  ASSIGN_OR_RETURN(change.bytes, qcow2::ParseOptionSize("size", text));
  return change;
}

namespace {

class ResizeCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", image_, "The image to resize (not with -n)");
    app.add_option("SIZE", size_, "New size, or +SIZE / -SIZE relative to the current one");
    CLI::Option* id =
        AddDeviceIdOption(app, id_, "Resize the running device N (/dev/ublkbN) and its image");
    app.add_flag("--shrink", shrink_, "Allow a smaller size (deletes the data past the new end)");
    app.add_option("--preallocation", preallocation_,
                   "How the grown area is allocated: off, metadata, falloc, full")
        ->check(CLI::IsMember({"off", "metadata", "falloc", "full"}))
        ->excludes(id);
    app.add_option("-f,--format", format_, "IMAGE's format (default: probe)")
        ->check(CLI::IsMember({"qcow2", "raw"}))
        ->excludes(id);
    app.add_flag("-q,--quiet", quiet_, "Print nothing on success");
    app.callback([this] {
      if (id_ >= 0) {
        // `resize -n ID SIZE`: the one positional is the size.
        if (!image_.empty() && !size_.empty()) {
          throw CLI::ValidationError("-n ID resizes a device: give SIZE, not IMAGE");
        }
        if (size_.empty()) size_ = std::exchange(image_, "");
        if (size_.empty()) throw CLI::RequiredError("SIZE");
      } else if (image_.empty() || size_.empty()) {
        throw CLI::RequiredError(image_.empty() ? "IMAGE" : "SIZE");
      }
    });
  }

  Status Run() override {
    ASSIGN_OR_RETURN(SizeChange change, ParseSizeChange(size_));
    if (id_ >= 0) return ResizeLive(change);
    const qcow2::Preallocation prealloc = *qcow2::ParsePreallocation(preallocation_);
    qcow2::ImageOptions options;
    UseImageKey(options);
    options.env = qcow2::SyncEnv();
    options.format = format_;
    options.writable = true;
    ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                     BlockOn(qcow2::OpenImage(image_, options)));
    Status st = Resize(*device, change, prealloc);
    Status closed = BlockOn(device->Close());
    if (st.ok()) st = closed;
    if (!st.ok()) return st;
    if (!quiet_) std::printf("Image resized.\n");
    return Status::Ok();
  }

 private:
  Status Resize(qcow2::BlockDevice& device, const SizeChange& change,
                qcow2::Preallocation prealloc) {
    const uint64_t current = device.size();
    Result<uint64_t> target = change.Apply(current);
    if (!target.ok()) return target.status().WithContext(image_);
    if (*target <= current && prealloc != qcow2::Preallocation::kOff) {
      return Status::InvalidArgument(
          fmt::format("{}: preallocation can only be used for growing images", image_));
    }
    if (*target < current && !shrink_) {
      return Status::InvalidArgument(fmt::format(
          "{}: use the --shrink option to perform a shrink operation (shrinking deletes all data "
          "past the new end)",
          image_));
    }
    return BlockOn(device.Resize(*target, prealloc));
  }

  // Through the device's daemon (driver/control_socket.h): "info" for the
  // current size, then "resize"; the daemon checks and does the rest
  // (driver::Device::Resize).
  Status ResizeLive(const SizeChange& change) {
    const std::string who = fmt::format("ublk device {}", id_);
    Result<nlohmann::json> info = CallLiveDevice(id_, {{"verb", "info"}});
    if (!info.ok()) {
      return info.status().IsIoError() ? info.status().WithContext(who) : info.status();
    }
    const auto size = info->find("size");
    if (size == info->end() || !size->is_number_unsigned()) {
      return Status::IoError(fmt::format("{}: the daemon's info has no size", who));
    }
    Result<uint64_t> target = change.Apply(size->get<uint64_t>());
    if (!target.ok()) return target.status().WithContext(who);
    nlohmann::json request = {{"verb", "resize"}, {"size", *target}, {"shrink", shrink_}};
    Result<nlohmann::json> done = CallLiveDevice(id_, request);
    if (!done.ok()) return done.status();
    if (!quiet_) std::printf("Image resized.\n");
    return Status::Ok();
  }

  std::string image_, size_, format_, preallocation_ = "off";
  int id_ = -1;
  bool shrink_ = false, quiet_ = false;
};

}  // namespace

std::unique_ptr<Command> MakeResizeCommand() { return std::make_unique<ResizeCommand>(); }

}  // namespace uq::tools
