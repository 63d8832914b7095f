// Device's live bitmap verbs: "bitmap" (`ublk-qcow2 bitmap -n ID ...`) and
// "bitmap-extents" (`ublk-qcow2 map --bitmap NAME -n ID`) on the control
// socket.
//
// "bitmap" runs the operations on the image's thread under
// ImageHost::Exclusive, through Qcow2Image::ChangeBitmapsLive: the requests
// in the engine finish first and new ones wait, writes served on other
// queues' threads are drained, and the bitmaps are stored before the answer.
// So a bitmap added or cleared by the command holds exactly the writes
// acknowledged after it returns, and the change survives a daemon crash.
// "bitmap-extents" only reads: it runs between requests on the image's
// thread without stopping them, and sees every write acknowledged before it.
#include <fmt/format.h>

#include <memory>
#include <string>
#include <vector>

#include "driver/device.h"
#include "driver/log.h"
#include "qcow2/bitmap_operations.h"
#include "qcow2/qcow2_image.h"

namespace uq::driver {
namespace {

Result<std::string> StringField(const nlohmann::json& request, const char* field,
                                const char* verb) {
  auto it = request.find(field);
  if (it == request.end() || !it->is_string()) {
    return Status::InvalidArgument(fmt::format("{}: \"{}\" must be a string", verb, field));
  }
  return it->get<std::string>();
}

// {"op":"add","granularity":N,"enabled":true} | {"op":"merge","source":S} | {"op":"clear"} ...
Result<std::vector<qcow2::BitmapOperation>> ParseOperations(const nlohmann::json& request) {
  auto ops = request.find("ops");
  if (ops == request.end() || !ops->is_array() || ops->empty()) {
    return Status::InvalidArgument("bitmap: \"ops\" must be a non-empty array");
  }
  std::vector<qcow2::BitmapOperation> out;
  for (const nlohmann::json& o : *ops) {
    if (!o.is_object()) return Status::InvalidArgument("bitmap: each op must be an object");
    ASSIGN_OR_RETURN(const std::string name, StringField(o, "op", "bitmap"));
    std::optional<qcow2::BitmapOperation::Kind> kind = qcow2::BitmapOperationKind(name);
    if (!kind) return Status::InvalidArgument(fmt::format("bitmap: unknown op \"{}\"", name));
    qcow2::BitmapOperation op{*kind};
    if (*kind == qcow2::BitmapOperation::Kind::kMerge) {
      ASSIGN_OR_RETURN(op.source, StringField(o, "source", "bitmap"));
    }
    if (auto g = o.find("granularity"); g != o.end()) {
      if (!g->is_number_unsigned()) {
        return Status::InvalidArgument("bitmap: \"granularity\" must be a number of bytes");
      }
      op.granularity = g->get<uint64_t>();
    }
    if (auto e = o.find("enabled"); e != o.end()) {
      if (!e->is_boolean()) return Status::InvalidArgument("bitmap: \"enabled\" must be a bool");
      op.enabled = e->get<bool>();
    }
    out.push_back(std::move(op));
  }
  return out;
}

}  // namespace

void Device::AddBitmapHandlers(ControlHandlers& handlers) {
  // {"verb":"bitmap","name":NAME,"ops":[...]} -> {}
  handlers["bitmap"] = [this](const nlohmann::json& request) -> Result<nlohmann::json> {
    ASSIGN_OR_RETURN(const std::string name, StringField(request, "name", "bitmap"));
    ASSIGN_OR_RETURN(const std::vector<qcow2::BitmapOperation> ops, ParseOperations(request));
    const std::string who = fmt::format("ublk device {}", info_.dev_id);
    auto* image = dynamic_cast<qcow2::Qcow2Image*>(image_.get());
    if (image == nullptr) {
      return Status::InvalidArgument(fmt::format(
          "{}: Operation {} on bitmap {} failed: Operation not supported (the image is not "
          "qcow2)",
          who, qcow2::BitmapOperationName(ops[0].kind), name));
    }
    if (info_.read_only) {
      return Status::InvalidArgument(
          fmt::format("{}: Operation {} on bitmap {} failed: the device is read-only", who,
                      qcow2::BitmapOperationName(ops[0].kind), name));
    }
    Status st = loops_[0]->RunTask<Status>([&]() -> Task<Status> {
      return host_->Exclusive([&]() -> Task<Status> {
        return image->ChangeBitmapsLive(
            [&]() -> Task<Status> { return qcow2::RunBitmapOperations(*image, name, ops, image); });
      });
    });
    if (!st.ok()) {
      // The operations' own failures are qemu-img's messages; anything else
      // (storing failed) keeps its kind.
      return st.IsInvalidArgument()
                 ? Status::InvalidArgument(fmt::format("{}: {}", who, st.message()))
                 : st.WithContext(fmt::format("{}: bitmap {}", who, name));
    }
    std::string done;
    for (const auto& op : ops)
      done += std::string(done.empty() ? "" : ", ") + qcow2::BitmapOperationName(op.kind);
    Log(fmt::format("{}: bitmap '{}': {}", info_.block_path, name, done));
    return nlohmann::json::object();
  };
  // {"verb":"bitmap-extents","name":NAME} -> {"size":N,"extents":[[offset,length],...]}, the
  // dirty extents in order.
  handlers["bitmap-extents"] = [this](const nlohmann::json& request) -> Result<nlohmann::json> {
    ASSIGN_OR_RETURN(const std::string name, StringField(request, "name", "bitmap-extents"));
    const std::string who = fmt::format("ublk device {}", info_.dev_id);
    auto* image = dynamic_cast<qcow2::Qcow2Image*>(image_.get());
    if (image == nullptr) {
      return Status::NotSupported(fmt::format("{}: only qcow2 images have bitmaps", who));
    }
    nlohmann::json answer;
    Status st = loops_[0]->RunTask<Status>([&]() -> Task<Status> {
      CO_ASSIGN_OR_RETURN(std::shared_ptr<const qcow2::DirtyBitmap> bits,
                          co_await image->BitmapContents(name));
      nlohmann::json extents = nlohmann::json::array();
      for (const auto& e : bits->DirtyExtents()) extents.push_back({e.offset, e.length});
      answer["size"] = image->size();
      answer["extents"] = std::move(extents);
      co_return Status::Ok();
    });
    if (!st.ok()) {
      return st.IsCorruption() ? st
                               : Status::InvalidArgument(fmt::format("{}: {}", who, st.message()));
    }
    return answer;
  };
}

}  // namespace uq::driver
