#include "tools/image_copy.h"

#include <algorithm>
#include <span>
#include <utility>

#include "base/aligned_buffer.h"
#include "base/wait_list.h"
#include "tools/zero_runs.h"

namespace uq::tools {
namespace {

// Shared by the workers of one copy; lives in CopyToFile's frame, which
// outlives them (it waits until the last one is done).
struct CopyState {
  qcow2::BlockDevice* source = nullptr;
  qcow2::File* target = nullptr;
  CopyOptions options;
  uint64_t next_offset = 0;  // the next chunk nobody has taken
  uint64_t bytes_done = 0;
  int active_workers = 0;
  int in_flight = 0;
  Status error;  // the first failure
  CopyStats stats;
  WaitList all_done;
};

Task<Status> CopyChunk(CopyState& state, uint64_t offset, std::span<std::byte> buffer) {
  CO_RETURN_IF_ERROR(co_await state.source->Read(offset, buffer));
  for (const ZeroRun& run : SplitZeroRuns(buffer, state.options.sparse_block)) {
    if (run.zero) {
      if (!state.options.target_zeroed) {
        CO_RETURN_IF_ERROR(co_await state.target->Zero(offset + run.offset, run.length));
      }
      state.stats.bytes_zero += run.length;
    } else {
      CO_RETURN_IF_ERROR(co_await state.target->Write(offset + run.offset,
                                                      buffer.subspan(run.offset, run.length)));
      state.stats.bytes_written += run.length;
    }
  }
  co_return Status::Ok();
}

Task<void> CopyWorker(CopyState* state) {
  const uint64_t size = state->stats.bytes_total;
  AlignedBuffer buffer(std::min(state->options.chunk_size, size));
  while (state->error.ok() && state->next_offset < size) {
    const uint64_t offset = state->next_offset;
    const uint64_t length = std::min(state->options.chunk_size, size - offset);
    state->next_offset += length;
    // Holes the image knows about are skipped without reading them: a 1 TiB
    // image with a few clusters of data copies in milliseconds.
    Result<uint64_t> zero = co_await state->source->ZeroPrefix(offset, size - offset);
    if (zero.ok() && *zero >= length && state->options.target_zeroed) {
      uint64_t skip = *zero;
      // Nobody claimed past our chunk meanwhile: take the whole hole.
      if (state->next_offset == offset + length)
        state->next_offset = offset + skip;
      else
        skip = length;
      state->stats.bytes_zero += skip;
      state->bytes_done += skip;
      if (state->options.on_progress) state->options.on_progress(state->bytes_done, size);
      continue;
    }
    state->stats.max_in_flight = std::max(state->stats.max_in_flight, ++state->in_flight);
    Status status = co_await CopyChunk(*state, offset, buffer.span().first(length));
    --state->in_flight;
    if (!status.ok()) {
      if (state->error.ok()) state->error = std::move(status);
      break;
    }
    state->bytes_done += length;
    if (state->options.on_progress) state->options.on_progress(state->bytes_done, size);
  }
  // Last touch of the shared state: waking CopyToFile may end the copy, and
  // its frame with `state`, before NotifyAll() returns here.
  if (--state->active_workers == 0) state->all_done.NotifyAll();
}

}  // namespace

Task<Result<CopyStats>> CopyToFile(qcow2::BlockDevice& source, qcow2::File& target,
                                   CopyOptions options) {
  CopyState state;
  state.source = &source;
  state.target = &target;
  state.options = std::move(options);
  state.options.parallel = std::clamp(state.options.parallel, 1, 256);
  state.stats.bytes_total = source.size();

  const uint64_t chunk = state.options.chunk_size;
  const uint64_t chunks = (state.stats.bytes_total + chunk - 1) / chunk;
  const int workers = static_cast<int>(std::min<uint64_t>(state.options.parallel, chunks));
  state.active_workers = workers;
  // Each worker runs until its first suspension; with a synchronous Env the
  // first one does the whole copy before the others start (and find nothing).
  for (int i = 0; i < workers; ++i) Spawn(CopyWorker(&state));
  while (state.active_workers > 0) co_await state.all_done.Wait();

  if (!state.error.ok()) co_return std::move(state.error);
  if (state.options.sync) CO_RETURN_IF_ERROR(co_await target.Sync());
  co_return state.stats;
}

}  // namespace uq::tools
