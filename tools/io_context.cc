#include "tools/io_context.h"

#include "qcow2/sync_env.h"
#include "uring/uring_env.h"

namespace uq::tools {

std::optional<IoMode> ParseIoMode(std::string_view name) {
  if (name == "auto") return IoMode::kAuto;
  if (name == "uring") return IoMode::kUring;
  if (name == "sync") return IoMode::kSync;
  return std::nullopt;
}

Result<std::unique_ptr<IoContext>> IoContext::Create(IoMode mode, uint32_t queue_depth,
                                                     uint32_t spin_us) {
  auto context = std::make_unique<IoContext>(Key());
  if (mode != IoMode::kSync) {
    uring::RingOptions options;
    options.entries = queue_depth;
    options.spin_us = spin_us;
    Result<std::unique_ptr<uring::Ring>> ring = uring::Ring::Create(options);
    if (ring.ok()) {
      context->ring_ = std::move(ring).value();
      context->bind_.emplace(context->ring_.get());
      context->env_ = uring::UringEnv::Default();
      return context;
    }
    if (mode == IoMode::kUring) return ring.status().WithContext("io_uring");
  }
  context->env_ = qcow2::SyncEnv();
  return context;
}

IoContext::~IoContext() {
  bind_.reset();
  ring_.reset();
}

}  // namespace uq::tools
