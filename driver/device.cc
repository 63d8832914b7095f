#include "driver/device.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <tuple>
#include <utility>

#include "driver/log.h"
#include "driver/params.h"
#include "driver/state_file.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "uring/ring.h"
#include "uring/uring_env.h"

namespace uq::driver {

namespace {
// Lane `lane` of queue `queue`: "3", or "3.1" with several lanes per queue;
// its thread is "ublk-q" and that, the log counts "queue " and that.
std::string WorkerName(unsigned queue, unsigned lane, unsigned lanes) {
  return lanes > 1 ? fmt::format("{}.{}", queue, lane) : fmt::format("{}", queue);
}

using Clock = std::chrono::steady_clock;

// How long setup waits for device nodes the kernel creates asynchronously
// (devtmpfs is immediate; udev may lag), and teardown for queues to drain.
constexpr auto kNodeTimeout = std::chrono::seconds(10);
constexpr int kDrainTimeoutMs = 60'000;

uint32_t RoundUpPow2(uint32_t x) {
  uint32_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

uring::RingOptions QueueRingOptions(uint16_t depth, bool hosts_image, uint32_t poll_us) {
  uring::RingOptions options;
  // One SQE per tag for its command, plus room for the engine's host I/O on
  // the image's ring (a full ring is flushed to the kernel, never refused).
  uint32_t want = uint32_t{depth} * (hosts_image ? 4 : 1) + 16;
  options.entries = std::clamp<uint32_t>(RoundUpPow2(want), 32, 4096);
  options.sqe128 = true;
  options.extra_opcodes = {IORING_OP_URING_CMD};
  options.spin_us = poll_us;
  return options;
}

// Test hooks: UBLK_QCOW2_TEST_FAIL_AFTER=<step> makes setup fail right after
// that step, so that the VM tests can show teardown leaves nothing behind
// from any point (tests/vm/e2e/08-bad-input.sh); UBLK_QCOW2_TEST_HANG_AFTER=
// <step> makes it hang there for good (only SIGKILL ends it), so that they
// can show `add` gives up and cleans up (tests/vm/e2e/20-add-timeout.sh).
// Steps: open_image, add_dev, set_params, record, open_char, start_queues,
// start_dev, control_socket. Neither does anything unless set.
Status FailAfter(const char* step) {
  const char* hang = std::getenv("UBLK_QCOW2_TEST_HANG_AFTER");
  if (hang != nullptr && std::strcmp(hang, step) == 0) {
    std::fprintf(stderr, "ublk-qcow2: hanging after %s (UBLK_QCOW2_TEST_HANG_AFTER)\n", step);
    for (;;) ::pause();
  }
  const char* want = std::getenv("UBLK_QCOW2_TEST_FAIL_AFTER");
  if (want == nullptr || std::strcmp(want, step) != 0) return Status::Ok();
  return Status::IoError(
      fmt::format("injected failure after {} (UBLK_QCOW2_TEST_FAIL_AFTER)", step));
}

// How long recover waits for the kernel to release the dead daemon's
// /dev/ublkcN (START_USER_RECOVERY answers EBUSY until then).
constexpr auto kRecoveryStartTimeout = std::chrono::seconds(10);

DeviceRecord RecordFor(const DeviceOptions& options, const DeviceInfo& info) {
  DeviceRecord record;
  record.id = info.dev_id;
  record.image = options.image;
  record.pid = static_cast<int>(::getpid());
  record.queues = info.queues;
  record.depth = info.depth;
  record.size = info.size;
  record.read_only = info.read_only;
  record.working_dir = options.working_dir;
  record.direct = options.direct;
  record.cache_size = options.cache_size;
  record.preallocate = options.preallocate;
  record.max_io = info.max_io_buf_bytes;
  record.poll_us = options.poll_us;
  record.recovery = RecoveryModeName(RecoveryModeOf(info.flags));
  record.encrypted = info.encrypted;
  return record;
}

}  // namespace

Result<std::unique_ptr<Device>> Device::Create(const DeviceOptions& options) {
  auto device = std::make_unique<Device>(Key());
  Status status = device->Setup(options);
  if (!status.ok() && device->abandon_on_failure_) {
    // The device must keep waiting for a daemon: no STOP_DEV, no DEL_DEV, no
    // joining threads that hold fetched tags. The caller exits; the kernel
    // then releases this process's /dev/ublkcN as it did the dead daemon's.
    Log("recovery failed; the device still waits for a daemon: " + status.ToString());
    (void)device.release();
    return status;
  }
  if (!status.ok()) {
    // Undo what was done; the setup error is the one to report.
    Status teardown = device->Teardown();
    if (!teardown.ok()) Log("cleaning up after a failed setup: " + teardown.ToString());
    return status;
  }
  return device;
}

Device::~Device() {
  Status status = Teardown();
  if (!status.ok()) Log(status.ToString());
}

Status Device::Setup(const DeviceOptions& options) {
  if (options.queues == 0 || options.depth == 0 || options.depth > UBLK_MAX_QUEUE_DEPTH) {
    return Status::InvalidArgument(
        fmt::format("{} queues of depth {}: want at least 1 queue of depth 1..{}", options.queues,
                    options.depth, UBLK_MAX_QUEUE_DEPTH));
  }
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) return Status::FromErrno(errno, "eventfd");
  if (options.handle_signals) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    signal_fd_ = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (signal_fd_ < 0) return Status::FromErrno(errno, "signalfd");
  }

