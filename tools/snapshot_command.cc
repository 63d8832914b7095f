#include "tools/snapshot_command.h"

#include <fmt/format.h>
#include <sys/time.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "qcow2/bitmap_directory.h"
#include "qcow2/image_info.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"
#include "tools/info_format.h"
#include "tools/live_device.h"

namespace uq::tools {
namespace {

// The errno QEMU's driver would have returned for an engine error.
int ErrnoOf(const Status& st) {
  if (st.error_number() != 0) return st.error_number();
  if (st.IsNotSupported()) return EOPNOTSUPP;
  if (st.IsInvalidArgument()) return EINVAL;
  if (st.IsNoSpace()) return ENOSPC;
  return EIO;
}

std::optional<size_t> FindByName(const std::vector<qcow2::Snapshot>& s, const std::string& name) {
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i].name == name) return i;
  }
  return std::nullopt;
}

std::optional<size_t> FindById(const std::vector<qcow2::Snapshot>& s, const std::string& id) {
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i].id == id) return i;
  }
  return std::nullopt;
}

class SnapshotCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", images_, "The image");
    // Single values, each flag counted: qemu-img refuses two actions.
    actions_.push_back(app.add_flag("-l", list_, "List the snapshots"));
    actions_.push_back(
        app.add_option("-c", create_, "Create a snapshot named NAME")->type_name("NAME"));
    actions_.push_back(
        app.add_option("-a", apply_, "Revert the image to snapshot NAME (an id, else a name)")
            ->type_name("NAME"));
    actions_.push_back(
        app.add_option("-d", delete_, "Delete the snapshot named NAME")->type_name("NAME"));
    for (CLI::Option* o : actions_) o->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    app.add_option("-f,--format", format_, "IMAGE's format (default: probe)")
        ->check(CLI::IsMember({"qcow2", "raw"}));
    app.add_flag("-q,--quiet", quiet_, "Print no progress (there is none)");
    app.add_flag("-U,--force-share", force_share_, "Take no image lock (-l only, as qemu-img)");
    AddDeviceIdOption(app, id_,
                      "Work on the running device N (/dev/ublkbN) through its daemon, instead of "
                      "IMAGE: -l, -c and -d; -a is refused");
  }

  int usage_exit_code() const override { return kExitError; }  // as qemu-img's

  Status Run() override {
    size_t actions = 0;
    for (CLI::Option* o : actions_) actions += o->count();
    if (actions > 1) {
      return Status::InvalidArgument("Cannot mix '-l', '-a', '-c', '-d'");
    }
    if (id_ >= 0) return RunLive(actions);
    if (images_.size() != 1) return Status::InvalidArgument("Expecting one image file name");
    image_ = images_[0];
    if (force_share_ && !list_) {
      return Status::InvalidArgument(fmt::format(
          "Could not open '{}': force-share=on can only be used with read-only images", image_));
    }
    qcow2::ImageOptions options;
    UseImageKey(options);
    options.env = qcow2::SyncEnv();
    options.format = format_;
    options.lock = !force_share_;
    if (actions == 0) {
      // qemu-img opens the image and does nothing.
      options.writable = true;
      ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                       BlockOn(qcow2::OpenImage(image_, options)));
      return BlockOn(device->Close());
    }
    // Looked at read-only first: a refusal changes nothing.
    ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                     BlockOn(qcow2::OpenImage(image_, options)));
    auto* image = dynamic_cast<qcow2::Qcow2Image*>(device.get());
    if (list_) return List(image);
    std::vector<qcow2::Snapshot> snapshots;
    if (image != nullptr) snapshots = image->snapshots();
    const bool bitmaps =
        image != nullptr && qcow2::ActiveBitmapsExtension(image->header()) != nullptr;
    RETURN_IF_ERROR(BlockOn(device->Close()));
    device.reset();

    std::optional<size_t> index;
    std::string name, what;
    if (actions_[1]->count() > 0) {
      name = create_;
      what = "create";
      if (image == nullptr) return Failed(what, name, Errno(EOPNOTSUPP));
    } else if (actions_[2]->count() > 0) {
      name = apply_;
      what = "apply";
      if (image == nullptr)
        return Failed(what, name, "Failed to load snapshot: " + Errno(EOPNOTSUPP, false));
      index = FindById(snapshots, name);
      if (!index) index = FindByName(snapshots, name);
      if (!index) return Failed(what, name, "Failed to load snapshot: " + Errno(ENOENT, false));
      if (bitmaps) return Failed(what, name, "Device has active dirty bitmaps");
    } else {
      name = delete_;
      what = "delete";
      // qemu-img's bdrv_snapshot_find looks at names only.
      index = FindByName(snapshots, name);
      if (!index) return Failed(what, name, "snapshot not found");
    }

    options.writable = true;
    ASSIGN_OR_RETURN(device, BlockOn(qcow2::OpenImage(image_, options)));
    image = dynamic_cast<qcow2::Qcow2Image*>(device.get());
    Status st;
    if (image == nullptr) {
      st = Status::NotSupported("the image is not qcow2");
    } else if (what == "create") {
      qcow2::Snapshot entry;
      entry.name = name;
      struct timeval tv;
      gettimeofday(&tv, nullptr);
      entry.date_sec = static_cast<uint32_t>(tv.tv_sec);
      entry.date_nsec = static_cast<uint32_t>(tv.tv_usec * 1000);
      entry.icount = 0;  // qemu-img records replay's icount, 0 outside record/replay
      st = BlockOn(image->CreateSnapshot(std::move(entry))).status();
    } else if (what == "apply") {
      st = BlockOn(image->ApplySnapshot(*index));
    } else {
      st = BlockOn(image->DeleteSnapshot(*index));
    }
    Status closed = BlockOn(device->Close());
    if (st.ok()) st = closed;
    if (st.ok()) return st;
    if (what == "create") {
      if (st.IsCorruption()) return Failed(what, name, st.message());
      return Failed(what, name, Errno(ErrnoOf(st)));
    }
    if (what == "apply" && st.IsNotSupported()) {
      return Failed(what, name, "Failed to load snapshot: " + Errno(EOPNOTSUPP, false));
    }
    return Failed(what, name, st.message());
  }

 private:
  Status List(qcow2::Qcow2Image* image) {
    std::vector<qcow2::SnapshotInfo> rows;
    if (image != nullptr) {
      for (const qcow2::Snapshot& s : image->snapshots()) {
        rows.push_back(qcow2::ToSnapshotInfo(s, image->size()));
      }
    }
    PrintTable(rows);
    return Status::Ok();
  }

  // qemu-img's table; nothing at all for no snapshots (or a raw image).
  static void PrintTable(const std::vector<qcow2::SnapshotInfo>& rows) {
    if (rows.empty()) return;
    std::string out = "Snapshot list:\n" + SnapshotTableHeader() + "\n";
    for (const qcow2::SnapshotInfo& row : rows) out += SnapshotTableRow(row) + "\n";
    std::fputs(out.c_str(), stdout);
  }

  // -n ID: the device's daemon does the work between requests
  // (driver/device_snapshot.cc), so that the snapshot holds every write
  // acknowledged before it returns; the device keeps serving.
  Status RunLive(size_t actions) {
    if (!images_.empty()) {
      return Status::InvalidArgument("-n ID and an IMAGE exclude each other");
    }
    if (force_share_) return Status::InvalidArgument("-U has no meaning with -n ID");
    if (actions == 0) return Status::Ok();
    const std::string who = fmt::format("ublk device {}", id_);
    if (actions_[2]->count() > 0) {
      return Status::NotSupported(fmt::format(
          "{}: Could not apply snapshot '{}': a running device cannot be reverted (its file "
          "system and page cache would not see the change); del the device, then snapshot -a "
          "the image",
          who, apply_));
    }
    nlohmann::json request;
    if (list_) {
      request = {{"verb", "snapshot-list"}};
    } else if (actions_[1]->count() > 0) {
      request = {{"verb", "snapshot-create"}, {"name", create_}};
    } else {
      request = {{"verb", "snapshot-delete"}, {"name", delete_}};
    }
    ASSIGN_OR_RETURN(nlohmann::json answer, CallLiveDevice(id_, request));
    if (!list_) return Status::Ok();
    std::vector<qcow2::SnapshotInfo> rows;
    try {
      for (const nlohmann::json& s : answer.at("snapshots")) {
        qcow2::SnapshotInfo row;
        row.id = s.at("id").get<std::string>();
        row.name = s.at("name").get<std::string>();
        row.vm_state_size = s.at("vm-state-size").get<uint64_t>();
        row.date_sec = s.at("date-sec").get<uint32_t>();
        row.date_nsec = s.at("date-nsec").get<uint32_t>();
        row.vm_clock_nsec = s.at("vm-clock-nsec").get<uint64_t>();
        row.icount = s.at("icount").get<int64_t>();
        row.disk_size = s.at("disk-size").get<uint64_t>();
        rows.push_back(std::move(row));
      }
    } catch (const nlohmann::json::exception& e) {
      return Status::IoError(
          fmt::format("{}: the daemon's snapshot list is malformed: {}", who, e.what()));
    }
    PrintTable(rows);
    return Status::Ok();
  }

  // "-95 (Operation not supported)" as qemu-img's create prints it, or the
  // strerror text alone.
  static std::string Errno(int err, bool with_number = true) {
    if (!with_number) return std::strerror(err);
    return fmt::format("-{} ({})", err, std::strerror(err));
  }

  Status Failed(const std::string& what, const std::string& name, const std::string& why) const {
    return Status::InvalidArgument(
        fmt::format("{}: Could not {} snapshot '{}': {}", image_, what, name, why));
  }

  std::vector<std::string> images_;
  std::string image_, format_, create_, apply_, delete_;
  std::vector<CLI::Option*> actions_;  // -l, -c, -a, -d
  bool list_ = false, quiet_ = false, force_share_ = false;
  int id_ = -1;
};

}  // namespace

std::unique_ptr<Command> MakeSnapshotCommand() { return std::make_unique<SnapshotCommand>(); }

}  // namespace uq::tools
