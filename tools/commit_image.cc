#include "tools/commit_image.h"

#include <fmt/format.h>

#include <cstdlib>
#include <memory>
#include <set>
#include <vector>

#include "qcow2/open_image.h"
#include "qcow2/paths.h"
#include "qcow2/preallocation.h"
#include "qcow2/qcow2_image.h"
#include "tools/commit_copy.h"
#include "tools/image_key.h"

namespace uq::tools {
namespace {

using qcow2::BlockDevice;
using DevicePtr = std::unique_ptr<BlockDevice>;

constexpr int kMaxChainDepth = 64;

// The open images of one commit.
struct Chain {
  std::vector<DevicePtr> above;  // IMAGE first, then the images between
  DevicePtr base;
};

// Whether `path`, the backing file of the image at `image_path`, is the base:
// with -b, QEMU's bdrv_find_backing_image rule (BASE taken relative to that
// image's directory, both compared by real path); else the first one.
bool IsBase(const CommitRequest& r, const std::string& image_path, const std::string& path) {
  if (!r.base) return true;
  const std::string wanted = qcow2::ResolveRelativeTo(image_path, *r.base);
  std::unique_ptr<char, decltype(&std::free)> a(::realpath(wanted.c_str(), nullptr), &std::free);
  std::unique_ptr<char, decltype(&std::free)> b(::realpath(path.c_str(), nullptr), &std::free);
  return a && b && std::string(a.get()) == b.get();
}

Task<Status> GrowFile(qcow2::Env* env, const std::string& path, uint64_t size) {
  qcow2::OpenOptions open;
  open.writable = true;
  CO_ASSIGN_OR_RETURN(std::unique_ptr<qcow2::File> file, env->Open(path, open));
  CO_RETURN_IF_ERROR(file->Truncate(size));
  co_return co_await file->Sync();
}

// Opens the base writable with its chain; a base shorter than IMAGE grows to
// IMAGE's size first, as QEMU's commit job truncates the base: a raw file is
// extended, a qcow2 image resized (Qcow2Image::Resize, crash-safe, and zeroing
// what its own backing file would otherwise show in the new area).
Task<Status> OpenBase(const CommitRequest& r, Chain& chain, const std::string& path,
                      qcow2::ImageOptions options) {
  const uint64_t size = chain.above[0]->size();
  const std::string named_by = chain.above.back()->path() + ": backing file";
  options.writable = true;
  Result<DevicePtr> base = co_await qcow2::OpenImage(path, options);
  if (!base.ok()) co_return base.status().WithContext(named_by);
  if ((*base)->size() < size) {
    if (dynamic_cast<qcow2::Qcow2Image*>(base->get()) != nullptr) {
      CO_RETURN_IF_ERROR(co_await (*base)->Resize(size, qcow2::Preallocation::kOff));
    } else {
      CO_RETURN_IF_ERROR(co_await (*base)->Close());
      base->reset();
      CO_RETURN_IF_ERROR(co_await GrowFile(options.env, path, size));
      base = co_await qcow2::OpenImage(path, options);
      if (!base.ok()) co_return base.status().WithContext(named_by);
    }
  }
  chain.base = std::move(*base);
  co_return Status::Ok();
}

// Opens IMAGE, the images between it and the base, and the base.
Task<Status> OpenChain(const CommitRequest& r, Chain& chain) {
  qcow2::ImageOptions options;
  UseImageKey(options);
  options.env = r.env;
  options.format = r.format;
  options.writable = true;
  options.no_backing = true;
  options.lock = r.lock;
  CO_ASSIGN_OR_RETURN(DevicePtr top, co_await qcow2::OpenImage(r.image, options));
  chain.above.push_back(std::move(top));
  std::set<std::string> seen = {qcow2::FileIdentity(r.image)};
  for (;;) {
    auto* layer = dynamic_cast<qcow2::Qcow2Image*>(chain.above.back().get());
    if (layer == nullptr || layer->header().backing_file.empty()) {
      if (chain.above.size() == 1) {
        co_return Status::InvalidArgument(
            fmt::format("{}: Image does not have a backing file", r.image));
      }
      co_return Status::InvalidArgument(fmt::format(
          "{}: Did not find '{}' in the backing chain of '{}'", r.image, *r.base, r.image));
    }
    const qcow2::Header& h = layer->header();
    if (qcow2::IsProtocolName(h.backing_file)) {
      co_return Status::NotSupported(
          fmt::format("{}: backing file '{}' is a protocol or JSON name, which is not supported",
                      layer->path(), h.backing_file));
    }
    const std::string path = qcow2::ResolveRelativeTo(layer->path(), h.backing_file);
    if (!seen.insert(qcow2::FileIdentity(path)).second ||
        static_cast<int>(chain.above.size()) > kMaxChainDepth) {
      co_return Status::Corruption(
          fmt::format("{}: backing chain loop or deeper than {} images", r.image, kMaxChainDepth));
    }
    qcow2::ImageOptions next;
    UseImageKey(next);
    next.env = r.env;
    next.format = h.backing_format.value_or("");
    next.lock = r.lock;
    if (IsBase(r, layer->path(), path)) co_return co_await OpenBase(r, chain, path, next);
    next.no_backing = true;
    Result<DevicePtr> opened = co_await qcow2::OpenImage(path, next);
    if (!opened.ok()) co_return opened.status().WithContext(layer->path() + ": backing file");
    chain.above.push_back(std::move(*opened));
  }
}

Task<Status> CommitChain(const CommitRequest& r, Chain& chain) {
  std::vector<BlockDevice*> above;
  for (DevicePtr& d : chain.above) above.push_back(d.get());
  CO_RETURN_IF_ERROR(co_await CommitAbove(above, *chain.base, r.on_progress));
  // The committed data is durable before the overlay lets go of it.
  CO_RETURN_IF_ERROR(co_await chain.base->Flush());
  if (r.keep) co_return Status::Ok();
  auto* top = static_cast<qcow2::Qcow2Image*>(chain.above[0].get());
  CO_RETURN_IF_ERROR(co_await top->Unallocate(0, top->size()));
  co_return co_await top->Flush();
}

}  // namespace

Task<Status> CommitImage(const CommitRequest& request) {
  if (request.env == nullptr) co_return Status::InvalidArgument("CommitImage: no Env given");
  Chain chain;
  Status status = co_await OpenChain(request, chain);
  if (status.ok()) status = co_await CommitChain(request, chain);
  for (DevicePtr& d : chain.above) {
    Status closed = co_await d->Close();
    if (status.ok()) status = closed;
  }
  if (chain.base) {
    Status closed = co_await chain.base->Close();
    if (status.ok()) status = closed;
  }
  co_return status;
}

}  // namespace uq::tools
