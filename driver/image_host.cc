#include "driver/image_host.h"

#include <utility>

#include "driver/request.h"

namespace uq::driver {

void ImageHost::Submit(IoDescriptor request, std::span<std::byte> buffer, LoopThread* reply_to,
                       std::function<void(int32_t)> done) {
  if (reply_to == home_) {
    Spawn(Run(request, buffer, reply_to, std::move(done)));
    return;
  }
  home_->Post([this, request, buffer, reply_to, done = std::move(done)]() mutable {
    Spawn(Run(request, buffer, reply_to, std::move(done)));
  });
}

Task<void> ImageHost::Run(IoDescriptor request, std::span<std::byte> buffer, LoopThread* reply_to,
                          std::function<void(int32_t)> done) {
  auto gate = co_await gate_.Lock(0, /*exclusive=*/false);
  ++in_flight_;
  int32_t result = co_await ServeRequest(*device_, request, buffer);
  --in_flight_;
  gate.Release();
  if (reply_to == home_) {
    done(result);
  } else {
    reply_to->Post([done = std::move(done), result] { done(result); });
  }
}

Task<Status> ImageHost::Exclusive(std::function<Task<Status>()> work) {
  auto gate = co_await gate_.Lock(0, /*exclusive=*/true);
  co_return co_await work();
}

}  // namespace uq::driver
