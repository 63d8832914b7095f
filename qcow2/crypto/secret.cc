#include "qcow2/crypto/secret.h"

#include <openssl/crypto.h>
#include <sys/mman.h>

#include <cstring>

namespace uq::qcow2::crypto {

SecretBytes::SecretBytes(size_t size) : size_(size) {
  if (size_ > 0) data_ = std::make_unique<std::byte[]>(size_);  // value-initialised: zeros
}

SecretBytes::SecretBytes(std::span<const std::byte> bytes) : SecretBytes(bytes.size()) {
  if (!bytes.empty()) std::memcpy(data_.get(), bytes.data(), bytes.size());
}

SecretBytes SecretBytes::FromString(std::string_view text) {
  return SecretBytes(std::as_bytes(std::span<const char>(text.data(), text.size())));
}

SecretBytes::~SecretBytes() { Wipe(); }

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : data_(std::move(other.data_)), size_(other.size_), locked_(other.locked_) {
  other.size_ = 0;
  other.locked_ = false;
}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    Wipe();
    data_ = std::move(other.data_);
    size_ = other.size_;
    locked_ = other.locked_;
    other.size_ = 0;
    other.locked_ = false;
  }
  return *this;
}

bool SecretBytes::Lock() {
  if (size_ == 0 || locked_) return true;
  locked_ = mlock(data_.get(), size_) == 0;
  return locked_;
}

void SecretBytes::Wipe() {
  if (data_ != nullptr && size_ > 0) {
    OPENSSL_cleanse(data_.get(), size_);
    if (locked_) munlock(data_.get(), size_);
  }
  data_.reset();
  size_ = 0;
  locked_ = false;
}

}  // namespace uq::qcow2::crypto
