#include "tools/qcow2_copy.h"

#include <algorithm>

#include "base/aligned_buffer.h"
#include "base/wait_list.h"
#include "tools/zero_runs.h"

namespace uq::tools {
namespace {

struct State {
  qcow2::BlockDevice* source;
  qcow2::Qcow2Image* target;
  Qcow2CopyOptions options;
  uint64_t chunk;
  uint64_t cluster;
  uint64_t next = 0;
  uint64_t done = 0;
  int workers = 0;
  Status error;
  WaitList finished;
};

Task<Status> CopyChunk(State& s, uint64_t offset, std::span<std::byte> buf) {
  CO_RETURN_IF_ERROR(co_await s.source->Read(offset, buf));
  // Runs of whole clusters (the image's last one may be short) that hold
  // data are written; all-zero clusters stay holes.
  for (const ZeroRun& run : SplitZeroRuns(buf, s.cluster)) {
    if (run.zero) continue;
    if (!s.options.compress) {
      CO_RETURN_IF_ERROR(co_await s.target->Write(offset + run.offset,
                                                  buf.subspan(run.offset, run.length), false));
      continue;
    }
    for (uint64_t at = run.offset; at < run.offset + run.length; at += s.cluster) {
      const uint64_t n = std::min<uint64_t>(s.cluster, run.offset + run.length - at);
      CO_RETURN_IF_ERROR(co_await s.target->WriteCompressed(offset + at, buf.subspan(at, n)));
    }
  }
  co_return Status::Ok();
}

Task<void> Worker(State* s) {
  const uint64_t size = s->source->size();
  AlignedBuffer buf(std::min(s->chunk, size));
  while (s->error.ok() && s->next < size) {
    const uint64_t offset = s->next;
    const uint64_t length = std::min(s->chunk, size - offset);
    s->next += length;
    Result<uint64_t> zero = co_await s->source->ZeroPrefix(offset, size - offset);
    if (zero.ok() && *zero >= length) {
      // Skip the whole hole if nobody claimed past this chunk meanwhile
      // (whole clusters only, so chunks stay cluster-aligned).
      uint64_t skip = length;
      if (s->next == offset + length) {
        skip = std::max(length, std::min(*zero, size - offset) / s->cluster * s->cluster);
        s->next = offset + skip;
      }
      s->done += skip;
    } else {
      Status st = co_await CopyChunk(*s, offset, buf.span().first(length));
      if (!st.ok()) {
        if (s->error.ok()) s->error = std::move(st);
        break;
      }
      s->done += length;
    }
    if (s->options.on_progress) s->options.on_progress(std::min(s->done, size), size);
  }
  if (--s->workers == 0) s->finished.NotifyAll();
}

}  // namespace

Task<Status> CopyToQcow2(qcow2::BlockDevice& source, qcow2::Qcow2Image& target,
                         Qcow2CopyOptions options) {
  State s{&source, &target, std::move(options)};
  s.cluster = target.geometry().cluster_size;
  s.chunk = std::max<uint64_t>(s.cluster, 1 << 20) / s.cluster * s.cluster;
  const uint64_t chunks = (source.size() + s.chunk - 1) / s.chunk;
  s.workers = static_cast<int>(std::min<uint64_t>(std::clamp(s.options.parallel, 1, 256), chunks));
  if (s.workers == 0) co_return Status::Ok();
  const int n = s.workers;
  for (int i = 0; i < n; i++) Spawn(Worker(&s));
  while (s.workers > 0) co_await s.finished.Wait();
  co_return std::move(s.error);
}

}  // namespace uq::tools
