#include "tools/map_command.h"

#include <fmt/format.h>

#include <cstdio>
#include <optional>
#include <utility>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"
#include "tools/live_device.h"

namespace uq::tools {

using qcow2::RangeStatus;

Task<Result<MapEntry>> MapEntryAt(qcow2::BlockDevice& top, uint64_t offset, uint64_t length) {
  qcow2::BlockDevice* device = &top;
  MapEntry e;
  e.start = offset;
  for (;;) {
    CO_ASSIGN_OR_RETURN(RangeStatus s, co_await device->BlockStatus(offset, length));
    length = s.length;
    e.zero = s.zero();
    e.data = s.data();
    e.present = e.zero || e.data;
    e.has_offset = s.has_offset;
    e.offset = s.has_offset ? s.host_offset : 0;
    e.file = s.has_offset ? s.file : nullptr;
    if (s.kind != RangeStatus::Kind::kUnallocated) break;
    // Unallocated here: the layer below decides, if the range lies inside
    // it; otherwise it reads as zeros (QEMU's block layer, not the driver,
    // says so: not present, and at this depth).
    qcow2::BlockDevice* below = device->backing();
    if (below == nullptr || offset >= below->size()) {
      e.zero = true;
      break;
    }
    length = std::min(length, below->size() - offset);
    device = below;
    e.depth++;
  }
  e.length = length;
  co_return e;
}

bool Mergeable(const MapEntry& curr, const MapEntry& next) {
  if (curr.length == 0) return false;
  if (curr.zero != next.zero || curr.data != next.data || curr.depth != next.depth ||
      curr.present != next.present || (curr.file == nullptr) != (next.file == nullptr) ||
      curr.has_offset != next.has_offset) {
    return false;
  }
  if (curr.file != nullptr && *curr.file != *next.file) return false;
  return !curr.has_offset || curr.offset + curr.length == next.offset;
}

namespace {

// printf's "%#-16" PRIx64: "0x" before non-zero values only.
std::string Hex16(uint64_t v) {
  return fmt::format("{:<16}", v == 0 ? std::string("0") : fmt::format("{:#x}", v));
}

// Appends one entry in `json` or human form; `more`: another entry follows.
Status Render(bool json, const MapEntry& e, bool more, std::string& out) {
  if (json) {
    out += fmt::format(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, "
        "\"data\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data);
    if (e.has_offset) out += fmt::format(", \"offset\": {}", e.offset);
    out += more ? "},\n" : "}";
    return Status::Ok();
  }
  if (e.data && !e.has_offset) {
    return Status::NotSupported("File contains external, encrypted or compressed clusters.");
  }
  if (e.data && !e.zero) {
    out += Hex16(e.start) + Hex16(e.length) + Hex16(e.offset) + *e.file + "\n";
  }
  return Status::Ok();
}

// 123, or 64k, 1M, 2G, 1T (binary), as qemu-img's offsets.
std::optional<uint64_t> ParseBytes(const std::string& text) {
  size_t used = 0;
  uint64_t value;
  try {
    value = std::stoull(text, &used);
  } catch (...) {
    return std::nullopt;
  }
  if (text.empty() || text[0] == '-') return std::nullopt;
  const std::string suffix = text.substr(used);
  int shift = 0;
  if (suffix.empty() || suffix == "b" || suffix == "B") {
    shift = 0;
  } else if (suffix == "k" || suffix == "K") {
    shift = 10;
  } else if (suffix == "M") {
    shift = 20;
  } else if (suffix == "G") {
    shift = 30;
  } else if (suffix == "T") {
    shift = 40;
  } else {
    return std::nullopt;
  }
  if (shift > 0 && value > (~uint64_t{0} >> shift)) return std::nullopt;
  return value << shift;
}

class MapCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", image_, "The image to map");
    // IMAGE is required, unless -n names a running device instead.
    app.callback([this] {
      if (image_.empty() && id_ < 0) throw CLI::RequiredError("IMAGE");
    });
    app.add_option("--output", output_, "Output format")
        ->check(CLI::IsMember({"human", "json"}))
        ->capture_default_str();
    // A bad number is a usage error (exit 2), caught while parsing.
    const CLI::Validator bytes(
        [](std::string& text) {
          return ParseBytes(text) ? std::string() : "not a byte count (123, 64k, 1M, ...)";
        },
        "BYTES");
    app.add_option("-s,--start-offset", start_text_, "First guest byte to map (default 0)")
        ->check(bytes);
    app.add_option("-l,--max-length", length_text_, "Bytes to map at most (default: to the end)")
        ->check(bytes);
    app.add_option("-f,--format", format_, "IMAGE's format (default: probe)")
        ->check(CLI::IsMember({"qcow2", "raw"}));
    app.add_flag("-U,--force-share", force_share_,
                 "Take no image locks: map an image another process writes");
    app.add_option("--bitmap", bitmap_,
                   "Print the dirty extents of persistent bitmap NAME instead (our extension)")
        ->type_name("NAME");
    AddDeviceIdOption(app, id_,
                      "With --bitmap: read the bitmap of the running device N (/dev/ublkbN) "
                      "through its daemon, instead of IMAGE");
  }

