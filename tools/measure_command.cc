#include "tools/measure_command.h"

#include <fmt/format.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "qcow2/bitmap_directory.h"
#include "qcow2/create/measure.h"
#include "qcow2/create/option_list.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"
#include "tools/map_command.h"

namespace uq::tools {
namespace {

using qcow2::BitmapToMeasure;
using qcow2::Measurement;

// qemu-img's cvtnum("image size", ...): a size with qemu-img's suffixes, at
// most INT64_MAX.
Result<uint64_t> ParseImageSize(const std::string& text) {
  uint64_t size = 0;
  const qcow2::SizeParse parsed = qcow2::ParseQemuSize(text, &size);
  if (parsed == qcow2::SizeParse::kRange ||
      (parsed == qcow2::SizeParse::kOk && size > uint64_t{INT64_MAX})) {
    return Status::InvalidArgument(
        "Invalid image size specified. Must be between 0 and 9223372036854775807.");
  }
  if (parsed != qcow2::SizeParse::kOk) {
    return Status::InvalidArgument(
        "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, "
        "megabytes, gigabytes, terabytes, petabytes and exabytes.");
  }
  return size;
}

// qemu-img's -l SNAPSHOT: "snapshot.id=ID,snapshot.name=NAME" (either or
// both), or a bare ID_OR_NAME, tried as an id, then as a name.
Result<std::vector<qcow2::SnapshotRef>> ParseSnapshotParam(const std::string& param) {
  if (!param.starts_with("snapshot.")) {
    return std::vector<qcow2::SnapshotRef>{{param, std::nullopt}, {std::nullopt, param}};
  }
  qcow2::SnapshotRef ref;
  ASSIGN_OR_RETURN(std::vector<qcow2::OptionItem> items, qcow2::SplitOptionList(param));
  for (const qcow2::OptionItem& item : items) {
    if (item.key == "snapshot.id") {
      ref.id = item.value;
    } else if (item.key == "snapshot.name") {
      ref.name = item.value;
    } else {
      return Status::InvalidArgument(fmt::format("Invalid parameter '{}'", item.key));
    }
  }
  return std::vector<qcow2::SnapshotRef>{ref};
}

// The bytes of output clusters that hold source data, over the whole chain
// below `top` (qemu-img measure's walk of bdrv_block_status_above): zeros
// and ranges no layer allocates count nothing.
Task<Result<uint64_t>> CountDataClusters(qcow2::BlockDevice& top, uint32_t cluster_size) {
  qcow2::DataClusterCount count(cluster_size);
  const uint64_t size = top.size();
  for (uint64_t offset = 0; offset < size;) {
    CO_ASSIGN_OR_RETURN(MapEntry e, co_await MapEntryAt(top, offset, size - offset));
    if (!e.zero && e.data) {
      offset = count.AddData(offset, e.length);
    } else {
      offset += e.length;
    }
  }
  co_return count.bytes();
}

// The source's persistent bitmaps, or nullopt when it cannot carry any (QEMU
// asks bdrv_supports_persistent_dirty_bitmap: a qcow2 image of version 3).
Task<Result<std::optional<std::vector<BitmapToMeasure>>>> SourceBitmaps(
    qcow2::BlockDevice& device) {
  auto* image = dynamic_cast<qcow2::Qcow2Image*>(&device);
  std::optional<std::vector<BitmapToMeasure>> none;
  if (image == nullptr || image->header().version < 3) co_return none;
  CO_ASSIGN_OR_RETURN(std::unique_ptr<qcow2::File> file,
                      qcow2::SyncEnv()->Open(image->path(), qcow2::OpenOptions{}));
  CO_ASSIGN_OR_RETURN(std::vector<qcow2::BitmapDirEntry> entries,
                      co_await qcow2::ReadBitmapDirectory(*file, image->header()));
  std::vector<BitmapToMeasure> bitmaps;
  for (const qcow2::BitmapDirEntry& e : entries) {
    bitmaps.push_back(BitmapToMeasure{e.name.size(), e.granularity()});
  }
  co_return bitmaps;
}

std::string Render(const Measurement& m, bool json) {
  if (json) {
    // QEMU's BlockMeasureInfo fields are QAPI 'int': JSON shows them as
    // signed 64-bit numbers (2^63 comes out as -9223372036854775808), and the
    // QDict puts bitmaps, when present, first.
    auto field = [](uint64_t v) { return static_cast<int64_t>(v); };
    std::string out = "{\n";
    if (m.bitmaps) out += fmt::format("    \"bitmaps\": {},\n", field(*m.bitmaps));
    out += fmt::format("    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
                       field(m.required), field(m.fully_allocated));
    return out;
  }
  std::string out =
      fmt::format("required size: {}\nfully allocated size: {}\n", m.required, m.fully_allocated);
  if (m.bitmaps) out += fmt::format("bitmaps size: {}\n", *m.bitmaps);
  return out;
}

class MeasureCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", images_, "The image to measure (its backing chain included)");
    size_flag_ = app.add_option("--size", size_text_,
                                "Measure a new, empty image of this size (512, 64k, 1G)")
                     ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    app.add_option("--output", output_, "Output format: human or json")
        ->capture_default_str()
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    app.add_option("-O", out_format_, "Format of the image to measure for: raw or qcow2")
        ->capture_default_str()
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    app.add_option("-o,--options", options_,
                   "The new image's options, as create takes them (cluster_size, compat, "
                   "refcount_bits, extended_l2, preallocation, backing_file, ...)")
        ->allow_extra_args(false);
    format_flag_ =
        app.add_option("-f,--format", format_, "IMAGE's format: qcow2 or raw (default: probe)")
            ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    snapshot_flag_ =
        app.add_option("-l,--snapshot", snapshot_,
                       "Measure the image as it was at this internal snapshot (ID or NAME, or "
                       "snapshot.id=ID,snapshot.name=NAME)")
            ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    app.add_flag("-U,--force-share", force_share_,
                 "Take no image locks: measure an image another process writes");
  }

