#include "tools/commit_copy.h"

#include <algorithm>

#include "base/aligned_buffer.h"

namespace uq::tools {
namespace {

using qcow2::RangeStatus;

constexpr uint64_t kPiece = uint64_t{1} << 20;

// What the layers above the base decide for the range from `offset`: which
// layer (nullptr: none, the base decides) and whether it reads as zeros;
// `length` is cut to the run that one answer covers.
struct Decision {
  qcow2::BlockDevice* layer = nullptr;
  bool zeros = false;
};

Task<Result<Decision>> Decide(std::span<qcow2::BlockDevice* const> above, uint64_t offset,
                              uint64_t& length) {
  for (size_t i = 0; i < above.size(); i++) {
    qcow2::BlockDevice* layer = above[i];
    if (offset >= layer->size()) co_return Decision{layer, true};  // short: zeros, allocated
    length = std::min(length, layer->size() - offset);
    CO_ASSIGN_OR_RETURN(RangeStatus s, co_await layer->BlockStatus(offset, length));
    length = std::min(length, s.length);
    if (s.kind != RangeStatus::Kind::kUnallocated) co_return Decision{layer, s.zero()};
  }
  co_return Decision{};
}

}  // namespace

Task<Status> CommitAbove(std::span<qcow2::BlockDevice* const> above, qcow2::BlockDevice& base,
                         const std::function<void(uint64_t, uint64_t)>& on_progress) {
  if (above.empty()) co_return Status::Ok();
  const uint64_t size = above[0]->size();
  AlignedBuffer buf(std::min(kPiece, std::max<uint64_t>(size, 1)));
  uint64_t n = 0;
  for (uint64_t offset = 0; offset < size; offset += n) {
    n = std::min(kPiece, size - offset);
    CO_ASSIGN_OR_RETURN(Decision d, co_await Decide(above, offset, n));
    if (d.layer != nullptr && d.zeros) {
      CO_RETURN_IF_ERROR(co_await base.WriteZeroes(offset, n));
    } else if (d.layer != nullptr) {
      CO_RETURN_IF_ERROR(co_await d.layer->Read(offset, buf.span().first(n)));
      CO_RETURN_IF_ERROR(co_await base.Write(offset, buf.span().first(n), false));
    }
    if (on_progress) on_progress(offset + n, size);
  }
  co_return Status::Ok();
}

}  // namespace uq::tools
