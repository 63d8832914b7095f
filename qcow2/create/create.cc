#include "qcow2/create/create.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/endian.h"
#include "qcow2/block_device.h"
#include "qcow2/create/option_list.h"
#include "qcow2/crypto/luks_format.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/open_image.h"
#include "qcow2/paths.h"

namespace uq::qcow2 {
namespace {

constexpr char kTooLarge[] =
    "The image size is too large for file format 'qcow2' (try using a larger "
    "cluster size)";
constexpr uint64_t kMinClusterSize = uint64_t{1} << kMinClusterBits;
constexpr uint64_t kMaxClusterSize = uint64_t{1} << kMaxClusterBits;
// Largest write issued at once: tables are written in chunks of this size.
constexpr uint64_t kChunkBytes = 4ull << 20;

uint64_t DivRoundUp(uint64_t n, uint64_t d) { return n / d + (n % d != 0); }

// --- Parsing -------------------------------------------------------------

Status BadValue(std::string_view key, std::string_view value) {
  return Status::InvalidArgument(
      fmt::format("Parameter '{}' does not accept value '{}'", key, value));
}

// QEMU's names (its QAPI enums) for the encrypt.* values; a value outside
// them is refused as QEMU refuses it, one it has but we cannot make later,
// as NotSupported (LuksAlgorithms). No "sm4": Debian 12's qemu-img (7.2)
// refuses it as a value it does not know.
constexpr std::string_view kCipherAlgs[] = {
    "aes-128",     "aes-192",     "aes-256",     "des",         "3des",        "cast5-128",
    "serpent-128", "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256"};
constexpr std::string_view kCipherModes[] = {"ecb", "cbc", "xts", "ctr"};
constexpr std::string_view kIvGens[] = {"plain", "plain64", "essiv"};
constexpr std::string_view kHashes[] = {"md5",    "sha1",   "sha224",   "sha256",
                                        "sha384", "sha512", "ripemd160"};

template <size_t N>
Status CheckEnum(std::string_view key, const std::string& value,
                 const std::string_view (&names)[N]) {
  for (std::string_view n : names) {
    if (value == n) return Status::Ok();
  }
  // QEMU names the key without its "encrypt." prefix here.
  return BadValue(key.substr(key.find('.') + 1), value);
}

constexpr char kAliasClash[] =
    "'encrypt.format' and its alias 'encryption' can't be used at the same time";

Status ApplyEncryptOption(std::string_view key, const std::string& value, CreateOptions& o) {
  EncryptOptions& e = o.encrypt ? *o.encrypt : o.encrypt.emplace();
  crypto::LuksFormatOptions& l = e.luks;
  if (key == "encryption") {
    // QEMU's old spelling of encrypt.format=aes (legacy AES-CBC).
    Result<bool> v = ParseOptionBool(key, value);
    if (!v.ok()) return v.status();
    if (e.given.contains("encrypt.format")) return Status::InvalidArgument(kAliasClash);
    e.from_alias = true;
    e.format = *v ? "aes" : "";
  } else if (key == "encrypt.format") {
    if (e.from_alias) return Status::InvalidArgument(kAliasClash);
    if (value != "luks" && value != "aes") return BadValue("format", value);
    e.format = value;
  } else if (key == "encrypt.key-secret") {
    e.key_secret = value;
  } else if (key == "encrypt.cipher-alg") {
    RETURN_IF_ERROR(CheckEnum(key, value, kCipherAlgs));
    l.cipher_alg = value;
  } else if (key == "encrypt.cipher-mode") {
    RETURN_IF_ERROR(CheckEnum(key, value, kCipherModes));
    l.cipher_mode = value;
  } else if (key == "encrypt.ivgen-alg") {
    RETURN_IF_ERROR(CheckEnum(key, value, kIvGens));
    l.ivgen_alg = value;
  } else if (key == "encrypt.ivgen-hash-alg") {
    RETURN_IF_ERROR(CheckEnum(key, value, kHashes));
    l.ivgen_hash_alg = value;
  } else if (key == "encrypt.hash-alg") {
    RETURN_IF_ERROR(CheckEnum(key, value, kHashes));
    l.hash_alg = value;
  } else if (key == "encrypt.iter-time") {
    Result<uint64_t> v = ParseOptionNumber(key, value);
    if (!v.ok()) return v.status();
    l.iter_time_ms = *v;
  } else {
    return Status::InvalidArgument(fmt::format("Invalid parameter '{}'", key));
  }
  e.given[std::string(key)] = value;
  return Status::Ok();
}

Status ApplyOption(std::string_view key, const std::string& value, CreateOptions& o) {
  if (key == "size") {
    Result<uint64_t> v = ParseOptionSize(key, value);
    if (!v.ok()) return v.status();
    o.size = *v;
  } else if (key == "compat") {
    if (value == "0.10" || value == "v2") {
      o.compat = "0.10";
    } else if (value == "1.1" || value == "v3") {
      o.compat = "1.1";
    } else {
      return Status::InvalidArgument(fmt::format("Invalid compatibility level: '{}'", value));
    }
  } else if (key == "cluster_size") {
    Result<uint64_t> v = ParseOptionSize(key, value);
    if (!v.ok()) return v.status();
    // Out-of-range values are rejected by validation; keep them recognisable.
    o.cluster_size = *v > UINT32_MAX ? 0 : static_cast<uint32_t>(*v);
  } else if (key == "refcount_bits") {
    Result<uint64_t> v = ParseOptionNumber(key, value);
    if (!v.ok()) return v.status();
    o.refcount_bits = *v > UINT32_MAX ? 0 : static_cast<uint32_t>(*v);
  } else if (key == "extended_l2") {
    Result<bool> v = ParseOptionBool(key, value);
    if (!v.ok()) return v.status();
    o.extended_l2 = *v;
  } else if (key == "compression_type") {
    if (value != "zlib" && value != "zstd") return BadValue(key, value);
    o.compression_type = value;
  } else if (key == "lazy_refcounts") {
    Result<bool> v = ParseOptionBool(key, value);
    if (!v.ok()) return v.status();
    o.lazy_refcounts = *v;
  } else if (key == "data_file") {
    if (value.empty()) {
      return Status::InvalidArgument("Expected data file name, got empty string");
    }
    o.data_file = value;
  } else if (key == "data_file_raw") {
    Result<bool> v = ParseOptionBool(key, value);
    if (!v.ok()) return v.status();
    o.data_file_raw = *v;
  } else if (key == "preallocation") {
    if (value == "off") {
      o.preallocation = CreateOptions::Preallocation::kOff;
    } else if (value == "metadata") {
      o.preallocation = CreateOptions::Preallocation::kMetadata;
    } else if (value == "falloc" || value == "full") {
      return Status::NotSupported(
          fmt::format("preallocation mode '{}' is not supported (only off and "
                      "metadata are)",
                      value));
    } else {
      return BadValue(key, value);
    }
  } else if (key == "backing_file") {
    if (value.empty()) {
      return Status::InvalidArgument("Expected backing file name, got empty string");
    }
    o.backing_file = value;
  } else if (key == "backing_fmt") {
    if (value.empty()) return BadValue(key, value);
    o.backing_format = value;
  } else if (key == "nocow") {
    // Accepted when off; btrfs NOCOW is not implemented.
    Result<bool> v = ParseOptionBool(key, value);
    if (!v.ok()) return v.status();
    if (*v) return Status::NotSupported("option 'nocow' is not supported");
  } else if (key == "encryption" || key.starts_with("encrypt.")) {
    return ApplyEncryptOption(key, value, o);
  } else {
    return Status::InvalidArgument(fmt::format("Invalid parameter '{}'", key));
  }
  return Status::Ok();
}

// --- Layout ----------------------------------------------------------------

// Where everything goes. Offsets are in bytes.
struct Layout {
  uint64_t cluster_size = 0;
  uint32_t cluster_bits = 0;
  uint64_t l2_entries = 0;      // entries per L2 table
  uint32_t l2_entry_bytes = 8;  // 16 with extended L2
  uint64_t guest_clusters = 0;
  uint64_t l1_size = 0;  // entries
  uint64_t l1_offset = 0;
  uint64_t l1_clusters = 0;
  uint64_t rt_offset = 0;
  uint64_t rt_clusters = 0;
  uint64_t rb_count = 0;  // refcount blocks
  uint64_t refcounts_per_block = 0;
  uint64_t first_rb_offset = 0;  // block 0
  uint64_t extra_rb_offset = 0;  // blocks 1.. (contiguous, at the end)
  bool preallocate = false;
  bool data_in_image = false;    // preallocated data clusters live in the image
  uint64_t prealloc_offset = 0;  // first L2 table
  uint64_t luks_offset = 0;      // the LUKS area (encrypted images)
  uint64_t luks_bytes = 0;
  uint64_t luks_clusters = 0;
  uint64_t total_clusters = 0;
  uint64_t file_size = 0;

