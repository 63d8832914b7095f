// QueueWorker: one ublk hardware queue — its tags, their buffers, and the
// FETCH_REQ / COMMIT_AND_FETCH_REQ cycle with the kernel.
//
// Start() maps the queue's I/O descriptor array from /dev/ublkcN (read-only,
// shared with the kernel), maps one buffer of max_io_buf_bytes per tag, and
// issues FETCH_REQ for every tag. From then on each command completion is a
// request on its tag (the kernel filled the tag's descriptor and, for
// writes, its buffer): the worker decodes the descriptor, hands the request
// to the ImageHost (or serves it on this thread, when the image has
// published the mapping: TryServeHere), and when the result comes back queues
// COMMIT_AND_FETCH_REQ, which both completes the request and re-arms the
// tag. All SQEs prepared in one loop iteration go to the kernel together in
// the ring's next Poll().
//
// Zero copy (config.zero_copy, driver/zero_copy.h): the kernel copies no
// data to or from the tag's buffer. Start() gives the ring a buffer table
// with one entry per tag, where the kernel registers each request's pages
// (the fetch asks for index = tag). A read or plain write of published
// clusters moves its data between those pages and the image file with
// fixed-buffer I/O on this ring (ServeFixed); any other request uses the
// tag's buffer as without zero copy, its data copied out of the request
// first (a write) or into it before the commit (a read) through /dev/ublkcN.
//
// Stopping: when the device is stopped (STOP_DEV), the kernel completes
// every pending fetch with UBLK_IO_RES_ABORT (-ENODEV); requests in flight
// finish first. A tag that gets ABORT is not fetched again. When no tag is
// waiting in the kernel or being served, the worker is finished and calls
// on_finished once. Any other failure of a command (it would leave a tag
// stuck) is reported through on_error, and the tag is given up.
//
// Handing over (upgrade): BeginHandover() before the daemon sends
// QUIESCE_DEV, EndHandover() after it returns. From BeginHandover on, a
// tag's COMMIT_AND_FETCH releases it: the worker no longer waits for it
// (the kernel hands it no new request once QUIESCE_DEV has begun, and keeps
// its fetch until the ring goes); should a request still arrive on it
// before the worker is finished, it is served. After EndHandover the worker
// is finished once no request is being served, whether or not QUIESCE_DEV
// aborted every idle fetch: it aborts only the fetches whose tag's last
// request has completed in the kernel, and with zero copy a committed
// request can complete later than its commit (the kernel completes it when
// its auto-registered buffer is released, which waits for the fixed-buffer
// I/O that used it to be freed, after that I/O's completion was seen: from
// io-wq, a freeing task work). Such a fetch is never aborted; waiting for
// it hung the handover (7.3). The fetches left are cancelled when the
// queue's thread and ring go. Requests that arrive after the worker is
// finished are left alone: the kernel gives them to the next daemon
// (re-issue).
//
// Batch commands (config.batch, a device with UBLK_F_BATCH_IO; Linux 7.0+,
// queue_batch.cc): Start() readies every tag with one PREP_IO_CMDS and arms
// one multishot FETCH_IO_CMDS, whose completions each carry a provided
// buffer of ready tags; results gathered while the ring dispatches one batch
// of completions go back in one COMMIT_IO_CMDS, which also readies their
// tags. Stopping: the kernel ends the fetch with UBLK_IO_RES_ABORT; tags
// served then are committed and not waited for again. No handover (upgrade
// refuses such a device: CheckUpgrade).
//
// Per-tag state lives in plain arrays indexed by tag: the command's
// user_data is a CommandId (queue, tag, command), see uring/user_data.h.
//
// Thread model: everything runs on the worker's LoopThread, the one task that
// issues its tags' commands (the kernel requires a single task per queue,
// or with UBLK_F_PER_IO_DAEMON per tag: then a queue may have several
// workers, each with its own lane of tags, QueueConfig::tag_stride). Construct and destroy it from
// any thread while the loop is idle.
#ifndef UBLK_QCOW2_DRIVER_QUEUE_H_
#define UBLK_QCOW2_DRIVER_QUEUE_H_

#include <linux/ublk_cmd.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <vector>

#include "base/status.h"
#include "driver/image_host.h"
#include "driver/loop_thread.h"
#include "driver/ublk_abi.h"
#include "uring/user_data.h"

namespace uq::driver {

struct QueueConfig {
  uint16_t queue = 0;
  uint16_t depth = 0;
  uint32_t buffer_bytes = 0;  // max_io_buf_bytes, a page multiple
  int char_fd = -1;           // /dev/ublkcN, kept open by the caller
  Opcodes ops = Opcodes::For(0);
  // The device has UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY (UsesZeroCopy):
  // see driver/zero_copy.h.
  bool zero_copy = false;
  // This worker fetches the tags t with t % tag_stride == tag_lane; the
  // queue's other lanes are other workers on other threads (the device has
  // UBLK_F_PER_IO_DAEMON, see DeviceOptions::threads_per_queue).
  uint16_t tag_stride = 1;
  uint16_t tag_lane = 0;
  // The device has UBLK_F_BATCH_IO: PREP/FETCH/COMMIT_IO_CMDS instead of the
  // per-tag commands (see "Batch commands" above).
  bool batch = false;
};

class QueueWorker final : public uring::CommandHandler {
 public:
  enum class TagState : uint8_t {
    kIdle,      // never fetched, or given up
    kFetching,  // a FETCH/COMMIT_AND_FETCH is pending in the kernel
    kServing,   // the request is with the image
    kAborted,   // the kernel said ABORT: the device is stopping
    kReleased,  // committed while handing over: not waited for
  };

