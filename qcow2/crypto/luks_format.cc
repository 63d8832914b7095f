#include "qcow2/crypto/luks_format.h"

#include <fmt/format.h>
#include <openssl/rand.h>
#include <time.h>

#include <algorithm>
#include <cstring>

#include "qcow2/crypto/key_derivation.h"
#include "qcow2/crypto/secret.h"
#include "qcow2/crypto/sector_cipher.h"

namespace uq::qcow2::crypto {
namespace {

constexpr uint64_t kSlotAlignSectors = kLuksKeySlotAlign / kLuksSectorSize;

Status RandomBytes(std::span<std::byte> out) {
  if (RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(out.size())) != 1) {
    return Status::IoError("libcrypto: RAND_bytes failed");
  }
  return Status::Ok();
}

uint64_t SplitSectors(uint32_t key_bytes) {
  const uint64_t sectors =
      (uint64_t{key_bytes} * kLuksStripes + kLuksSectorSize - 1) / kLuksSectorSize;
  return (sectors + kSlotAlignSectors - 1) / kSlotAlignSectors * kSlotAlignSectors;
}

uint64_t SlotSector(uint32_t key_bytes, size_t slot) {
  return kSlotAlignSectors + SplitSectors(key_bytes) * slot;
}

uint64_t ThreadCpuNanos() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}

// A random (version 4) UUID in its 36-character text form.
Result<std::string> RandomUuid() {
  std::array<std::byte, 16> b{};
  RETURN_IF_ERROR(RandomBytes(b));
  b[6] = (b[6] & std::byte{0x0f}) | std::byte{0x40};
  b[8] = (b[8] & std::byte{0x3f}) | std::byte{0x80};
  std::string out;
  for (size_t i = 0; i < b.size(); i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    out += fmt::format("{:02x}", static_cast<unsigned>(b[i]));
  }
  return out;
}

// PBKDF2 iterations that take `ms` for an output of `length` bytes, given
// the one-block rate; at least QEMU's floor, at most what our reader opens.
uint32_t IterationsFor(uint64_t per_second_one_block, const EVP_MD* hash, size_t length,
                       uint64_t ms, uint64_t divisor) {
  const uint64_t block = static_cast<uint64_t>(EVP_MD_get_size(hash));
  const uint64_t blocks = (length + block - 1) / block;
  // per_second is at most a few hundred million and ms at most 2^32-ish in
  // practice; divide first where it cannot lose the count's magnitude.
  const long double n =
      static_cast<long double>(per_second_one_block) / blocks * ms / 1000 / divisor;
  if (n >= kMaxIterations) return kMaxIterations;
  return std::max<uint32_t>(kLuksMinIterations, static_cast<uint32_t>(n));
}

}  // namespace

uint64_t LuksAreaLength(uint32_t key_bytes) {
  return SlotSector(key_bytes, kLuksSlots) * kLuksSectorSize;
}

Result<Algorithms> LuksAlgorithms(const LuksFormatOptions& o) {
  const std::string ivgen_hash =
      o.ivgen_alg == "essiv" ? (o.ivgen_hash_alg.empty() ? "sha256" : o.ivgen_hash_alg) : "";
  Result<Algorithms> a =
      AlgorithmsFromOptions(o.cipher_alg, o.cipher_mode, o.ivgen_alg, ivgen_hash, o.hash_alg);
  if (a.ok()) {
    // QEMU 7.2 encrypts a slot's split key (key_bytes * 4000) in 512-byte
    // sectors and asserts it is whole ones: a 24-byte key (a 192-bit cipher
    // outside XTS) has 96000 bytes, so qemu-img create aborts on it, and
    // qemu-img and qemu-io abort opening such an image with its key. We make
    // no image QEMU cannot open.
    if (uint64_t{a->key_bytes} * kLuksStripes % kLuksSectorSize != 0) {
      return Status::NotSupported(fmt::format(
          "cipher {} in {} mode is not supported: QEMU aborts on its {}-byte LUKS key "
          "({} stripes are not whole {}-byte sectors); use xts or a 128- or 256-bit key",
          a->cipher_alg, a->cipher_mode, a->key_bytes, kLuksStripes, kLuksSectorSize));
    }
    return a;
  }
  // The resolver words its errors for a header it read ("create: LUKS
  // header: ..."); here they are about options, and never corruption.
  const Status st = a.status();
  std::string message = st.message();
  constexpr std::string_view kPrefix = "create: LUKS header: ";
  if (message.starts_with(kPrefix)) message.erase(0, kPrefix.size());
  if (st.IsNotSupported()) return Status::NotSupported(std::move(message));
  return Status::InvalidArgument(std::move(message));
}