  Status Run() override {
    // Both were validated while parsing.
    const uint64_t start = start_text_.empty() ? 0 : ParseBytes(start_text_).value_or(0);
    std::optional<uint64_t> max_length;
    if (!length_text_.empty()) max_length = ParseBytes(length_text_);
    std::string out;
    Status status;
    if (id_ >= 0) {
      if (bitmap_.empty()) return Status::InvalidArgument("-n ID needs --bitmap NAME");
      if (!image_.empty()) return Status::InvalidArgument("-n ID and an IMAGE exclude each other");
      status = MapLiveBitmap(start, max_length, out);
    } else {
      status = BlockOn(Map(start, max_length, out));
    }
    if (std::fwrite(out.data(), 1, out.size(), stdout) != out.size() || std::fflush(stdout) != 0) {
      if (status.ok()) return Status::IoError("standard output: write failed");
    }
    return status;
  }

 private:
  // The whole output in `out`; on an error, what qemu-img would have
  // printed before it.
  Task<Status> Map(uint64_t start, std::optional<uint64_t> max_length, std::string& out) {
    qcow2::ImageOptions options;
    UseImageKey(options);
    options.env = qcow2::SyncEnv();
    options.format = format_;
    options.lock = !force_share_;
    CO_ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                        co_await qcow2::OpenImage(image_, options));
    // (Not a conditional expression: GCC mishandles co_await inside one.)
    Status status;
    if (bitmap_.empty()) {
      status = co_await MapDevice(*device, start, max_length, out);
    } else {
      status = co_await MapBitmap(*device, start, max_length, out);
    }
    Status closed = co_await device->Close();
    co_return status.ok() ? closed : status;
  }

  // qemu-img's img_map loop.
  Task<Status> MapDevice(qcow2::BlockDevice& device, uint64_t start,
                         std::optional<uint64_t> max_length, std::string& out) {
    const bool json = output_ == "json";
    uint64_t end = device.size();
    if (max_length && start <= end && *max_length < end - start) end = start + *max_length;
    out += json ? "[" : "Offset          Length          Mapped to       File\n";
    MapEntry curr;
    curr.start = start;
    while (curr.start + curr.length < end) {
      const uint64_t offset = curr.start + curr.length;
      CO_ASSIGN_OR_RETURN(MapEntry next, co_await MapEntryAt(device, offset, end - offset));
      if (Mergeable(curr, next)) {
        curr.length += next.length;
        continue;
      }
      if (curr.length > 0) CO_RETURN_IF_ERROR(WithImage(Render(json, curr, true, out)));
      curr = next;
    }
    CO_RETURN_IF_ERROR(WithImage(Render(json, curr, false, out)));
    if (json) out += "]\n";
    co_return Status::Ok();
  }