  ASSIGN_OR_RETURN(control_, ControlDevice::Open());
  info_.features = control_->features();
  uint64_t recovery_flags = 0;
  if (options.recover) {
    RETURN_IF_ERROR(AdoptDevice(options));
    recovery_flags = info_.flags & (UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE |
                                    UBLK_F_USER_RECOVERY_FAIL_IO);
  } else {
    ASSIGN_OR_RETURN(recovery_flags, RecoveryFlags(options.recovery, options.recovery_requested,
                                                   control_->features()));
  }

  // Queue 0's thread first: the image lives there.
  ASSIGN_OR_RETURN(
      std::unique_ptr<LoopThread> loop0,
      LoopThread::Start("ublk-q0", QueueRingOptions(options.depth, true, options.poll_us)));
  loops_.push_back(std::move(loop0));
  if (options.poll_us > 0 && loops_[0]->Call([&] { return loops_[0]->ring().spin_us(); }) == 0) {
    // Serving still works; only the latency the user asked for is not there.
    Log(fmt::format("--poll-us ignored: {}", uring::kNoBusyPolling));
  }
  qcow2::ImageOptions image_options;
  image_options.env = uring::UringEnv::Default();
  image_options.writable = !options.read_only;
  image_options.direct = options.direct;
  image_options.preallocate = options.preallocate;
  image_options.cache_size = options.cache_size;
  image_options.working_dir = options.working_dir;
  image_options.key = options.key;
  // A daemon that dies must not take acknowledged writes with it.
  image_options.stable_metadata = recovery_flags != 0;
  if (options.recover) {
    // The daemon before may have died: free what it leaked (its cluster
    // reserve) before serving. After an upgrade there is nothing to free.
    image_options.repair_leaks = true;
    image_options.on_leak_repair = [this](const qcow2::CheckResult& r, double seconds) {
      // Logged by the daemon once its log is open (driver/daemon.cc).
      info_.leak_repair = fmt::format(
          "leak repair on open: {} leaked clusters freed, {} corruptions{}{} in {:.3f} s",
          r.leaks_fixed, r.corruptions, r.error.empty() ? "" : "; check failed: ", r.error,
          seconds);
    };
  }
  const std::string path = options.image;
  using OpenResult = Result<std::unique_ptr<qcow2::BlockDevice>>;
  ASSIGN_OR_RETURN(image_, loops_[0]->RunTask<OpenResult>(
                               [&] { return qcow2::OpenImage(path, image_options); }));
  RETURN_IF_ERROR(FailAfter("open_image"));

  ImageFacts facts;
  facts.size = image_->size();
  facts.read_only = options.read_only || image_->read_only();
  facts.cluster_size = 4096;
  if (auto* qcow2 = dynamic_cast<qcow2::Qcow2Image*>(image_.get())) {
    facts.cluster_size = qcow2->geometry().cluster_size;
  }
  for (const qcow2::BlockDevice* layer = image_.get(); layer != nullptr; layer = layer->backing()) {
    const auto* qcow2 = dynamic_cast<const qcow2::Qcow2Image*>(layer);
    if (qcow2 != nullptr && qcow2->luks() != nullptr) info_.encrypted = true;
  }
  if (options.recover) {
    // The kernel keeps the device's size: the image must still have it.
    ASSIGN_OR_RETURN(ublk_params kept, control_->GetParams(info_.dev_id));
    const uint64_t device_size = uint64_t{kept.basic.dev_sectors} << 9;
    if (device_size != facts.size) {
      return Status::InvalidArgument(fmt::format("{}: the image is {} bytes, the device {} bytes",
                                                 path, facts.size, device_size));
    }
    info_.size = facts.size;
    info_.cluster_size = facts.cluster_size;
    info_.read_only = facts.read_only;
    RETURN_IF_ERROR(WriteRecord(RecordFor(options, info_)));  // this daemon's pid
    RETURN_IF_ERROR(StartRecovery());
    abandon_on_failure_ = true;
  }
  Result<ublk_params> computed = ComputeParams(facts, options.max_io_buf_bytes);
  if (!computed.ok()) return computed.status().WithContext(path);
  ublk_params params = *computed;