  Status Run() override {
    // The checks qemu-img makes before it opens anything, in its order.
    if (output_ != "human" && output_ != "json") {
      return Status::InvalidArgument("--output must be used with human or json as argument.");
    }
    std::optional<uint64_t> size;
    if (size_flag_->count() > 0) {
      ASSIGN_OR_RETURN(size, ParseImageSize(size_text_));
    }
    if (snapshot_flag_->count() > 0) {
      ASSIGN_OR_RETURN(snapshot_refs_, ParseSnapshotParam(snapshot_));
    }
    // qemu-img checks each -o on its own, then joins them.
    for (const std::string& o : options_) {
      RETURN_IF_ERROR(qcow2::SplitOptionList(o).status());
      list_ += (list_.empty() ? "" : ",") + o;
    }
    if (images_.size() > 1) {
      return Status::InvalidArgument("At most one filename argument is allowed.");
    }
    if (images_.empty() && (format_flag_->count() > 0 || snapshot_flag_->count() > 0)) {
      return Status::InvalidArgument("--image-opts, -f, and -l require a filename argument.");
    }
    if (!images_.empty() && size) {
      return Status::InvalidArgument("--size N cannot be used together with a filename.");
    }
    if (images_.empty() && !size) {
      return Status::InvalidArgument("Either --size N or one filename must be specified.");
    }
    Result<Measurement> m = BlockOn(Measure(size));
    if (!m.ok()) return m.status();
    const std::string out = Render(*m, output_ == "json");
    if (std::fwrite(out.data(), 1, out.size(), stdout) != out.size() || std::fflush(stdout) != 0) {
      return Status::IoError("standard output: write failed");
    }
    return Status::Ok();
  }

 private:
  Task<Result<Measurement>> Measure(std::optional<uint64_t> size) {
    if (size) co_return co_await MeasureFor(*size, nullptr);
    const std::string& image = images_.front();
    if (!format_.empty() && format_ != "qcow2" && format_ != "raw") {
      co_return Status::NotSupported(
          fmt::format("{}: format '{}' is not supported (only qcow2 and raw are)", image, format_));
    }
    qcow2::ImageOptions options;
    UseImageKey(options);
    options.env = qcow2::SyncEnv();
    options.format = format_;
    options.lock = !force_share_;
    options.snapshot = snapshot_refs_;
    CO_ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                        co_await qcow2::OpenImage(image, options));
    Result<Measurement> m = co_await MeasureFor(device->size(), device.get());
    Status closed = co_await device->Close();
    if (!m.ok()) co_return m.status();
    if (!closed.ok()) co_return closed;
    co_return m;
  }

  // Measures for the -O format with the -o options: a new image of `size`
  // bytes, or a copy of `source` (of that size) when it is set.
  Task<Result<Measurement>> MeasureFor(uint64_t size, qcow2::BlockDevice* source) {
    if (out_format_ == "raw") {
      CO_RETURN_IF_ERROR(qcow2::CheckRawMeasureOptions(list_));
      co_return source ? qcow2::MeasureRawImage(size) : qcow2::MeasureRawSize(size);
    }
    if (out_format_ != "qcow2") {
      co_return Status::NotSupported(
          fmt::format("Unknown file format '{}' (measure supports raw and qcow2)", out_format_));
    }
    CO_ASSIGN_OR_RETURN(qcow2::Qcow2MeasureOptions o, qcow2::ParseQcow2MeasureOptions(list_));
    if (source == nullptr) co_return qcow2::MeasureQcow2Size(size, o);
    const std::string& image = images_.front();
    uint64_t data = 0;
    if (!o.backing_file) {
      Result<uint64_t> counted = co_await CountDataClusters(*source, o.geometry.cluster_size);
      if (!counted.ok()) co_return counted.status().WithContext(image);
      data = *counted;
    }
    Result<std::optional<std::vector<BitmapToMeasure>>> bitmaps = co_await SourceBitmaps(*source);
    if (!bitmaps.ok()) co_return bitmaps.status().WithContext(image);
    std::optional<std::span<const BitmapToMeasure>> view;
    if (*bitmaps) view = std::span<const BitmapToMeasure>(**bitmaps);
    co_return qcow2::MeasureQcow2Image(size, data, o, view);
  }

  std::vector<std::string> images_;
  std::string size_text_;
  std::string output_ = "human";
  std::string out_format_ = "raw";
  std::vector<std::string> options_;
  std::string list_;  // the -o lists, joined
  std::string format_;
  std::string snapshot_;
  std::vector<qcow2::SnapshotRef> snapshot_refs_;
  bool force_share_ = false;
  CLI::Option* size_flag_ = nullptr;
  CLI::Option* format_flag_ = nullptr;
  CLI::Option* snapshot_flag_ = nullptr;
};

}  // namespace

std::unique_ptr<Command> MakeMeasureCommand() { return std::make_unique<MeasureCommand>(); }

}  // namespace uq::tools
