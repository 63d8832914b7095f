// QueueWorker with UBLK_F_BATCH_IO's per-queue commands (see "Batch
// commands" in queue.h): PREP_IO_CMDS once, a multishot FETCH_IO_CMDS that
// posts provided buffers of ready tags, COMMIT_IO_CMDS per batch of results.
#include <fmt/format.h>
#include <liburing.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "driver/queue.h"
#include "driver/uring_cmd.h"
#include "driver/zero_copy.h"

namespace uq::driver {
namespace {

// The fetch's provided buffers: each holds up to a queue's worth of tags
// (the kernel posts at most 128 at a time). Four, so that the kernel has
// buffers to post into while the worker reads one.
constexpr uint16_t kFetchBuffers = 4;
constexpr uint16_t kFetchGroup = 1;  // the buffer group id, one per ring

// co_await DeferOn{ring}: resumes once the ring has dispatched the
// completions at hand.
struct DeferOn {
  uring::Ring* ring;
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) { ring->Defer(h); }
  void await_resume() const noexcept {}
};

size_t FetchBufferBytes(uint16_t depth) { return size_t{depth} * sizeof(uint16_t); }

}  // namespace

std::byte* QueueWorker::FetchBuffer(uint16_t bid) {
  return static_cast<std::byte*>(fetch_ring_) + kFetchBuffers * sizeof(io_uring_buf) +
         size_t{bid} * FetchBufferBytes(config_.depth);
}

void QueueWorker::ReturnFetchBuffer(uint16_t bid) {
  auto* ring = static_cast<io_uring_buf_ring*>(fetch_ring_);
  io_uring_buf_ring_add(ring, FetchBuffer(bid),
                        static_cast<unsigned>(FetchBufferBytes(config_.depth)), bid,
                        io_uring_buf_ring_mask(kFetchBuffers), 0);
  io_uring_buf_ring_advance(ring, 1);
}

void QueueWorker::DropWaitingTags(TagState to) {
  for (TagState& state : state_) {
    if (state != TagState::kFetching) continue;
    state = to;
    --pending_;
  }
}

void QueueWorker::AppendElement(std::vector<std::byte>& out, uint16_t tag, int32_t result) {
  // Zero copy: the kernel registers the request's pages at index `tag`
  // (as AutoBufRegAddr does for the per-tag commands); otherwise it copies
  // to and from the tag's buffer, whose address follows the header.
  const BatchElemHeader header{tag, tag, result};
  const size_t at = out.size();
  out.resize(at + sizeof(header) + (config_.zero_copy ? 0 : sizeof(uint64_t)));
  std::memcpy(out.data() + at, &header, sizeof(header));
  if (!config_.zero_copy) {
    const uint64_t addr = reinterpret_cast<uintptr_t>(Buffer(tag).data());
    std::memcpy(out.data() + at + sizeof(header), &addr, sizeof(addr));
  }
}