  // --bitmap: the bitmap's extents over [start, end), dirty ones merged
  // (see map_command.h for the format).
  Task<Status> MapBitmap(qcow2::BlockDevice& device, uint64_t start,
                         std::optional<uint64_t> max_length, std::string& out) {
    auto* image = dynamic_cast<qcow2::Qcow2Image*>(&device);
    if (image == nullptr) {
      co_return Status::NotSupported(fmt::format("{}: only qcow2 images have bitmaps", image_));
    }
    Result<std::shared_ptr<const qcow2::DirtyBitmap>> bits =
        co_await image->BitmapContents(bitmap_);
    // QEMU's bare messages (not found, inconsistent) get the file's name;
    // the engine's corruption errors already start with it.
    if (!bits.ok() && bits.status().IsCorruption()) co_return bits.status();
    if (!bits.ok()) {
      co_return Status::InvalidArgument(fmt::format("{}: {}", image_, bits.status().message()));
    }
    std::vector<std::pair<uint64_t, uint64_t>> dirty;
    for (const auto& x : (*bits)->DirtyExtents()) dirty.emplace_back(x.offset, x.length);
    RenderBitmap(dirty, device.size(), start, max_length, out);
    co_return Status::Ok();
  }

  // --bitmap with -n ID: the running device's daemon reads the bitmap
  // (driver/device_bitmap.cc).
  Status MapLiveBitmap(uint64_t start, std::optional<uint64_t> max_length, std::string& out) {
    ASSIGN_OR_RETURN(nlohmann::json answer,
                     CallLiveDevice(id_, {{"verb", "bitmap-extents"}, {"name", bitmap_}}));
    std::vector<std::pair<uint64_t, uint64_t>> dirty;
    try {
      for (const auto& e : answer.at("extents")) {
        dirty.emplace_back(e.at(0).get<uint64_t>(), e.at(1).get<uint64_t>());
      }
      RenderBitmap(dirty, answer.at("size").get<uint64_t>(), start, max_length, out);
    } catch (const nlohmann::json::exception&) {
      return Status::IoError(fmt::format("ublk device {}: a malformed bitmap-extents answer", id_));
    }
    return Status::Ok();
  }

  // Renders `dirty` (offset, length in order) of an image of `size` bytes
  // over [start, start + max_length).
  void RenderBitmap(const std::vector<std::pair<uint64_t, uint64_t>>& dirty, uint64_t size,
                    uint64_t start, std::optional<uint64_t> max_length, std::string& out) const {
    const bool json = output_ == "json";
    uint64_t end = size;
    if (max_length && start <= end && *max_length < end - start) end = start + *max_length;
    std::vector<MapEntry> rows;  // data = dirty
    auto add = [&](uint64_t from, uint64_t to, bool is_dirty) {
      from = std::max(from, start);
      to = std::min(to, end);
      if (from >= to) return;
      MapEntry e;
      e.start = from;
      e.length = to - from;
      e.data = is_dirty;
      rows.push_back(e);
    };
    uint64_t pos = 0;
    for (const auto& [offset, length] : dirty) {
      add(pos, offset, false);
      add(offset, offset + length, true);
      pos = offset + length;
    }
    add(pos, size, false);
    if (json) {
      out += "[";
      for (size_t i = 0; i < rows.size(); i++) {
        out += fmt::format("{{ \"start\": {}, \"length\": {}, \"dirty\": {}}}{}", rows[i].start,
                           rows[i].length, rows[i].data, i + 1 < rows.size() ? ",\n" : "");
      }
      out += "]\n";
    } else {
      out += "Offset          Length\n";
      for (const MapEntry& e : rows) {
        if (e.data) out += Hex16(e.start) + Hex16(e.length) + "\n";
      }
    }
  }

  Status WithImage(Status status) const {
    if (status.ok()) return status;
    return status.WithContext(image_);
  }

  std::string image_;
  std::string output_ = "human";
  std::string start_text_;
  std::string length_text_;
  std::string format_;
  std::string bitmap_;
  int id_ = -1;
  bool force_share_ = false;
};

}  // namespace

std::unique_ptr<Command> MakeMapCommand() { return std::make_unique<MapCommand>(); }

}  // namespace uq::tools
