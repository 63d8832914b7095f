#include "driver/loop_thread.h"

#include <pthread.h>

namespace uq::driver {

Result<std::unique_ptr<LoopThread>> LoopThread::Start(std::string name,
                                                      const uring::RingOptions& options) {
  auto loop = std::make_unique<LoopThread>(Key());
  ASSIGN_OR_RETURN(loop->mailbox_, (Mailbox<std::function<void()>>::Create()));
  std::promise<Status> started;
  std::future<Status> started_future = started.get_future();
  loop->thread_ =
      std::thread(&LoopThread::Main, loop.get(), std::move(name), options, std::move(started));
  Status status = started_future.get();
  if (!status.ok()) {
    loop->thread_.join();
    loop->joined_ = true;
    return status;
  }
  return loop;
}

LoopThread::~LoopThread() {
  if (joined_ || !thread_.joinable()) return;
  Quit();
  thread_.join();
}

void LoopThread::Quit() {
  Post([this] { quit_ = true; });
}

void LoopThread::Main(std::string name, uring::RingOptions options, std::promise<Status> started) {
  if (name.size() > 15) name.resize(15);
  pthread_setname_np(pthread_self(), name.c_str());
  Result<std::unique_ptr<uring::Ring>> ring = uring::Ring::Create(options);
  if (!ring.ok()) {
    started.set_value(ring.status().WithContext("io_uring"));
    return;
  }
  ring_ = std::move(ring).value();
  {
    uring::Ring::Bind bind(ring_.get());
    mailbox_->Watch(*ring_, [this] {
      for (std::function<void()>& fn : mailbox_->TakeAll()) fn();
    });
    started.set_value(Status::Ok());
    while (!quit_) ring_->Poll();
  }
  ring_.reset();
}

}  // namespace uq::driver
