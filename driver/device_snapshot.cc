// Device's live snapshot verbs (`ublk-qcow2 snapshot -n ID`): "snapshot-list",
// "snapshot-create" and "snapshot-delete" on the control socket.
//
// Each runs on the image's thread under ImageHost::Exclusive: the requests
// already in the engine finish first and new ones wait, and the engine's
// CreateSnapshot flushes, then revokes every mapping it published (waiting
// for the reads and writes that other queues' threads are serving in place)
// before its clusters become shared. So every write acknowledged before the
// answer is in the snapshot, and every write sent after it copies and goes to
// the active layer only. The device keeps serving meanwhile: requests merely
// wait for the exclusive step.
//
// Applying a snapshot to a running device is refused: the data would change
// under the kernel's page cache and the file system above.
#include <fmt/format.h>
#include <sys/time.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "driver/device.h"
#include "driver/log.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/image_info.h"
#include "qcow2/qcow2_image.h"

namespace uq::driver {
namespace {

nlohmann::json SnapshotJson(const qcow2::SnapshotInfo& s) {
  return {{"id", s.id},
          {"name", s.name},
          {"vm-state-size", s.vm_state_size},
          {"date-sec", s.date_sec},
          {"date-nsec", s.date_nsec},
          {"vm-clock-nsec", s.vm_clock_nsec},
          {"icount", s.icount},
          {"disk-size", s.disk_size}};
}

Result<std::string> NameOf(const nlohmann::json& request, const char* verb) {
  auto name = request.find("name");
  if (name == request.end() || !name->is_string()) {
    return Status::InvalidArgument(fmt::format("{}: \"name\" must be a string", verb));
  }
  return name->get<std::string>();
}

}  // namespace

Result<qcow2::Qcow2Image*> Device::SnapshotImage(const std::string& what, const std::string& name) {
  auto fail = [&](const std::string& why) {
    return Status::InvalidArgument(fmt::format("ublk device {}: Could not {} snapshot '{}': {}",
                                               info_.dev_id, what, name, why));
  };
  auto* image = dynamic_cast<qcow2::Qcow2Image*>(image_.get());
  if (image == nullptr) return fail("the image is not qcow2");
  if (what != "list" && info_.read_only) return fail("the device is read-only");
  return image;
}

void Device::AddSnapshotHandlers(ControlHandlers& handlers) {
  // {"verb":"snapshot-list"} -> {"size":N,"snapshots":[{"id":..,"name":..,...}]}
  handlers["snapshot-list"] = [this](const nlohmann::json&) -> Result<nlohmann::json> {
    ASSIGN_OR_RETURN(qcow2::Qcow2Image * image, SnapshotImage("list", ""));
    return loops_[0]->Call([image] {
      nlohmann::json answer;
      answer["size"] = image->size();
      answer["snapshots"] = nlohmann::json::array();
      for (const qcow2::Snapshot& s : image->snapshots()) {
        answer["snapshots"].push_back(SnapshotJson(qcow2::ToSnapshotInfo(s, image->size())));
      }
      return answer;
    });
  };
  // {"verb":"snapshot-create","name":NAME} -> {"id":"N"}
  handlers["snapshot-create"] = [this](const nlohmann::json& request) -> Result<nlohmann::json> {
    ASSIGN_OR_RETURN(const std::string name, NameOf(request, "snapshot-create"));
    ASSIGN_OR_RETURN(qcow2::Qcow2Image * image, SnapshotImage("create", name));
    qcow2::Snapshot entry;
    entry.name = name;
    struct timeval tv;
    ::gettimeofday(&tv, nullptr);
    entry.date_sec = static_cast<uint32_t>(tv.tv_sec);
    entry.date_nsec = static_cast<uint32_t>(tv.tv_usec * 1000);
    entry.icount = 0;  // as qemu-img snapshot -c records it
    std::string id;
    Status created = loops_[0]->RunTask<Status>([&]() -> Task<Status> {
      return host_->Exclusive([&]() -> Task<Status> {
        CO_ASSIGN_OR_RETURN(id, co_await image->CreateSnapshot(entry));
        co_return Status::Ok();
      });
    });
    if (!created.ok()) {
      return Status::IoError(fmt::format("ublk device {}: Could not create snapshot '{}': {}",
                                         info_.dev_id, name, created.ToString()));
    }
    Log(fmt::format("{}: snapshot '{}' created (id {})", info_.block_path, name, id));
    return nlohmann::json{{"id", id}};
  };
  // {"verb":"snapshot-delete","name":NAME} -> {"id":"N"}; NAME is a name
  // only, as qemu-img snapshot -d finds it.
  handlers["snapshot-delete"] = [this](const nlohmann::json& request) -> Result<nlohmann::json> {
    ASSIGN_OR_RETURN(const std::string name, NameOf(request, "snapshot-delete"));
    ASSIGN_OR_RETURN(qcow2::Qcow2Image * image, SnapshotImage("delete", name));
    std::string id;
    Status deleted = loops_[0]->RunTask<Status>([&]() -> Task<Status> {
      return host_->Exclusive([&]() -> Task<Status> {
        const std::vector<qcow2::Snapshot>& all = image->snapshots();
        std::optional<size_t> index;
        for (size_t i = 0; i < all.size() && !index; i++) {
          if (all[i].name == name) index = i;
        }
        if (!index) co_return Status::InvalidArgument("snapshot not found");
        id = all[*index].id;
        co_return co_await image->DeleteSnapshot(*index);
      });
    });
    if (!deleted.ok()) {
      return Status::IoError(
          fmt::format("ublk device {}: Could not delete snapshot '{}': {}", info_.dev_id, name,
                      deleted.IsInvalidArgument() ? deleted.message() : deleted.ToString()));
    }
    Log(fmt::format("{}: snapshot '{}' deleted (id {})", info_.block_path, name, id));
    return nlohmann::json{{"id", id}};
  };
}

}  // namespace uq::driver