  if (!options.recover) {
    AddRequest request;
    request.dev_id = options.dev_id;
    request.queues = options.queues;
    request.depth = options.depth;
    request.max_io_buf_bytes = options.max_io_buf_bytes;
    request.flags = recovery_flags;
    ASSIGN_OR_RETURN(uint64_t scan_flags,
                     PartitionScanFlags(options.no_partition_scan, info_.features));
    request.flags |= scan_flags;
    ASSIGN_OR_RETURN(uint64_t zero_copy_flags, ZeroCopyFlags(options.zero_copy, info_.features));
    request.flags |= zero_copy_flags;
    ASSIGN_OR_RETURN(uint64_t per_io_flags,
                     PerIoDaemonFlags(options.threads_per_queue, info_.features));
    request.flags |= per_io_flags;
    ASSIGN_OR_RETURN(uint64_t batch_flags,
                     BatchIoFlags(options.batch_io, options.threads_per_queue, info_.features));
    request.flags |= batch_flags;
    ASSIGN_OR_RETURN(ublksrv_ctrl_dev_info dev, control_->AddDevice(request));
    added_ = true;
    info_.dev_id = static_cast<int>(dev.dev_id);
    info_.queues = dev.nr_hw_queues;
    info_.depth = dev.queue_depth;
    info_.max_io_buf_bytes = dev.max_io_buf_bytes;
    info_.flags = dev.flags;
    info_.size = facts.size;
    info_.cluster_size = facts.cluster_size;
    info_.read_only = facts.read_only;
    info_.block_path = BlockDevicePath(info_.dev_id);
    if (options.on_added) options.on_added(info_.dev_id);
    RETURN_IF_ERROR(FailAfter("add_dev"));
    if (info_.max_io_buf_bytes != options.max_io_buf_bytes) {
      // The kernel rounds the buffer size down to a page: recompute.
      ASSIGN_OR_RETURN(params, ComputeParams(facts, info_.max_io_buf_bytes));
    }
    RETURN_IF_ERROR(control_->SetParams(info_.dev_id, params));
    RETURN_IF_ERROR(FailAfter("set_params"));
    // Before the device can go live: a daemon that dies from here on leaves
    // what `recover` needs.
    RETURN_IF_ERROR(WriteRecord(RecordFor(options, info_)));
    recorded_ = true;
    RETURN_IF_ERROR(FailAfter("record"));
  }  // !options.recover
  RETURN_IF_ERROR(OpenCharDevice());
  RETURN_IF_ERROR(FailAfter("open_char"));

  host_ = std::make_unique<ImageHost>(loops_[0].get(), image_.get());
  // Worker w serves lane w % lanes of queue w / lanes, on loops_[w].
  const uint16_t lanes = (info_.flags & UBLK_F_PER_IO_DAEMON) != 0
                             ? std::max<uint16_t>(options.threads_per_queue, 1)
                             : 1;
  info_.threads_per_queue = lanes;
  const unsigned worker_count = unsigned{info_.queues} * lanes;
  for (unsigned w = 1; w < worker_count; ++w) {
    ASSIGN_OR_RETURN(std::unique_ptr<LoopThread> loop,
                     LoopThread::Start("ublk-q" + WorkerName(w / lanes, w % lanes, lanes),
                                       QueueRingOptions(info_.depth, false, options.poll_us)));
    loops_.push_back(std::move(loop));
  }
  const Opcodes ops = Opcodes::For(info_.flags | (control_->features() & UBLK_F_CMD_IOCTL_ENCODE));
  for (unsigned q = 0; q < worker_count; ++q) {
    QueueConfig config;
    config.queue = static_cast<uint16_t>(q / lanes);
    config.tag_stride = lanes;
    config.tag_lane = static_cast<uint16_t>(q % lanes);
    config.depth = info_.depth;
    config.buffer_bytes = info_.max_io_buf_bytes;
    config.char_fd = char_fd_;
    config.ops = ops;
    // From the device's flags: a recovered device keeps the mode it was added with.
    config.zero_copy = UsesZeroCopy(info_.flags);
    config.batch = (info_.flags & UBLK_F_BATCH_IO) != 0;
    workers_.push_back(std::make_unique<QueueWorker>(
        config, loops_[q].get(), host_.get(), [this] { OnQueueFinished(); },
        [this](Status s) { OnQueueError(std::move(s)); }));
    QueueWorker* worker = workers_.back().get();
    RETURN_IF_ERROR(loops_[q]->Call([worker] { return worker->Start(); }));
  }
  RETURN_IF_ERROR(FailAfter("start_queues"));

