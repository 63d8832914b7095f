// Device's control verbs: "info" and the live "resize" (see Device::Resize in
// device.h for the order of the steps and what a failure undoes).
#include <fmt/format.h>

#include <chrono>
#include <cstdio>

#include "driver/device.h"
#include "driver/log.h"
#include "driver/state_file.h"
#include "driver/ublk_abi.h"

namespace uq::driver {
namespace {

constexpr uint64_t kSector = 512;

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

ControlHandlers Device::Handlers() {
  ControlHandlers handlers;
  // {"verb":"info"} -> {"id":0,"size":N,"read_only":false,"block_path":"/dev/ublkb0"}
  handlers["info"] = [this](const nlohmann::json&) -> Result<nlohmann::json> {
    nlohmann::json answer;
    answer["id"] = info_.dev_id;
    answer["size"] = info_.size;
    answer["read_only"] = info_.read_only;
    answer["block_path"] = info_.block_path;
    return answer;
  };
  // {"verb":"resize","size":N,"shrink":false} -> {"size":N}
  handlers["resize"] = [this](const nlohmann::json& request) -> Result<nlohmann::json> {
    auto size = request.find("size");
    if (size == request.end() || !size->is_number_unsigned()) {
      return Status::InvalidArgument("resize: \"size\" must be a number of bytes");
    }
    const bool shrink = request.value("shrink", false);
    RETURN_IF_ERROR(Resize(size->get<uint64_t>(), shrink));
    nlohmann::json answer;
    answer["size"] = info_.size;
    return answer;
  };
  AddSnapshotHandlers(handlers);
  AddBitmapHandlers(handlers);
  AddUpgradeHandlers(handlers);
  return handlers;
}

Status Device::ResizeImage(uint64_t new_size) {
  return loops_[0]->RunTask<Status>([this, new_size]() -> Task<Status> {
    return host_->Exclusive([this, new_size]() -> Task<Status> {
      CO_RETURN_IF_ERROR(co_await image_->Resize(new_size, qcow2::Preallocation::kOff));
      co_return co_await image_->Flush();
    });
  });
}

Status Device::Resize(uint64_t new_size, bool allow_shrink) {
  const std::string who = fmt::format("device {}", info_.dev_id);
  // Checked before anything changes: what the kernel offers, then the size.
  if ((control_->features() & UBLK_F_UPDATE_SIZE) == 0) {
    return Status::NotSupported(fmt::format(
        "{}: live resize needs UBLK_F_UPDATE_SIZE (Linux 6.16+), which this kernel's ublk does "
        "not offer",
        who));
  }
  if (info_.read_only) {
    return Status::InvalidArgument(fmt::format("{}: can't resize a read-only device", who));
  }
  if (new_size == 0) {
    return Status::InvalidArgument(fmt::format("{}: New image size must be positive", who));
  }
  if (new_size % kSector != 0) {
    return Status::InvalidArgument(
        fmt::format("{}: the new size must be a multiple of {}", who, kSector));
  }
  const uint64_t old_size = info_.size;
  if (new_size < old_size && !allow_shrink) {
    return Status::InvalidArgument(
        fmt::format("{}: use the --shrink option to perform a shrink operation (shrinking deletes "
                    "all data past the new end)",
                    who));
  }
  if (new_size == old_size) return Status::Ok();

  const auto start = std::chrono::steady_clock::now();
  double image_ms = 0;
  if (new_size > old_size) {
    // The image first: the kernel may send requests up to the new end as
    // soon as it knows it.
    RETURN_IF_ERROR(ResizeImage(new_size));
    image_ms = MillisecondsSince(start);
    Status told = control_->UpdateSize(info_.dev_id, new_size / kSector);
    if (!told.ok()) {
      // Nothing can have been written past the old end: take it back.
      Status undone = ResizeImage(old_size);
      if (!undone.ok())
        Log(fmt::format("{}: shrinking the image back: {}", who, undone.ToString()));
      return told;
    }
  } else {
    // The kernel first: no request past the new end reaches the image
    // while its tail is released.
    RETURN_IF_ERROR(control_->UpdateSize(info_.dev_id, new_size / kSector));
    const auto image_start = std::chrono::steady_clock::now();
    Status resized = ResizeImage(new_size);
    image_ms = MillisecondsSince(image_start);
    if (!resized.ok()) {
      Status undone = control_->UpdateSize(info_.dev_id, old_size / kSector);
      if (!undone.ok()) Log(fmt::format("{}: growing the device back: {}", who, undone.ToString()));
      return resized;
    }
  }
  info_.size = new_size;
  Log(fmt::format("resized {} from {} to {} bytes in {:.1f} ms (image: {:.1f} ms)",
                  info_.block_path, old_size, new_size, MillisecondsSince(start), image_ms));

  // `list` shows the record's size.
  Result<std::optional<DeviceRecord>> record = ReadRecord(info_.dev_id);
  Status written = record.status();
  if (record.ok() && record->has_value()) {
    DeviceRecord updated = **record;
    updated.size = new_size;
    written = WriteRecord(updated);
  }
  if (!written.ok()) Log(fmt::format("{}: updating the record: {}", who, written.ToString()));
  return Status::Ok();
}

}  // namespace uq::driver