Result<uint64_t> Pbkdf2IterationsPerSecond(const EVP_MD* hash, uint64_t min_cpu_ms) {
  const std::array<std::byte, 8> password{};
  const std::array<std::byte, kLuksSaltSize> salt{};
  const size_t length = static_cast<size_t>(EVP_MD_get_size(hash));
  for (uint32_t iterations = 1u << 12;; iterations *= 2) {
    const uint64_t start = ThreadCpuNanos();
    RETURN_IF_ERROR(Pbkdf2(password, salt, iterations, hash, length).status());
    const uint64_t nanos = ThreadCpuNanos() - start;
    if (nanos >= min_cpu_ms * 1000000 || iterations >= (1u << 30)) {
      return uint64_t{iterations} * 1000000000 / std::max<uint64_t>(nanos, 1);
    }
  }
}

Result<LuksArea> FormatLuks(const LuksFormatOptions& o, std::span<const std::byte> passphrase) {
  LuksArea area;
  ASSIGN_OR_RETURN(area.algorithms, LuksAlgorithms(o));
  const Algorithms& a = area.algorithms;
  LuksHeader& h = area.header;
  h.cipher_name = a.cipher_name;
  h.cipher_mode = HeaderModeSpec(a);
  h.hash_spec = a.hash_alg;
  h.key_bytes = a.key_bytes;
  h.payload_offset = static_cast<uint32_t>(SlotSector(a.key_bytes, kLuksSlots));
  ASSIGN_OR_RETURN(h.uuid, RandomUuid());

  uint32_t slot_iterations = o.slot_iterations;
  uint32_t digest_iterations = o.digest_iterations;
  if (slot_iterations == 0 || digest_iterations == 0) {
    ASSIGN_OR_RETURN(uint64_t rate, Pbkdf2IterationsPerSecond(a.hash));
    if (slot_iterations == 0) {
      slot_iterations = IterationsFor(rate, a.hash, a.key_bytes, o.iter_time_ms, 1);
    }
    // An eighth for the digest, as QEMU (and cryptsetup) do it.
    if (digest_iterations == 0) {
      digest_iterations = IterationsFor(rate, a.hash, kLuksDigestSize, o.iter_time_ms, 8);
    }
  }

  SecretBytes master(a.key_bytes);
  RETURN_IF_ERROR(RandomBytes(master.span()));
  RETURN_IF_ERROR(RandomBytes(h.mk_digest_salt));
  h.mk_digest_iterations = digest_iterations;
  ASSIGN_OR_RETURN(SecretBytes digest, Pbkdf2(master.span(), h.mk_digest_salt, digest_iterations,
                                              a.hash, kLuksDigestSize));
  std::memcpy(h.mk_digest.data(), digest.data(), kLuksDigestSize);

  for (size_t i = 0; i < kLuksSlots; i++) {
    h.slots[i].active = false;
    h.slots[i].iterations = 0;
    h.slots[i].key_offset = static_cast<uint32_t>(SlotSector(a.key_bytes, i));
    h.slots[i].stripes = kLuksStripes;
  }
  LuksKeySlot& slot = h.slots[0];
  slot.active = true;
  slot.iterations = slot_iterations;
  RETURN_IF_ERROR(RandomBytes(slot.salt));

  // Slot 0: the master key split into stripes, encrypted under the key the
  // passphrase derives.
  ASSIGN_OR_RETURN(SecretBytes slot_key,
                   Pbkdf2(passphrase, slot.salt, slot.iterations, a.hash, a.key_bytes));
  ASSIGN_OR_RETURN(SecretBytes split, AfSplit(a.hash, master.span(), kLuksStripes));
  ASSIGN_OR_RETURN(SectorCipher cipher, SectorCipher::Create(a, slot_key.span()));
  RETURN_IF_ERROR(cipher.Encrypt(0, split.span()));

  area.bytes.assign(uint64_t{h.payload_offset} * kLuksSectorSize, std::byte{0});
  const std::vector<std::byte> header = SerializeLuksHeader(h);
  std::memcpy(area.bytes.data(), header.data(), header.size());
  std::memcpy(area.bytes.data() + uint64_t{slot.key_offset} * kLuksSectorSize, split.data(),
              split.size());
  return area;
}

}  // namespace uq::qcow2::crypto