  if (options.recover) {
    RETURN_IF_ERROR(control_->EndUserRecovery(info_.dev_id, static_cast<int>(::getpid())));
    // Live again, ours: a stop from now on deletes it as usual.
    abandon_on_failure_ = false;
    added_ = true;
    info_.recovered = true;
  } else {
    RETURN_IF_ERROR(control_->StartDevice(info_.dev_id, static_cast<int>(::getpid())));
  }
  RETURN_IF_ERROR(FailAfter("start_dev"));
  RETURN_IF_ERROR(WaitForBlockNode());

  RETURN_IF_ERROR(EnsureStateDir());
  ASSIGN_OR_RETURN(socket_, ControlSocket::Listen(SocketPath(info_.dev_id), Handlers()));
  return FailAfter("control_socket");
}

Status Device::AdoptDevice(const DeviceOptions& options) {
  ASSIGN_OR_RETURN(ublksrv_ctrl_dev_info dev, control_->GetInfo(options.dev_id));
  if (!(dev.flags & UBLK_F_USER_RECOVERY)) {
    return Status::InvalidArgument(fmt::format(
        "ublk device {} was added without user recovery (--recovery=off, or a kernel without "
        "UBLK_F_USER_RECOVERY)",
        options.dev_id));
  }
  if (!AwaitsRecovery(dev.state)) {
    return Status::Busy(fmt::format("ublk device {} is {}, not waiting for recovery",
                                    options.dev_id, DeviceStateName(dev.state)));
  }
  info_.dev_id = static_cast<int>(dev.dev_id);
  info_.queues = dev.nr_hw_queues;
  info_.depth = dev.queue_depth;
  info_.max_io_buf_bytes = dev.max_io_buf_bytes;
  info_.flags = dev.flags;
  info_.block_path = BlockDevicePath(info_.dev_id);
  return Status::Ok();
}

