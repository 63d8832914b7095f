// SecretBytes: key material (a passphrase, a derived key, a master key) held
// in memory that is wiped when it goes away.
//
// The bytes live in one heap block of their own, never copied implicitly
// (move-only), and are overwritten with OPENSSL_cleanse (which the compiler
// may not optimise away) on destruction and on move-assignment. Lock() asks
// the kernel to keep the block out of swap (mlock); a daemon that holds a
// master key for hours calls it. Nothing here ever formats the bytes into a
// message.
//
// Thread model: a plain value; const access from several threads is safe.
#ifndef UBLK_QCOW2_QCOW2_CRYPTO_SECRET_H_
#define UBLK_QCOW2_QCOW2_CRYPTO_SECRET_H_

#include <cstddef>
#include <memory>
#include <span>
#include <string_view>

namespace uq::qcow2::crypto {

class SecretBytes {
 public:
  SecretBytes() = default;
  // `size` zero bytes.
  explicit SecretBytes(size_t size);
  // A copy of `bytes` (the caller wipes its own copy).
  explicit SecretBytes(std::span<const std::byte> bytes);
  static SecretBytes FromString(std::string_view text);
  ~SecretBytes();
  SecretBytes(SecretBytes&& other) noexcept;
  SecretBytes& operator=(SecretBytes&& other) noexcept;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  const unsigned char* uchar() const { return reinterpret_cast<const unsigned char*>(data()); }
  unsigned char* uchar() { return reinterpret_cast<unsigned char*>(data()); }
  std::span<std::byte> span() { return {data_.get(), size_}; }
  std::span<const std::byte> span() const { return {data_.get(), size_}; }
  // A copy (explicit, so that copies are visible in the code).
  SecretBytes Clone() const { return SecretBytes(span()); }

  // Keeps the bytes out of swap (mlock). Best effort: returns false when the
  // kernel refuses (RLIMIT_MEMLOCK), and the bytes stay usable.
  bool Lock();

 private:
  void Wipe();

  std::unique_ptr<std::byte[]> data_;
  size_t size_ = 0;
  bool locked_ = false;
};

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_SECRET_H_
