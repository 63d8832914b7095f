#include "tools/bitmap_command.h"

#include <fmt/format.h>

#include <optional>
#include <string>
#include <vector>

#include "qcow2/bitmap_operations.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "tools/bench_command.h"
#include "tools/live_device.h"

namespace uq::tools {
namespace {

class BitmapCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE BITMAP", positionals_, "The image, then the bitmap's name");
    add_ = app.add_flag("--add")->description("Create the bitmap (enabled unless --disable)");
    remove_ = app.add_flag("--remove")->description("Delete the bitmap");
    clear_ = app.add_flag("--clear")->description("Clear every bit of the bitmap");
    enable_ = app.add_flag("--enable")->description("Make the bitmap track writes");
    disable_ = app.add_flag("--disable")->description("Stop the bitmap tracking writes");
    merge_ = app.add_option("--merge", merges_, "OR bitmap SOURCE into the bitmap")
                 ->type_name("SOURCE")
                 ->allow_extra_args(false);
    merge_->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    app.add_option("-b", source_image_, "Find --merge's SOURCE in this image")
        ->type_name("SRC_IMAGE");
    app.add_option("-F", source_format_, "SRC_IMAGE's format")->type_name("FMT");
    app.add_option("-g", granularity_text_, "--add's granularity in bytes (suffixes k, M, G)")
        ->type_name("GRANULARITY");
    app.add_option("-f,--format", format_, "IMAGE's format")
        ->check(CLI::IsMember({"qcow2", "raw"}));
    AddDeviceIdOption(app, id_,
                      "Work on the running device N (/dev/ublkbN) through its daemon: give only "
                      "BITMAP, no IMAGE");
    app_ = &app;
  }

  int usage_exit_code() const override { return kExitError; }  // as qemu-img's

  Status Run() override {
    using Kind = qcow2::BitmapOperation::Kind;
    std::vector<qcow2::BitmapOperation> ops;
    size_t merge_index = 0;
    for (CLI::Option* o : app_->parse_order()) {
      if (o == add_) ops.push_back({Kind::kAdd});
      if (o == remove_) ops.push_back({Kind::kRemove});
      if (o == clear_) ops.push_back({Kind::kClear});
      if (o == enable_) ops.push_back({Kind::kEnable});
      if (o == disable_) ops.push_back({Kind::kDisable});
      if (o == merge_ && merge_index < merges_.size())
        ops.push_back({Kind::kMerge, merges_[merge_index++]});
    }
    if (ops.empty()) {
      return Status::InvalidArgument(
          "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    std::optional<uint64_t> granularity;
    if (!granularity_text_.empty()) {
      std::optional<uint64_t> g = ParseByteCount(granularity_text_);
      if (!g) return Status::InvalidArgument("Invalid granularity specified");
      granularity = static_cast<uint32_t>(*g);  // QMP's granularity is a uint32
    }
    if (granularity && add_->count() == 0) {
      return Status::InvalidArgument("granularity only supported with --add");
    }
    for (qcow2::BitmapOperation& op : ops) {
      op.granularity = granularity;
      op.enabled = disable_->count() == 0;
    }
    if (!source_format_.empty() && source_image_.empty()) {
      return Status::InvalidArgument("-F only supported with -b");
    }
    if (!source_image_.empty() && merges_.empty()) {
      return Status::InvalidArgument("Merge bitmap source file only supported with --merge");
    }
    if (id_ >= 0) return RunLive(ops);
    if (positionals_.size() < 1) return Status::InvalidArgument("Expecting filename");
    if (positionals_.size() < 2) return Status::InvalidArgument("Expecting bitmap name");
    if (positionals_.size() > 2) {
      return Status::InvalidArgument(fmt::format("Expecting filename and bitmap name"));
    }
    const std::string& image_path = positionals_[0];
    const std::string& bitmap = positionals_[1];

    qcow2::ImageOptions options;
    options.env = qcow2::SyncEnv();
    options.format = format_;
    options.writable = true;
    ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                     BlockOn(qcow2::OpenImage(image_path, options)));
    auto* image = dynamic_cast<qcow2::Qcow2Image*>(device.get());
    // -b: the source image, opened read-only for the merges' bitmaps.
    std::unique_ptr<qcow2::BlockDevice> source_device;
    qcow2::Qcow2Image* source = image;
    if (!source_image_.empty()) {
      qcow2::ImageOptions so;
      so.env = qcow2::SyncEnv();
      so.format = source_format_;
      so.no_backing = true;
      Result<std::unique_ptr<qcow2::BlockDevice>> opened =
          BlockOn(qcow2::OpenImage(source_image_, so));
      if (!opened.ok()) {
        (void)BlockOn(device->Close());
        return Status::InvalidArgument(
            fmt::format("Could not open '{}': {}", source_image_, opened.status().message()));
      }
      source_device = std::move(*opened);
      source = dynamic_cast<qcow2::Qcow2Image*>(source_device.get());
    }

    Status st;
    if (image == nullptr) {
      st = Status::InvalidArgument(
          fmt::format("Operation {} on bitmap {} failed: Operation not supported",
                      qcow2::BitmapOperationName(ops[0].kind), bitmap));
    } else {
      st = BlockOn(qcow2::RunBitmapOperations(*image, bitmap, ops, source));
    }
    if (source_device) (void)BlockOn(source_device->Close());
    Status closed = BlockOn(device->Close());
    return st.ok() ? closed : st;
  }

  // -n ID: the device's daemon runs the operations between requests and
  // stores the bitmaps before it answers (driver/device_bitmap.cc).
  Status RunLive(const std::vector<qcow2::BitmapOperation>& ops) {
    if (positionals_.size() > 1) {
      return Status::InvalidArgument("-n ID and an IMAGE exclude each other");
    }
    if (positionals_.empty()) return Status::InvalidArgument("Expecting bitmap name");
    if (!source_image_.empty()) {
      return Status::InvalidArgument(
          fmt::format("ublk device {}: -b SRC_IMAGE cannot be used with -n ID: merge from a "
                      "bitmap of the device's own image",
                      id_));
    }
    nlohmann::json list = nlohmann::json::array();
    for (const qcow2::BitmapOperation& op : ops) {
      nlohmann::json o = {{"op", qcow2::BitmapOperationName(op.kind)}};
      if (op.kind == qcow2::BitmapOperation::Kind::kMerge) o["source"] = op.source;
      if (op.kind == qcow2::BitmapOperation::Kind::kAdd) {
        o["enabled"] = op.enabled;
        if (op.granularity) o["granularity"] = *op.granularity;
      }
      list.push_back(std::move(o));
    }
    nlohmann::json request = {{"verb", "bitmap"}, {"name", positionals_[0]}, {"ops", list}};
    return CallLiveDevice(id_, request).status();
  }

 private:
  CLI::App* app_ = nullptr;
  CLI::Option *add_ = nullptr, *remove_ = nullptr, *clear_ = nullptr, *enable_ = nullptr,
              *disable_ = nullptr, *merge_ = nullptr;
  std::vector<std::string> positionals_, merges_;
  std::string source_image_, source_format_, granularity_text_, format_;
  int id_ = -1;
};

}  // namespace

std::unique_ptr<Command> MakeBitmapCommand() { return std::make_unique<BitmapCommand>(); }

}  // namespace uq::tools