Status Device::StartRecovery() {
  const auto deadline = Clock::now() + kRecoveryStartTimeout;
  for (;;) {
    Status started = control_->StartUserRecovery(info_.dev_id);
    if (started.error_number() != EBUSY || Clock::now() >= deadline) return started;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

Status Device::OpenCharDevice() {
  const std::string path = CharDevicePath(info_.dev_id);
  const auto deadline = Clock::now() + kNodeTimeout;
  for (;;) {
    char_fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (char_fd_ >= 0) return Status::Ok();
    const int err = errno;
    if (err != ENOENT || Clock::now() >= deadline) return Status::FromErrno(err, path);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

Status Device::WaitForBlockNode() {
  const auto deadline = Clock::now() + kNodeTimeout;
  for (;;) {
    struct stat st;
    if (::stat(info_.block_path.c_str(), &st) == 0 && S_ISBLK(st.st_mode)) return Status::Ok();
    if (Clock::now() >= deadline) {
      return Status::IoError(fmt::format("{} did not appear within {} s after START_DEV",
                                         info_.block_path, kNodeTimeout.count()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

Status Device::Serve() {
  WaitForQueues(-1);
  return Teardown();
}

bool Device::WaitForQueues(int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (finished_queues_.load() == workers_.size()) return true;
    bool failed;
    {
      std::lock_guard<std::mutex> lock(error_mu_);
      failed = !first_error_.ok();
    }
    // A queue lost a tag: the device cannot serve it any more.
    if (failed && !stop_sent_) {
      Log(fmt::format("stopping {} after a queue error", info_.block_path));
      StopOnce();
    }

    int wait_ms = -1;
    if (timeout_ms >= 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return false;
      wait_ms = static_cast<int>(left.count());
    }
    // The socket is polled only while serving (Teardown closes it first).
    pollfd fds[3] = {{wake_fd_, POLLIN, 0},
                     {signal_fd_, POLLIN, 0},
                     {socket_ != nullptr ? socket_->fd() : -1, POLLIN, 0}};
    int n = ::poll(fds, 3, wait_ms);
    if (n < 0 && errno != EINTR) {
      Log(fmt::format("poll: {}", std::strerror(errno)));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (fds[0].revents & POLLIN) {
      uint64_t count;
      (void)!::read(wake_fd_, &count, sizeof(count));
    }
    if (signal_fd_ >= 0 && (fds[1].revents & POLLIN)) {
      signalfd_siginfo si;
      bool got = false;
      while (::read(signal_fd_, &si, sizeof(si)) == static_cast<ssize_t>(sizeof(si))) got = true;
      if (got) StopOnce();
    }
    if (socket_ != nullptr && (fds[2].revents & POLLIN)) socket_->Serve();
  }
}

void Device::StopOnce() {
  socket_.reset();  // stopping: no more control requests
  if (stop_sent_ || !added_) return;
  stop_sent_ = true;
  Status status = control_->StopDevice(info_.dev_id);
  if (!status.ok()) Log(status.ToString());
}

Status Device::Teardown() {
  if (torn_down_) return Status::Ok();
  torn_down_ = true;
  socket_.reset();  // no control request from here on; the file goes too

  bool drained = true;
  if (!workers_.empty() && finished_queues_.load() != workers_.size()) {
    StopOnce();
    drained = WaitForQueues(kDrainTimeoutMs);
    if (!drained) Log("queues did not drain within 60 s; not closing the image");
  }
  Status result;
  {
    std::lock_guard<std::mutex> lock(error_mu_);
    result = first_error_;
  }
  if (image_ != nullptr && drained) {
    Status closed = loops_[0]->RunTask<Status>([this] { return image_->Close(); });
    if (!closed.ok()) {
      Log("closing the image: " + closed.ToString());
      if (result.ok()) result = closed;
    }
  }
  if (drained && !workers_.empty()) {
    std::string counts;
    std::string zero_copied;  // per queue, with zero copy
    // One lane at least: the names below divide by it.
    const uint16_t lanes = std::max<uint16_t>(info_.threads_per_queue, 1);
    for (size_t q = 0; q < workers_.size(); ++q) {
      QueueWorker* worker = workers_[q].get();
      LoopThread* loop = loops_[q].get();
      auto [n, here, zc, spin_us, polled, slept, left, not_aborted] = loop->Call([worker, loop] {
        uring::Ring& ring = loop->ring();
        return std::tuple(worker->requests(), worker->served_here(), worker->zero_copied(),
                          ring.spin_us(), ring.polled_waits(), ring.slept_waits(), worker->left(),
                          worker->not_aborted());
      });
      counts += fmt::format("{}queue {}: {} requests ({} on its own thread", q == 0 ? "" : ", ",
                            WorkerName(q / lanes, q % lanes, lanes), n, here);
      // Handed over: requests that came too late, which the kernel re-issues.
      if (left > 0) counts += fmt::format("; {} left to the next daemon", left);
      // Handed over with fetches QUIESCE_DEV did not abort (see queue.h).
      if (not_aborted > 0) counts += fmt::format("; {} fetches not aborted", not_aborted);
      zero_copied += fmt::format("{}{}", q == 0 ? "" : ", ", zc);
      // With --poll-us: how many waits polling ended without a sleep.
      if (spin_us > 0) {
        counts += fmt::format("; waits: {} polled, {} slept", polled, slept);
      }
      counts += ")";
    }
    // After the per-queue counts, so that their format stays as it was.
    if (UsesZeroCopy(info_.flags)) counts += "; with zero copy: " + zero_copied;
    Log(fmt::format("{} served {}", info_.block_path, counts));
  }
  // The other queues' threads first: queue 0's hosts the image.
  while (!loops_.empty()) loops_.pop_back();
  host_.reset();
  image_.reset();
  workers_.clear();
  if (char_fd_ >= 0) {
    ::close(char_fd_);
    char_fd_ = -1;
  }
  if (added_) {
    added_ = false;
    // Without waiting: after `del --force` a mounted file system may hold
    // the device until it is unmounted, and the daemon must not wait for that.
    Status deleted = control_->DeleteDeviceNoWait(info_.dev_id);
    if (!deleted.ok() && result.ok()) result = deleted;
  }
  control_.reset();
  if (recorded_) (void)RemoveRecord(info_.dev_id);
  if (signal_fd_ >= 0) ::close(signal_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  signal_fd_ = wake_fd_ = -1;
  return result;
}

void Device::Wake() {
  const uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof(one));
}

void Device::OnQueueFinished() {
  finished_queues_.fetch_add(1);
  Wake();
}

void Device::OnQueueError(Status status) {
  Log(status.ToString());
  {
    std::lock_guard<std::mutex> lock(error_mu_);
    if (first_error_.ok()) first_error_ = std::move(status);
  }
  Wake();
}

}  // namespace uq::driver