Status QueueWorker::StartBatch() {
  // The fetch's buffer ring (entries, then the buffers), page aligned.
  const size_t entries_bytes = kFetchBuffers * sizeof(io_uring_buf);
  const size_t buffer_bytes = FetchBufferBytes(config_.depth);
  fetch_ring_bytes_ = entries_bytes + kFetchBuffers * buffer_bytes;
  void* area = ::mmap(nullptr, fetch_ring_bytes_, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (area == MAP_FAILED) {
    fetch_ring_bytes_ = 0;
    return Status::FromErrno(errno, "the batch fetch's buffers");
  }
  fetch_ring_ = area;
  auto* ring = static_cast<io_uring_buf_ring*>(fetch_ring_);
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<uintptr_t>(ring);
  reg.ring_entries = kFetchBuffers;
  reg.bgid = kFetchGroup;
  if (int r = io_uring_register_buf_ring(loop_->ring().raw(), &reg, 0); r < 0) {
    return Status::FromErrno(-r, "io_uring: the batch fetch's buffer ring");
  }
  io_uring_buf_ring_init(ring);
  for (uint16_t b = 0; b < kFetchBuffers; ++b) ReturnFetchBuffer(b);

  // Every tag of this lane, ready for a request; the fetch follows once the
  // kernel has them.
  std::vector<std::byte> elements;
  uint16_t count = 0;
  for (uint16_t tag = config_.tag_lane; tag < config_.depth; tag += config_.tag_stride) {
    AppendElement(elements, tag, 0);
    ++count;
    state_[tag] = TagState::kFetching;
    ++pending_;
  }
  IssueBatch(IoCommand::kPrepBatch, std::move(elements), count);
  return Status::Ok();
}

void QueueWorker::IssueBatch(IoCommand command, std::vector<std::byte> elements, uint16_t count) {
  const uint16_t seq = batch_seq_++;
  BatchIoCmd cmd{};
  cmd.q_id = config_.queue;
  cmd.flags = config_.zero_copy ? 0 : kBatchHasBufAddr;
  cmd.nr_elem = count;
  cmd.elem_bytes = static_cast<uint8_t>(elements.size() / count);
  const uint64_t user_data = uring::UserData::ForCommand(
      uring::CommandId{config_.queue, seq, static_cast<uint8_t>(command)});
  io_uring_sqe* sqe = loop_->ring().GetSqe();
  PrepUringCmd(sqe, config_.char_fd, command == IoCommand::kPrepBatch ? kPrepIoCmds : kCommitIoCmds,
               cmd, user_data);
  sqe->addr = reinterpret_cast<uintptr_t>(elements.data());
  batch_lists_[seq] = std::move(elements);  // the vector's bytes do not move
}

void QueueWorker::IssueBatchFetch() {
  BatchIoCmd cmd{};
  cmd.q_id = config_.queue;
  cmd.elem_bytes = sizeof(uint16_t);
  const uint64_t user_data = uring::UserData::ForCommand(
      uring::CommandId{config_.queue, 0, static_cast<uint8_t>(IoCommand::kFetchBatch)});
  io_uring_sqe* sqe = loop_->ring().GetSqe();
  PrepUringCmd(sqe, config_.char_fd, kFetchIoCmds, cmd, user_data);
  sqe->flags |= IOSQE_BUFFER_SELECT;
  sqe->buf_group = kFetchGroup;
  sqe->uring_cmd_flags = kUringCmdMultishot;
}

void QueueWorker::OnBatchComplete(uring::CommandId id, int32_t res, uint32_t flags) {
  // Formatted only for an error: this runs for every completion.
  auto where = [this] { return fmt::format("ublk queue {}", config_.queue); };
  switch (static_cast<IoCommand>(id.op)) {
    case IoCommand::kPrepBatch: {
      batch_lists_.erase(id.tag);
      if (res < 0) {
        DropWaitingTags(TagState::kIdle);  // never readied
        on_error_(Status::FromErrno(-res, where() + ": PREP_IO_CMDS"));
        MaybeFinished();
        return;
      }
      IssueBatchFetch();
      return;
    }
    case IoCommand::kFetchBatch:
      OnFetchedTags(res, flags);
      return;
    case IoCommand::kCommitBatch: {
      const auto list = batch_lists_.find(id.tag);
      const size_t bytes = list == batch_lists_.end() ? 0 : list->second.size();
      if (list != batch_lists_.end()) batch_lists_.erase(list);
      if (res < 0 || static_cast<size_t>(res) != bytes) {
        // The requests not committed stay with the kernel until the device
        // goes: say so.
        on_error_(res < 0 ? Status::FromErrno(-res, where() + ": COMMIT_IO_CMDS")
                          : Status::IoError(fmt::format("{}: COMMIT_IO_CMDS took {} of {} bytes",
                                                        where(), res, bytes)));
      }
      MaybeFinished();
      return;
    }
    default:
      on_error_(Status::Corruption(fmt::format("{}: completion of command {}", where(), id.op)));
  }
}

void QueueWorker::OnFetchedTags(int32_t res, uint32_t flags) {
  if (res >= 0 && (flags & IORING_CQE_F_BUFFER) != 0) {
    const uint16_t bid = static_cast<uint16_t>(flags >> IORING_CQE_BUFFER_SHIFT);
    const std::byte* buffer = FetchBuffer(bid);
    const size_t count =
        std::min<size_t>(static_cast<size_t>(res), FetchBufferBytes(config_.depth)) /
        sizeof(uint16_t);
    for (size_t i = 0; i < count; ++i) {
      uint16_t tag;
      std::memcpy(&tag, buffer + i * sizeof(tag), sizeof(tag));
      if (tag >= config_.depth || state_[tag] != TagState::kFetching) {
        on_error_(Status::Corruption(fmt::format("ublk queue {}: fetched tag {} in state {}",
                                                 config_.queue, tag,
                                                 tag < config_.depth ? int(state_[tag]) : -1)));
        continue;
      }
      OnRequest(tag);
    }
    ReturnFetchBuffer(bid);  // its tags are copied out above
  }
  if ((flags & IORING_CQE_F_MORE) != 0) return;
  // The fetch ended. Out of buffers (all were in use): fetch again, now
  // that one is back. Aborted: the device stops, no request comes again.
  if (res >= 0 || res == -ENOBUFS) {
    IssueBatchFetch();
    return;
  }
  if (res != UBLK_IO_RES_ABORT) {
    on_error_(Status::FromErrno(-res, fmt::format("ublk queue {}: FETCH_IO_CMDS", config_.queue)));
  }
  fetch_ended_ = true;
  DropWaitingTags(TagState::kAborted);
  MaybeFinished();
}

void QueueWorker::QueueCommit(uint16_t tag, int32_t result) {
  AppendElement(commit_next_, tag, result);
  ++commit_count_;
  // Ready again once committed, unless the device is stopping.
  if (fetch_ended_) {
    state_[tag] = TagState::kAborted;
    --pending_;
  } else {
    state_[tag] = TagState::kFetching;
  }
  if (commit_scheduled_) return;
  commit_scheduled_ = true;
  Spawn([](QueueWorker* self) -> Task<void> {
    co_await DeferOn{&self->loop_->ring()};
    self->FlushCommits();
  }(this));
}

void QueueWorker::FlushCommits() {
  commit_scheduled_ = false;
  if (commit_count_ > 0) {
    IssueBatch(IoCommand::kCommitBatch, std::move(commit_next_), commit_count_);
    commit_next_ = {};
    commit_count_ = 0;
  }
  MaybeFinished();
}

}  // namespace uq::driver
