#include "qcow2/crypto/secret.h"

#include <openssl/crypto.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

namespace uq::qcow2::crypto {
namespace {

std::atomic<bool> lock_failed{false};

}  // namespace

bool LockFailed() { return lock_failed.load(std::memory_order_relaxed); }

SecretBytes::SecretBytes(size_t size) : size_(size) {
  if (size_ > 0) {
    heap_ = std::make_unique<std::byte[]>(size_);  // value-initialised: zeros
    data_ = heap_.get();
  }
}

SecretBytes::SecretBytes(std::span<const std::byte> bytes) : SecretBytes(bytes.size()) {
  if (!bytes.empty()) std::memcpy(data_, bytes.data(), bytes.size());
}

SecretBytes SecretBytes::FromString(std::string_view text) {
  return SecretBytes(std::as_bytes(std::span<const char>(text.data(), text.size())));
}

SecretBytes::~SecretBytes() { Wipe(); }

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : heap_(std::move(other.heap_)),
      data_(other.data_),
      size_(other.size_),
      mapped_(other.mapped_) {
  other.data_ = nullptr;
  other.size_ = 0;
  other.mapped_ = 0;
}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    Wipe();
    heap_ = std::move(other.heap_);
    data_ = other.data_;
    size_ = other.size_;
    mapped_ = other.mapped_;
    other.data_ = nullptr;
    other.size_ = 0;
    other.mapped_ = 0;
  }
  return *this;
}

bool SecretBytes::Lock() {
  if (size_ == 0 || mapped_ != 0) return true;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t length = (size_ + page - 1) / page * page;
  void* pages = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (pages == MAP_FAILED) {
    lock_failed.store(true, std::memory_order_relaxed);
    return false;
  }
  if (::mlock(pages, length) != 0) {
    ::munmap(pages, length);
    lock_failed.store(true, std::memory_order_relaxed);
    return false;
  }
  (void)::madvise(pages, length, MADV_DONTDUMP);  // best effort: not in core dumps
  std::memcpy(pages, data_, size_);
  OPENSSL_cleanse(data_, size_);
  heap_.reset();
  data_ = static_cast<std::byte*>(pages);
  mapped_ = length;
  return true;
}

void SecretBytes::Wipe() {
  if (data_ != nullptr && size_ > 0) OPENSSL_cleanse(data_, size_);
  if (mapped_ != 0) {
    ::munlock(data_, mapped_);
    ::munmap(data_, mapped_);
  }
  heap_.reset();
  data_ = nullptr;
  size_ = 0;
  mapped_ = 0;
}

}  // namespace uq::qcow2::crypto
