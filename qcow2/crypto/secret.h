// SecretBytes: key material (a passphrase, a derived key, a master key) held
// in memory that is wiped when it goes away.
//
// The bytes live in one block of their own, never copied implicitly
// (move-only), and are overwritten with OPENSSL_cleanse (which the compiler
// may not optimise away) on destruction, on move-assignment and on Clear().
// Lock() moves them into pages of their own that the kernel keeps out of
// swap (mlock) and out of core dumps (MADV_DONTDUMP); a daemon that holds a
// master key for hours has its keys locked (LuksVolume::Unlock does it). The
// pages are private to the block, so unlocking one secret never unlocks
// another that shared a page. Nothing here ever formats the bytes into a
// message.
//
// Thread model: a plain value; const access from several threads is safe.
// LockFailed() is process-wide and may be read from any thread.
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
  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  const unsigned char* uchar() const { return reinterpret_cast<const unsigned char*>(data()); }
  unsigned char* uchar() { return reinterpret_cast<unsigned char*>(data()); }
  std::span<std::byte> span() { return {data_, size_}; }
  std::span<const std::byte> span() const { return {data_, size_}; }
  // A copy (explicit, so that copies are visible in the code); not locked.
  SecretBytes Clone() const { return SecretBytes(span()); }

  // Moves the bytes into locked pages (see the file comment). Best effort:
  // returns false when the kernel refuses (RLIMIT_MEMLOCK, or no memory for
  // the pages); the bytes stay usable where they were, and LockFailed()
  // turns true for the process.
  bool Lock();
  bool locked() const { return mapped_ != 0; }

  // Wipes the bytes now and leaves an empty value (the passphrase, once the
  // image is open).
  void Clear() { Wipe(); }

 private:
  void Wipe();

  std::unique_ptr<std::byte[]> heap_;  // the bytes until Lock()
  std::byte* data_ = nullptr;          // heap_ or the locked pages
  size_t size_ = 0;
  size_t mapped_ = 0;  // length of the locked pages; 0: on the heap
};

// Whether any SecretBytes::Lock() of this process has failed: the daemon
// logs one warning (no key material in it) and serves on.
bool LockFailed();

}  // namespace uq::qcow2::crypto

#endif  // UBLK_QCOW2_QCOW2_CRYPTO_SECRET_H_
