#include "driver/queue.h"

#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <utility>

#include "driver/request.h"
#include "driver/uring_cmd.h"
#include "driver/zero_copy.h"

namespace uq::driver {

QueueWorker::QueueWorker(QueueConfig config, LoopThread* loop, ImageHost* host,
                         std::function<void()> on_finished, std::function<void(Status)> on_error)
    : config_(config),
      loop_(loop),
      host_(host),
      on_finished_(std::move(on_finished)),
      on_error_(std::move(on_error)),
      state_(config.depth, TagState::kIdle) {}

QueueWorker::~QueueWorker() {
  if (descriptors_ != nullptr) {
    ::munmap(const_cast<ublksrv_io_desc*>(descriptors_), descriptors_bytes_);
  }
  if (buffers_ != nullptr) ::munmap(buffers_, buffers_bytes_);
  if (fetch_ring_ != nullptr) ::munmap(fetch_ring_, fetch_ring_bytes_);
}

Status QueueWorker::Start() {
  started_ = true;
  const std::string where = fmt::format("ublk queue {}", config_.queue);
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));

  descriptors_bytes_ = DescriptorAreaSize(config_.depth, page);
  void* area =
      ::mmap(nullptr, descriptors_bytes_, PROT_READ, MAP_SHARED | MAP_POPULATE, config_.char_fd,
             static_cast<off_t>(DescriptorAreaOffset(config_.queue, page)));
  if (area == MAP_FAILED) {
    descriptors_bytes_ = 0;
    MaybeFinished();
    return Status::FromErrno(errno, where + ": mmap of the I/O descriptors");
  }
  descriptors_ = static_cast<const ublksrv_io_desc*>(area);

  // Pages are touched only as requests use them.
  buffers_bytes_ = size_t{config_.depth} * config_.buffer_bytes;
  void* buffers = ::mmap(nullptr, buffers_bytes_, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (buffers == MAP_FAILED) {
    buffers_bytes_ = 0;
    MaybeFinished();
    return Status::FromErrno(errno, where + ": request buffers");
  }
  buffers_ = static_cast<std::byte*>(buffers);

  if (config_.zero_copy) {
    Status table = RegisterBufferTable(loop_->ring(), config_.depth);
    if (!table.ok()) {
      MaybeFinished();
      return table.WithContext(where);
    }
  }

  loop_->ring().set_command_handler(this);
  if (config_.batch) {
    Status started = StartBatch();
    loop_->ring().SubmitPending();
    if (!started.ok()) MaybeFinished();
    return started.WithContext(where);
  }
  for (uint16_t tag = config_.tag_lane; tag < config_.depth; tag += config_.tag_stride) {
    Issue(tag, IoCommand::kFetch, 0);
  }
  loop_->ring().SubmitPending();
  return Status::Ok();
}

void QueueWorker::Issue(uint16_t tag, IoCommand command, int32_t result) {
  ublksrv_io_cmd cmd{};
  cmd.q_id = config_.queue;
  cmd.tag = tag;
  cmd.result = result;
  // Zero copy: the command's addr stays 0 (user copy), and the SQE's own
  // addr says where the kernel registers the request's pages; else addr is
  // the buffer the kernel copies the data to and from.
  if (!config_.zero_copy) cmd.addr = reinterpret_cast<uintptr_t>(Buffer(tag).data());
  const uint32_t op =
      command == IoCommand::kFetch ? config_.ops.fetch_req : config_.ops.commit_and_fetch_req;
  const uint64_t user_data = uring::UserData::ForCommand(
      uring::CommandId{config_.queue, tag, static_cast<uint8_t>(command)});
  io_uring_sqe* sqe = loop_->ring().GetSqe();
  PrepUringCmd(sqe, config_.char_fd, op, cmd, user_data);
  if (config_.zero_copy) sqe->addr = AutoBufRegAddr(tag);
  if (handover_ && command == IoCommand::kCommitAndFetch) {
    // Not waited for: see the file comment of queue.h.
    if (state_[tag] == TagState::kServing || state_[tag] == TagState::kFetching) --pending_;
    state_[tag] = TagState::kReleased;
    MaybeFinished();
    return;
  }
  if (state_[tag] != TagState::kFetching) {
    if (state_[tag] != TagState::kServing) ++pending_;
    state_[tag] = TagState::kFetching;
  }
}

void QueueWorker::OnCommandComplete(uint64_t payload, int32_t res, uint32_t flags) {
  const uring::CommandId id = uring::CommandId::Unpack(payload);
  if (config_.batch) {
    OnBatchComplete(id, res, flags);
    return;
  }
  const uint16_t tag = id.tag;
  if (handover_ && tag < config_.depth && id.queue == config_.queue &&
      (state_[tag] == TagState::kReleased || finished_)) {
    // A released tag: its abort means nothing; a request on it is served
    // unless this worker is done, when the kernel keeps it for the next
    // daemon.
    if (res != UBLK_IO_RES_OK) {
      if (state_[tag] == TagState::kFetching) {
        state_[tag] = TagState::kAborted;
        --pending_;
      }
      return;
    }
    if (finished_) {
      ++left_;
      return;
    }
    if (state_[tag] == TagState::kReleased) ++pending_;
    state_[tag] = TagState::kFetching;
    OnRequest(tag);
    return;
  }
  if (id.queue != config_.queue || tag >= config_.depth || state_[tag] != TagState::kFetching) {
    on_error_(Status::Corruption(
        fmt::format("ublk queue {}: completion for queue {} tag {} in state {}", config_.queue,
                    id.queue, tag, tag < config_.depth ? static_cast<int>(state_[tag]) : -1)));
    return;
  }
  if (res == UBLK_IO_RES_OK) {
    OnRequest(tag);
    return;
  }
  if (res == UBLK_IO_RES_ABORT) {
    state_[tag] = TagState::kAborted;
    --pending_;
    MaybeFinished();
    return;
  }
  const char* what =
      id.op == static_cast<uint8_t>(IoCommand::kFetch) ? "FETCH_REQ" : "COMMIT_AND_FETCH_REQ";
  GiveUp(tag, res < 0
                  ? Status::FromErrno(
                        -res, fmt::format("ublk queue {} tag {}: {}", config_.queue, tag, what))
                  : Status::IoError(fmt::format("ublk queue {} tag {}: {}: unexpected result {}",
                                                config_.queue, tag, what, res)));
}

