#include "base/status.h"

#include <cerrno>
#include <cstring>

namespace uq {

const std::string& Status::message() const {
  static const std::string kEmpty;
  return rep_ ? rep_->message : kEmpty;
}

std::string Status::ToString() const { return rep_ ? rep_->message : "OK"; }

Status Status::WithContext(std::string_view context) const {
  if (ok()) return Status();
  std::string message(context);
  message += ": ";
  message += rep_->message;
  return Status(rep_->code, rep_->err, std::move(message));
}

Status Status::FromErrno(int err, std::string_view what) {
  std::string message(what);
  message += ": ";
  message += std::strerror(err);
  if (err == ENOSPC || err == EDQUOT || err == EFBIG) return NoSpace(std::move(message), err);
  if (err == EAGAIN || err == EWOULDBLOCK || err == EBUSY) {
    return Status(Code::kBusy, err, std::move(message));
  }
  return IoError(std::move(message), err);
}

int Status::ToNegativeErrno() const {
  switch (code()) {
    case Code::kOk:
      return 0;
    case Code::kNoSpace:
      return -ENOSPC;
    case Code::kNotSupported:
      return -EOPNOTSUPP;
    case Code::kInvalidArgument:
      return -EINVAL;
    case Code::kBusy:
      return -EBUSY;
    default:
      return -EIO;
  }
}

}  // namespace uq