  uint64_t RefblockOffset(uint64_t i) const {
    return i == 0 ? first_rb_offset : extra_rb_offset + (i - 1) * cluster_size;
  }
  // L2 table t, followed by its data clusters when they live in the image.
  uint64_t L2Offset(uint64_t t) const {
    uint64_t stride = data_in_image ? (1 + l2_entries) * cluster_size : cluster_size;
    return prealloc_offset + t * stride;
  }
  // The host offset guest cluster g maps to (preallocation only).
  uint64_t DataOffset(uint64_t g) const {
    // With an external data file the mapping is 1:1.
    if (!data_in_image) return g * cluster_size;
    return L2Offset(g / l2_entries) + (1 + g % l2_entries) * cluster_size;
  }
};

Result<Layout> PlanLayout(uint64_t size, uint32_t cluster_size, uint32_t refcount_order,
                          bool extended_l2, bool preallocate, bool external_data,
                          uint64_t luks_bytes) {
  Layout l;
  l.cluster_size = cluster_size;
  l.cluster_bits = static_cast<uint32_t>(std::countr_zero(cluster_size));
  l.l2_entry_bytes = extended_l2 ? 16 : 8;
  l.l2_entries = cluster_size / l.l2_entry_bytes;
  l.guest_clusters = DivRoundUp(size, cluster_size);
  l.l1_size = DivRoundUp(l.guest_clusters, l.l2_entries);
  if (l.l1_size > kMaxL1Bytes / 8) return Status::InvalidArgument(kTooLarge);
  l.l1_clusters = DivRoundUp(l.l1_size * 8, cluster_size);
  l.preallocate = preallocate;
  l.data_in_image = preallocate && !external_data;
  l.refcounts_per_block = uint64_t{cluster_size} * 8 >> refcount_order;

  // Everything but the refcount structures: header, L1, L2 tables, data.
  uint64_t fixed = 1 + l.l1_clusters;
  if (preallocate) {
    fixed += l.l1_size + (l.data_in_image ? l.guest_clusters : 0);
  }
  l.luks_bytes = luks_bytes;
  l.luks_clusters = DivRoundUp(luks_bytes, cluster_size);
  fixed += l.luks_clusters;
  // The refcount blocks must count every cluster, themselves and the table
  // included: iterate to the fixed point (the counts only grow).
  uint64_t rt = 1, rb = 1;
  while (true) {
    uint64_t n = fixed + rt + rb;
    uint64_t new_rb = DivRoundUp(n, l.refcounts_per_block);
    uint64_t new_rt = std::max<uint64_t>(1, DivRoundUp(new_rb * 8, cluster_size));
    if (new_rb == rb && new_rt == rt) break;
    rb = new_rb;
    rt = new_rt;
    if (rt * cluster_size > kMaxRefcountTableBytes) {
      return Status::InvalidArgument(kTooLarge);
    }
  }
  l.rt_clusters = rt;
  l.rb_count = rb;
  l.total_clusters = fixed + rt + rb;

  const uint64_t cs = cluster_size;
  l.rt_offset = cs;
  l.first_rb_offset = (1 + rt) * cs;
  uint64_t next = l.first_rb_offset + cs;
  if (l.l1_size > 0) {
    l.l1_offset = next;
    next += l.l1_clusters * cs;
  }
  l.prealloc_offset = next;
  if (preallocate) {
    next += l.l1_size * cs + (l.data_in_image ? l.guest_clusters * cs : 0);
  }
  // QEMU sets up encryption after sizing the image: the LUKS area takes the
  // first free clusters after the L1 table and the preallocated ones.
  l.luks_offset = next;
  next += l.luks_clusters * cs;
  l.extra_rb_offset = next;
  next += (rb - 1) * cs;
  // QEMU writes the L1 table as l1_size * 8 bytes; when nothing follows it
  // the file ends there, not at a cluster boundary.
  if (l.l1_size > 0 && !preallocate && rb == 1 && l.luks_clusters == 0) {
    l.file_size = l.l1_offset + l.l1_size * 8;
  } else {
    l.file_size = next;
  }
  return l;
}

// Sets refcount 1 for entries [first, first + count) of a refcount block.
// Sub-byte widths store entry 0 in the least significant bits of byte 0.
void SetRefcountsToOne(std::span<std::byte> block, uint32_t order, uint64_t first, uint64_t count) {
  const uint32_t bits = 1u << order;
  for (uint64_t e = first; e < first + count; e++) {
    if (bits >= 8) {
      block[(e + 1) * (bits / 8) - 1] = std::byte{1};
    } else {
      uint64_t bit = e * bits;
      block[bit / 8] |= std::byte{static_cast<unsigned char>(1u << (bit % 8))};
    }
  }
}

// Writes a run of consecutive clusters whose contents `fill` produces, one
// chunk of up to kChunkBytes at a time. fill(index, span) fills cluster
// `first + index` (span is cluster-sized and zeroed).
template <class Fill>
Task<Status> WriteClusters(File& file, uint64_t offset, uint64_t count, uint64_t cs, Fill fill) {
  if (count == 0) co_return Status::Ok();
  const uint64_t per_chunk = std::max<uint64_t>(1, std::min(count, kChunkBytes / cs));
  AlignedBuffer buf(per_chunk * cs);
  for (uint64_t done = 0; done < count;) {
    uint64_t n = std::min(per_chunk, count - done);
    std::memset(buf.data(), 0, n * cs);
    for (uint64_t i = 0; i < n; i++) {
      fill(done + i, buf.span().subspan(i * cs, cs));
    }
    CO_RETURN_IF_ERROR(co_await file.Write(offset + done * cs, buf.span().first(n * cs)));
    done += n;
  }
  co_return Status::Ok();
}

Task<Status> WriteRefcounts(File& file, const Layout& l, uint32_t refcount_order) {
  const uint64_t cs = l.cluster_size;
  // The refcount table.
  CO_RETURN_IF_ERROR(co_await WriteClusters(
      file, l.rt_offset, l.rt_clusters, cs, [&](uint64_t c, std::span<std::byte> out) {
        const uint64_t per = cs / 8;
        for (uint64_t i = 0; i < per && c * per + i < l.rb_count; i++) {
          StoreBE64(out, i * 8, l.RefblockOffset(c * per + i));
        }
      }));
  // The refcount blocks: every cluster of the file is in use once.
  AlignedBuffer full(cs);
  SetRefcountsToOne(full.span(), refcount_order, 0, l.refcounts_per_block);
  auto fill_block = [&](uint64_t block, std::span<std::byte> out) {
    uint64_t first_cluster = block * l.refcounts_per_block;
    uint64_t used = std::min(l.refcounts_per_block, l.total_clusters - first_cluster);
    if (used == l.refcounts_per_block) {
      std::memcpy(out.data(), full.data(), cs);
    } else {
      SetRefcountsToOne(out, refcount_order, 0, used);
    }
  };
  CO_RETURN_IF_ERROR(
      co_await WriteClusters(file, l.first_rb_offset, 1, cs,
                             [&](uint64_t, std::span<std::byte> out) { fill_block(0, out); }));
  CO_RETURN_IF_ERROR(co_await WriteClusters(
      file, l.extra_rb_offset, l.rb_count - 1, cs,
      [&](uint64_t i, std::span<std::byte> out) { fill_block(i + 1, out); }));
  co_return Status::Ok();
}

Task<Status> WriteL1(File& file, const Layout& l) {
  if (l.l1_size == 0) co_return Status::Ok();
  // Written as exactly l1_size entries (QEMU does the same), in chunks.
  const uint64_t per_chunk = kChunkBytes / 8;
  AlignedBuffer buf(std::min(l.l1_size, per_chunk) * 8);
  for (uint64_t done = 0; done < l.l1_size;) {
    uint64_t n = std::min(per_chunk, l.l1_size - done);
    std::memset(buf.data(), 0, n * 8);
    if (l.preallocate) {
      for (uint64_t i = 0; i < n; i++) {
        StoreBE64(buf.span(), i * 8, l.L2Offset(done + i) | kEntryCopied);
      }
    }
    CO_RETURN_IF_ERROR(co_await file.Write(l.l1_offset + done * 8, buf.span().first(n * 8)));
    done += n;
  }
  co_return Status::Ok();
}

// Every L2 table of a preallocated image. Entries map each guest cluster to
// its host cluster with COPIED set; extended L2 bitmaps stay zero (QEMU
// leaves them so: the subclusters read as unallocated).
Task<Status> WriteL2Tables(File& file, const Layout& l) {
  const uint64_t cs = l.cluster_size;
  auto fill = [&](uint64_t t, std::span<std::byte> out) {
    uint64_t first = t * l.l2_entries;
    uint64_t n = std::min(l.l2_entries, l.guest_clusters - first);
    for (uint64_t i = 0; i < n; i++) {
      StoreBE64(out, i * l.l2_entry_bytes, l.DataOffset(first + i) | kEntryCopied);
    }
  };
  if (!l.data_in_image) {
    // The tables are contiguous: write them in big chunks.
    co_return co_await WriteClusters(file, l.prealloc_offset, l.l1_size, cs, fill);
  }
  AlignedBuffer buf(cs);
  for (uint64_t t = 0; t < l.l1_size; t++) {
    std::memset(buf.data(), 0, cs);
    fill(t, buf.span());
    CO_RETURN_IF_ERROR(co_await file.Write(l.L2Offset(t), buf.span()));
  }
  co_return Status::Ok();
}

// The LUKS area's bytes at its clusters (the rest of its last cluster stays
// zero, as the truncated file reads).
Task<Status> WriteLuksArea(File& file, const Layout& l, std::span<const std::byte> area) {
  const uint64_t cs = l.cluster_size;
  co_return co_await WriteClusters(file, l.luks_offset, l.luks_clusters, cs,
                                   [&](uint64_t c, std::span<std::byte> out) {
                                     const uint64_t at = c * cs;
                                     const uint64_t n = std::min<uint64_t>(cs, area.size() - at);
                                     std::memcpy(out.data(), area.data() + at, n);
                                   });
}

uint64_t RoundUp512(uint64_t n) { return n + (kSectorSize - n % kSectorSize) % kSectorSize; }

}  // namespace

Result<CreateOptions> ParseCreateOptions(std::string_view comma_list, CreateOptions base) {
  CreateOptions o = std::move(base);
  ASSIGN_OR_RETURN(std::vector<OptionItem> items, SplitOptionList(comma_list));
  for (const OptionItem& item : items) RETURN_IF_ERROR(ApplyOption(item.key, item.value, o));
  RETURN_IF_ERROR(ValidateCreateOptions(o));
  return o;
}

Status ValidateCreateOptions(const CreateOptions& o) {
  using P = CreateOptions::Preallocation;
  int version;
  if (o.compat == "1.1") {
    version = 3;
  } else if (o.compat == "0.10") {
    version = 2;
  } else {
    return Status::InvalidArgument(fmt::format("Invalid compatibility level: '{}'", o.compat));
  }
  if (o.extended_l2 && version < 3) {
    return Status::InvalidArgument(
        "Extended L2 entries are only supported with "
        "compatibility level 1.1 and above (use version=v3 or greater)");
  }
  if (o.cluster_size < kMinClusterSize || o.cluster_size > kMaxClusterSize ||
      !std::has_single_bit(o.cluster_size)) {
    return Status::InvalidArgument("Cluster size must be a power of two between 512 and 2048k");
  }
  if (o.extended_l2 && o.cluster_size < (kMinClusterSize * kSubclustersPerCluster)) {
    return Status::InvalidArgument(
        fmt::format("Extended L2 entries are only supported with cluster sizes of at "
                    "least {} bytes",
                    kMinClusterSize * kSubclustersPerCluster));
  }
  if (o.backing_file && o.preallocation != P::kOff && !o.extended_l2) {
    return Status::InvalidArgument(
        "Backing file and preallocation can only be used at the same time if "
        "extended_l2 is on");
  }
  if (o.backing_format && !o.backing_file) {
    return Status::InvalidArgument("Backing format cannot be used without backing file");
  }
  if (o.backing_file && o.backing_file->empty()) {
    return Status::InvalidArgument("Expected backing file name, got empty string");
  }
  if (version < 3 && o.lazy_refcounts) {
    return Status::InvalidArgument(
        "Lazy refcounts only supported with "
        "compatibility level 1.1 and above (use version=v3 or greater)");
  }
  if (o.refcount_bits > 64 || !std::has_single_bit(o.refcount_bits)) {
    return Status::InvalidArgument(
        "Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && o.refcount_bits != 16) {
    return Status::InvalidArgument(
        "Different refcount widths than 16 bits require compatibility level "
        "1.1 or above (use version=v3 or greater)");
  }
  if (o.data_file_raw && !o.data_file) {
    return Status::InvalidArgument("data-file-raw requires data-file");
  }
  if (o.data_file_raw && o.backing_file) {
    return Status::InvalidArgument(
        "Backing file and data-file-raw cannot be used at the same time");
  }
  if (o.data_file) {
    if (version < 3) {
      return Status::InvalidArgument(
          "External data files are only supported with "
          "compatibility level 1.1 and above (use version=v3 or greater)");
    }
    if (o.data_file->empty()) {
      return Status::InvalidArgument("Expected data file name, got empty string");
    }
  }
  if (o.encrypt) {
    const EncryptOptions& e = *o.encrypt;
    const bool other_keys = std::any_of(e.given.begin(), e.given.end(), [](const auto& kv) {
      return kv.first.starts_with("encrypt.");
    });
    if (e.format.empty() && other_keys) {
      return Status::InvalidArgument("Parameter 'encrypt.format' is missing");
    }
    if (e.format == "aes") {
      return Status::NotSupported(
          "creating legacy AES-encrypted images (encrypt.format=aes, encryption=on) is not "
          "supported; use encrypt.format=luks");
    }
    if (e.format == "luks") RETURN_IF_ERROR(crypto::LuksAlgorithms(e.luks).status());
  }
  if (o.compression_type != "zlib") {
    if (o.compression_type != "zstd") {
      return BadValue("compression_type", o.compression_type);
    }
    if (version < 3) {
      return Status::InvalidArgument(
          "Non-zlib compression type is only supported with "
          "compatibility level 1.1 and above (use version=v3 or greater)");
    }
  }
  return Status::Ok();
}

Task<Status> CreateImage(Env* env, CreateOptions o) {
  if (env == nullptr) {
    co_return Status::InvalidArgument("CreateImage: no Env given");
  }
  if (o.path.empty()) {
    co_return Status::InvalidArgument("CreateImage: no image file name given");
  }
  CO_RETURN_IF_ERROR(ValidateCreateOptions(o));
  const bool v3 = o.compat == "1.1";
  const uint32_t refcount_order = static_cast<uint32_t>(std::countr_zero(o.refcount_bits));
  const bool preallocate =
      o.preallocation == CreateOptions::Preallocation::kMetadata || o.data_file_raw;

  // The backing file: open it (as qemu-img does) to check it, detect its
  // format if none was given, and take its size if none was given.
  if (o.backing_file) {
    const std::string& name = *o.backing_file;
    if (IsProtocolName(name)) {
      co_return Status::NotSupported(
          fmt::format("{}: backing file '{}' is a protocol or JSON name, which "
                      "is not supported",
                      o.path, name));
    }
    std::string resolved = ResolveRelativeTo(o.path, name);
    if (FileIdentity(resolved) == FileIdentity(o.path)) {
      co_return Status::InvalidArgument(
          fmt::format("{}: the image cannot be its own backing file", o.path));
    }
    auto context = [&](const Status& s) {
      return s.WithContext(fmt::format("{}: Could not open backing image", o.path));
    };
    if (!o.backing_format) {
      Result<std::unique_ptr<File>> probe = env->Open(resolved, OpenOptions{});
      if (!probe.ok()) co_return context(probe.status());
      Result<bool> qcow2 = co_await IsQcow2(**probe);
      if (!qcow2.ok()) co_return context(qcow2.status());
      o.backing_format = *qcow2 ? "qcow2" : "raw";
    }
    ImageOptions open;
    open.env = env;
    open.format = *o.backing_format;
    Result<std::unique_ptr<BlockDevice>> backing = co_await OpenImage(resolved, open);
    if (!backing.ok()) co_return context(backing.status());
    if (!o.size) o.size = (*backing)->size();
  }
  if (!o.size) {
    co_return Status::InvalidArgument(
        fmt::format("{}: Image creation needs a size parameter", o.path));
  }
  if (*o.size > (uint64_t{1} << 63) - kSectorSize) {
    co_return Status::InvalidArgument(kTooLarge);
  }
  const uint64_t size = RoundUp512(*o.size);

  // The LUKS area: its size is known from the options; its key material
  // is made (PBKDF2 timing, iter_time of work) only once everything else
  // is checked, just before the files are touched.
  const bool luks = o.encrypt && o.encrypt->format == "luks";
  uint64_t luks_bytes = 0;
  if (luks) {
    if (o.passphrase == nullptr) {
      co_return Status::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher");
    }
    CO_ASSIGN_OR_RETURN(crypto::Algorithms algorithms, crypto::LuksAlgorithms(o.encrypt->luks));
    luks_bytes = crypto::LuksAreaLength(algorithms.key_bytes);
  }

  CO_ASSIGN_OR_RETURN(Layout layout, PlanLayout(size, o.cluster_size, refcount_order, o.extended_l2,
                                                preallocate, o.data_file.has_value(), luks_bytes));

  Header h;
  h.version = v3 ? 3 : 2;
  h.cluster_bits = layout.cluster_bits;
  h.size = size;
  h.l1_size = static_cast<uint32_t>(layout.l1_size);
  h.l1_table_offset = layout.l1_offset;
  h.refcount_table_offset = layout.rt_offset;
  h.refcount_table_clusters = static_cast<uint32_t>(layout.rt_clusters);
  h.refcount_order = refcount_order;
  if (v3) {
    h.header_length = kV3HeaderLengthWithCompression;
    if (o.lazy_refcounts) h.compatible_features |= kCompatLazyRefcounts;
    if (o.data_file) h.incompatible_features |= kIncompatDataFile;
    if (o.data_file_raw) h.autoclear_features |= kAutoclearDataFileRaw;
    if (o.compression_type == "zstd") {
      h.incompatible_features |= kIncompatCompression;
      h.compression_type = kCompressionZstd;
    }
    if (o.extended_l2) h.incompatible_features |= kIncompatExtendedL2;
    h.feature_names = QemuFeatureNames(o.cluster_size);
  } else {
    h.header_length = kV2HeaderLength;
  }
  if (o.data_file) h.data_file = *o.data_file;
  if (luks) {
    h.crypt_method = kCryptLuks;
    h.crypto = CryptoExtension{layout.luks_offset, layout.luks_bytes};
  }
  if (o.backing_file) {
    h.backing_file = *o.backing_file;
    h.backing_format = *o.backing_format;
  }
  Result<std::vector<std::byte>> header_bytes = SerializeHeader(h);
  if (!header_bytes.ok()) co_return header_bytes.status().WithContext(o.path);

  std::string data_path;
  if (o.data_file) {
    if (IsProtocolName(*o.data_file)) {
      co_return Status::NotSupported(
          fmt::format("{}: data file '{}' is not a plain file", o.path, *o.data_file));
    }
    data_path = DataFilePath(*o.data_file, o.working_dir);  // where QEMU and OpenImage look
    if (FileIdentity(data_path) == FileIdentity(o.path)) {
      co_return Status::InvalidArgument(
          fmt::format("{}: the image cannot be its own data file", o.path));
    }
  }

  std::optional<crypto::LuksArea> luks_area;
  if (luks) {
    Result<crypto::LuksArea> area = crypto::FormatLuks(o.encrypt->luks, o.passphrase->span());
    if (!area.ok()) co_return area.status().WithContext(o.path);
    if (area->bytes.size() != layout.luks_bytes) {
      co_return Status::InvalidArgument(fmt::format("{}: LUKS area size mismatch", o.path));
    }
    luks_area = std::move(*area);
  }

  // Everything is checked; now create the files.
  OpenOptions create;
  create.writable = true;
  create.create = true;
  create.truncate = true;
  std::unique_ptr<File> data;
  if (o.data_file) {
    CO_ASSIGN_OR_RETURN(data, env->Open(data_path, create));
    // Preallocated clusters are mapped whole; the file covers them.
    CO_RETURN_IF_ERROR(
        data->Truncate(preallocate ? layout.guest_clusters * layout.cluster_size : size));
  }
  CO_ASSIGN_OR_RETURN(std::unique_ptr<File> file, env->Open(o.path, create));
  CO_RETURN_IF_ERROR(file->Truncate(layout.file_size));
  CO_RETURN_IF_ERROR(co_await WriteRefcounts(*file, layout, refcount_order));
  CO_RETURN_IF_ERROR(co_await WriteL1(*file, layout));
  if (layout.preallocate) {
    CO_RETURN_IF_ERROR(co_await WriteL2Tables(*file, layout));
  }
  if (luks_area) {
    CO_RETURN_IF_ERROR(co_await WriteLuksArea(*file, layout, luks_area->bytes));
  }
  // The header last: until it is there the file is not an image.
  {
    AlignedBuffer first(layout.cluster_size);
    std::memcpy(first.data(), header_bytes->data(), header_bytes->size());
    CO_RETURN_IF_ERROR(co_await file->Write(0, first.span()));
  }
  if (data) CO_RETURN_IF_ERROR(co_await data->Sync());
  CO_RETURN_IF_ERROR(co_await file->Sync());
  co_return Status::Ok();
}

}  // namespace uq::qcow2
