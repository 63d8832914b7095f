// Status and Result<T>: how every fallible operation in ublk-qcow2 reports.
//
// A Status is a cheap value: OK is a null pointer, an error carries a code and
// a message that names the file and the field or offset involved, ready to be
// printed as the one line a user sees. Few codes, chosen by what the caller
// does about them:
//   kIoError          the host said no (errno kept in error_number())
//   kCorruption       the image contradicts the qcow2 spec; the driver marks
//                     the image corrupt and stops writing
//   kNotSupported     a valid image that uses something we do not implement
//   kInvalidArgument  the caller asked for something impossible
//   kNoSpace          host or format limits reached (ENOSPC, refcount overflow)
//   kBusy             the image is locked by another writer
//
// Result<T> holds either a T or a non-OK Status (C++20 has no std::expected).
// Errors are values, never exceptions: coroutines return them like functions.
#ifndef UBLK_QCOW2_BASE_STATUS_H_
#define UBLK_QCOW2_BASE_STATUS_H_

#include <cassert>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace uq {

enum class Code { kOk, kIoError, kCorruption, kNotSupported, kInvalidArgument, kNoSpace, kBusy };

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(const Status& other) : rep_(other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr) {}
  Status& operator=(const Status& other) {
    rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status Ok() { return Status(); }
  // `err` is a positive errno value.
  static Status IoError(std::string message, int err = 0) {
    return Status(Code::kIoError, err, std::move(message));
  }
  static Status Corruption(std::string message) {
    return Status(Code::kCorruption, 0, std::move(message));
  }
  static Status NotSupported(std::string message) {
    return Status(Code::kNotSupported, 0, std::move(message));
  }
  static Status InvalidArgument(std::string message) {
    return Status(Code::kInvalidArgument, 0, std::move(message));
  }
  static Status NoSpace(std::string message, int err = 0) {
    return Status(Code::kNoSpace, err, std::move(message));
  }
  static Status Busy(std::string message) { return Status(Code::kBusy, 0, std::move(message)); }
  // An IoError, NoSpace or Busy chosen by errno, message "<what>: <strerror>".
  static Status FromErrno(int err, std::string_view what);

  bool ok() const { return rep_ == nullptr; }
  Code code() const { return rep_ ? rep_->code : Code::kOk; }
  bool IsCorruption() const { return code() == Code::kCorruption; }
  bool IsNotSupported() const { return code() == Code::kNotSupported; }
  bool IsInvalidArgument() const { return code() == Code::kInvalidArgument; }
  bool IsIoError() const { return code() == Code::kIoError; }
  bool IsNoSpace() const { return code() == Code::kNoSpace; }
  bool IsBusy() const { return code() == Code::kBusy; }
  // The errno behind an IoError/NoSpace, or 0.
  int error_number() const { return rep_ ? rep_->err : 0; }
  // The bare message ("" when OK).
  const std::string& message() const;
  // "OK" or the message; what the CLI prints after "ublk-qcow2: ".
  std::string ToString() const;
  // The same error with "<context>: " in front of the message. OK stays OK.
  Status WithContext(std::string_view context) const;
  // A negative errno for the kernel: -EIO unless the error carries its own.
  int ToNegativeErrno() const;

 private:
  struct Rep {
    Code code;
    int err;
    std::string message;
  };
  Status(Code code, int err, std::string message)
      : rep_(std::make_unique<Rep>(Rep{code, err, std::move(message)})) {}
  std::unique_ptr<Rep> rep_;
};

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  // REQUIRES: !status.ok()
  Result(Status status) : v_(std::in_place_index<1>, std::move(status)) {  // NOLINT
    assert(!std::get<1>(v_).ok());
  }

  bool ok() const { return v_.index() == 0; }
  Status status() const { return ok() ? Status::Ok() : std::get<1>(v_); }
  // REQUIRES: ok()
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  // Moves the error out. REQUIRES: !ok()
  Status TakeStatus() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Status> v_;
};

namespace internal {
inline Status AsStatus(Status s) { return s; }
template <class T>
Status AsStatus(Result<T>&& r) {
  return r.ok() ? Status::Ok() : std::move(r).TakeStatus();
}
}  // namespace internal

}  // namespace uq

#define UQ_CONCAT_INNER(a, b) a##b
#define UQ_CONCAT(a, b) UQ_CONCAT_INNER(a, b)

// Returns (or co_returns) the error of `expr`, a Status or Result, if it failed.
#define RETURN_IF_ERROR(expr)                                   \
  do {                                                          \
    ::uq::Status uq_status_ = ::uq::internal::AsStatus((expr)); \
    if (!uq_status_.ok()) return uq_status_;                    \
  } while (0)
#define CO_RETURN_IF_ERROR(expr)                                \
  do {                                                          \
    ::uq::Status uq_status_ = ::uq::internal::AsStatus((expr)); \
    if (!uq_status_.ok()) co_return uq_status_;                 \
  } while (0)

// `lhs` = the value of `rexpr` (a Result), or return its error.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  UQ_ASSIGN_OR_RETURN_IMPL(UQ_CONCAT(uq_result_, __LINE__), lhs, rexpr, return )
#define CO_ASSIGN_OR_RETURN(lhs, rexpr) \
  UQ_ASSIGN_OR_RETURN_IMPL(UQ_CONCAT(uq_result_, __LINE__), lhs, rexpr, co_return )
#define UQ_ASSIGN_OR_RETURN_IMPL(tmp, lhs, rexpr, ret) \
  auto tmp = (rexpr);                                  \
  if (!tmp.ok()) ret std::move(tmp).TakeStatus();      \
  lhs = std::move(tmp).value()

#endif  // UBLK_QCOW2_BASE_STATUS_H_