  // `on_finished` and `on_error` run on the queue's thread.
  QueueWorker(QueueConfig config, LoopThread* loop, ImageHost* host,
              std::function<void()> on_finished, std::function<void(Status)> on_error);
  ~QueueWorker();
  QueueWorker(const QueueWorker&) = delete;
  QueueWorker& operator=(const QueueWorker&) = delete;

  // On the loop thread: maps the descriptors and buffers, installs itself as
  // the ring's command handler and fetches every tag. On failure the tags
  // fetched so far stay fetched (STOP_DEV aborts them); on_finished still
  // comes once none is pending.
  Status Start();

  void OnCommandComplete(uint64_t payload, int32_t res, uint32_t flags) override;

  // Handing over to a new daemon (see above); loop thread.
  void BeginHandover();
  // After QUIESCE_DEV returned, or gave up: the worker behaves the same either way (see above).
  void EndHandover();
  // QUIESCE_DEV was refused: serve on as before (released tags are waited
  // for again).
  void AbortHandover();

  // Counters, loop thread only: requests, and those of them served on this
  // thread without the image's (TryServeHere).
  uint64_t requests() const { return requests_; }
  uint64_t served_here() const { return served_here_; }
  // Requests that came after a handover finished (left to the next daemon).
  uint64_t left() const { return left_; }
  // Fetches still in the kernel when a handover finished (not aborted by
  // QUIESCE_DEV, or their abort not yet seen): cancelled with the ring.
  uint64_t not_aborted() const { return not_aborted_; }
  // Of those, the ones served with zero copy (ServeFixed).
  uint64_t zero_copied() const { return zero_copied_; }

 private:
  void Issue(uint16_t tag, IoCommand command, int32_t result);
  void OnRequest(uint16_t tag);
  // A request on a zero-copy device.
  void OnZeroCopyRequest(uint16_t tag, const IoDescriptor& request);
  void OnResult(uint16_t tag, int32_t result);
  void GiveUp(uint16_t tag, Status why);
  void MaybeFinished();
  // --- batch commands (queue_batch.cc) ---
  Status StartBatch();
  void IssueBatch(IoCommand command, std::vector<std::byte> elements, uint16_t count);
  void IssueBatchFetch();
  void OnBatchComplete(uring::CommandId id, int32_t res, uint32_t flags);
  void OnFetchedTags(int32_t res, uint32_t flags);
  // A served request's result, committed with the others of this batch of
  // completions (FlushCommits, deferred to the end of the ring's dispatch).
  void QueueCommit(uint16_t tag, int32_t result);
  void FlushCommits();
  // One element of a PREP or COMMIT list, appended to `out`.
  void AppendElement(std::vector<std::byte>& out, uint16_t tag, int32_t result);
  // The fetch's provided buffer `bid`, and handing it (back) to the kernel.
  std::byte* FetchBuffer(uint16_t bid);
  void ReturnFetchBuffer(uint16_t bid);
  // Every tag waiting in the kernel (kFetching) becomes `to` and stops
  // counting as pending: the fetch is gone, or the PREP failed.
  void DropWaitingTags(TagState to);
  std::span<std::byte> Buffer(uint16_t tag) {
    return {buffers_ + size_t{tag} * config_.buffer_bytes, config_.buffer_bytes};
  }

  const QueueConfig config_;
  LoopThread* const loop_;
  ImageHost* const host_;
  std::function<void()> on_finished_;
  std::function<void(Status)> on_error_;

  const ublksrv_io_desc* descriptors_ = nullptr;
  size_t descriptors_bytes_ = 0;
  std::byte* buffers_ = nullptr;
  size_t buffers_bytes_ = 0;

  std::vector<TagState> state_;
  size_t pending_ = 0;  // tags in kFetching or kServing
  size_t serving_ = 0;  // tags in kServing
  bool started_ = false;
  bool handover_ = false;        // BeginHandover() came
  bool handover_ended_ = false;  // EndHandover() came
  uint64_t left_ = 0;            // requests left to the next daemon
  uint64_t not_aborted_ = 0;     // fetches pending when a handover finished
  bool finished_ = false;
  uint64_t requests_ = 0;
  uint64_t served_here_ = 0;
  uint64_t zero_copied_ = 0;

  // Batch commands: element lists the kernel reads when the command runs
  // (kept until its completion, by sequence number), the next commit's, and
  // the fetch's provided-buffer ring.
  std::map<uint16_t, std::vector<std::byte>> batch_lists_;
  uint16_t batch_seq_ = 0;
  std::vector<std::byte> commit_next_;
  uint16_t commit_count_ = 0;
  bool commit_scheduled_ = false;
  bool fetch_ended_ = false;    // the kernel aborted the fetch: the device stops
  void* fetch_ring_ = nullptr;  // io_uring_buf_ring, then the buffers
  size_t fetch_ring_bytes_ = 0;
};

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_QUEUE_H_