void QueueWorker::OnRequest(uint16_t tag) {
  state_[tag] = TagState::kServing;
  ++serving_;
  ++requests_;
  const IoDescriptor request = DecodeDescriptor(descriptors_[tag]);
  if (config_.zero_copy) {
    OnZeroCopyRequest(tag, request);
    return;
  }
  // Reads and overwrites of clusters whose mapping the engine has published
  // run right here, on this queue's ring; the rest go to the image's thread.
  if (std::optional<Task<int32_t>> here = TryServeHere(*host_->device(), request, Buffer(tag))) {
    ++served_here_;
    Spawn([](QueueWorker* self, uint16_t tag, Task<int32_t> io) -> Task<void> {
      self->OnResult(tag, co_await std::move(io));
    }(this, tag, std::move(*here)));
    return;
  }
  host_->Submit(request, Buffer(tag), loop_,
                [this, tag](int32_t result) { OnResult(tag, result); });
}

void QueueWorker::OnZeroCopyRequest(uint16_t tag, const IoDescriptor& request) {
  const bool write = request.op == UBLK_IO_OP_WRITE;
  const bool data = (write || request.op == UBLK_IO_OP_READ) && request.length > 0;
  const bool registered = (request.flags & UBLK_IO_F_NEED_REG_BUF) == 0;
  if (data && registered && !(write && request.fua())) {
    if (std::optional<qcow2::HostMapping> mapping =
            host_->device()->TryMapAnyThread(write, request.offset, request.length)) {
      ++served_here_;
      ++zero_copied_;
      Spawn([](QueueWorker* self, uint16_t tag, IoDescriptor request,
               Task<Status> io) -> Task<void> {
        Status status = co_await std::move(io);
        self->OnResult(
            tag, status.ok() ? static_cast<int32_t>(request.length) : FailRequest(request, status));
      }(this, tag, request,
                                ServeFixed(loop_->ring(), std::move(*mapping), request, tag,
                                           config_.char_fd, config_.queue, tag)));
      return;
    }
  }
  // Through the tag's buffer: a write's data is copied out of the request
  // first, a read's bytes into it once the engine has them.
  const std::span<std::byte> buffer = Buffer(tag);
  const bool fits = request.length <= buffer.size();
  if (data && write && fits) {
    Status copied =
        CopyFromRequest(config_.char_fd, config_.queue, tag, buffer.first(request.length));
    if (!copied.ok()) {
      OnResult(tag, FailRequest(request, copied));
      return;
    }
  }
  auto done = [this, tag, request, buffer](int32_t result) {
    if (request.op == UBLK_IO_OP_READ && result > 0) {
      Status copied = CopyToRequest(config_.char_fd, config_.queue, tag,
                                    buffer.first(static_cast<size_t>(result)));
      if (!copied.ok()) result = FailRequest(request, copied);
    }
    OnResult(tag, result);
  };
  if (std::optional<Task<int32_t>> here = TryServeHere(*host_->device(), request, buffer)) {
    ++served_here_;
    Spawn([](std::function<void(int32_t)> done, Task<int32_t> io) -> Task<void> {
      done(co_await std::move(io));
    }(done, std::move(*here)));
    return;
  }
  host_->Submit(request, buffer, loop_, done);
}

void QueueWorker::OnResult(uint16_t tag, int32_t result) {
  --serving_;
  if (config_.batch) {
    QueueCommit(tag, result);
    return;
  }
  Issue(tag, IoCommand::kCommitAndFetch, result);
}

void QueueWorker::BeginHandover() { handover_ = true; }

void QueueWorker::EndHandover() {
  handover_ended_ = true;
  MaybeFinished();
}

void QueueWorker::AbortHandover() {
  handover_ = false;
  for (TagState& state : state_) {
    if (state != TagState::kReleased) continue;
    state = TagState::kFetching;
    ++pending_;
  }
}

void QueueWorker::GiveUp(uint16_t tag, Status why) {
  if (state_[tag] == TagState::kServing) --serving_;
  state_[tag] = TagState::kIdle;
  --pending_;
  on_error_(std::move(why));
  MaybeFinished();
}

void QueueWorker::MaybeFinished() {
  if (!started_ || finished_) return;
  // While handing over, never before QUIESCE_DEV has returned: until then
  // the kernel may still hand a released tag a request. After it, once no
  // request is being served: a fetch the kernel did not abort is not waited
  // for (see "Handing over" in queue.h), the ring's teardown cancels it.
  if (handover_ && !handover_ended_) return;
  bool done = handover_ended_ ? serving_ == 0 : pending_ == 0;
  // Batch lists the kernel may still read, or a commit still to be sent.
  if (!batch_lists_.empty() || commit_scheduled_) done = false;
  if (!done) return;
  if (handover_ended_) {
    for (TagState state : state_) not_aborted_ += state == TagState::kFetching ? 1 : 0;
  }
  finished_ = true;
  on_finished_();
}

}  // namespace uq::driver
