// Qcow2Image's operations for the chain verbs: renaming the backing file
// (rebase) and emptying an overlay (commit).
#include "qcow2/backing_link.h"
#include "qcow2/qcow2_image.h"

namespace uq::qcow2 {

Task<Status> Qcow2Image::SetBackingFile(const std::string& name,
                                        const std::optional<std::string>& format) {
  if (!writable_) co_return Status::InvalidArgument(path() + ": image is read-only");
  CO_ASSIGN_OR_RETURN(Header updated, WithBackingFile(header_, name, format));
  auto lock = co_await meta_mutex_.Acquire();
  // The clusters a safe rebase copied in must be on disk, with the metadata
  // naming them, before the header stops reading them from the old backing
  // file: a crash in between then leaves the old link and the copies (which
  // read the same), or the new link.
  CO_RETURN_IF_ERROR(co_await FlushLocked());
  CO_RETURN_IF_ERROR(co_await WriteHeader(*file_, updated));
  CO_RETURN_IF_ERROR(co_await file_->Sync());
  header_ = std::move(updated);
  co_return Status::Ok();
}

Task<Status> Qcow2Image::Unallocate(uint64_t offset, uint64_t length) {
  co_return co_await DiscardWholeClusters(offset, length, /*unallocate=*/true);
}

}  // namespace uq::qcow2
