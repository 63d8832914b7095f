// Creating qcow2 images: what `qemu-img create -f qcow2 -o ...` does.
//
// CreateImage() writes a new, empty (or metadata-preallocated) qcow2 image in
// one pass, laid out as QEMU lays out a fresh image:
//
//   cluster 0              header, header extensions (backing format,
//                          external data file name, feature name table),
//                          end marker, backing file name
//   cluster 1..            refcount table
//   next cluster           the first refcount block
//   next clusters          L1 table: exactly the entries the virtual size needs
//   (preallocation=metadata)
//                          every L2 table, each followed by the data clusters
//                          it maps (no data clusters with an external data
//                          file: those map 1:1 onto the data file)
//   last                   further refcount blocks, when one does not cover
//                          the file
//
// Every cluster in the file has refcount 1. As in QEMU, data clusters are
// not written (the file is sparse), and the file ends right after the last L1
// entry when the L1 table is the last thing in it, else at the end of its
// last cluster.
//
// Fidelity to qemu-img 7.2 (checked by create_test): the file is byte for
// byte the one qemu-img writes whenever one refcount block covers the whole
// file (64 KiB clusters and 16-bit refcounts: files up to 2 GiB, that is every
// unpreallocated image and preallocated ones up to ~2 GiB; 2 MiB clusters:
// preallocated images up to 2 TiB), and in some other cases (e.g. 1 GiB with
// 512-byte clusters and refcounts of up to 16 bits). Otherwise QEMU's allocator
// puts the extra refcount blocks between data clusters, or in the order it
// recursed in, and may grow and move its refcount table, leaving a hole; our
// file then has the same size, or is smaller when QEMU moved its table, and
// checks clean just the same.
//
// Options and their validation follow qemu-img's qcow2 driver, error
// messages included (see ValidateCreateOptions()).
#ifndef UBLK_QCOW2_QCOW2_CREATE_CREATE_H_
#define UBLK_QCOW2_QCOW2_CREATE_CREATE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/crypto/luks_format.h"
#include "qcow2/crypto/secret.h"
#include "qcow2/file.h"

namespace uq::qcow2 {

// `-o encrypt.*`: a LUKS area inside the image (qcow2 crypt_method 2 and the
// full disk encryption header extension), laid out as QEMU lays it out:
// right after the L1 table (and the preallocated clusters), cluster-aligned,
// payload_offset bytes long (crypto/luks_format.h), zero where nothing is
// written. QEMU's legacy AES format (encrypt.format=aes, and its old alias
// encryption=on) is not created: NotSupported.
struct EncryptOptions {
  // "luks" or "aes"; empty when only other encrypt.* keys were given
  // (refused: "Parameter 'encrypt.format' is missing").
  std::string format;
  // Given as `encryption=on|off` (QEMU's alias of encrypt.format=aes).
  bool from_alias = false;
  crypto::LuksFormatOptions luks;
  // encrypt.key-secret: the id of the --object secret holding the
  // passphrase. The caller resolves it into CreateOptions::passphrase.
  std::string key_secret;
  // The encrypt.* keys given, as given, for create's "Formatting" line.
  std::map<std::string, std::string, std::less<>> given;
};

struct CreateOptions {
  enum class Preallocation { kOff, kMetadata };

  // The image file to create; an existing file is truncated.
  std::string path;
  // Virtual size in bytes, rounded up to a multiple of 512 as qemu-img does.
  // Unset: the backing file's virtual size (required then: a backing file).
  // 0 is a valid, explicit size.
  std::optional<uint64_t> size;
  // A power of two, 512 to 2 MiB.
  uint32_t cluster_size = 65536;
  // "1.1" (qcow2 version 3) or "0.10" (version 2).
  std::string compat = "1.1";
  // A power of two, 1 to 64; version 2 allows only 16.
  uint32_t refcount_bits = 16;
  // Extended L2 entries (32 subclusters per cluster): version 3, clusters of
  // at least 16 KiB.
  bool extended_l2 = false;
  // "zlib" or "zstd" (version 3 only).
  std::string compression_type = "zlib";
  // Version 3 only.
  bool lazy_refcounts = false;
  // An external data file holding the guest data (version 3 only). The name
  // is recorded as given; a relative name is created relative to the working
  // directory, where QEMU and OpenImage look for it (DataFilePath). An existing file is
  // truncated and resized to the virtual size (with preallocation, to whole
  // clusters), as qemu-img does.
  std::optional<std::string> data_file;
  // Stands in for the working directory that a relative data_file name is
  // taken relative to (DataFilePath); empty: this process's own.
  std::string working_dir;
  // The data file is a valid raw image by itself: needs data_file, excludes a
  // backing file, and implies preallocation=metadata (a 1:1 mapping).
  bool data_file_raw = false;
  // kMetadata allocates every L2 table and maps every guest cluster to its
  // own host cluster (COPIED set; with extended L2 the subcluster bitmaps
  // stay zero, so reads still come from the backing file, as QEMU does it).
  // With a backing file it needs extended_l2.
  Preallocation preallocation = Preallocation::kOff;
  // The backing file name, recorded as given; a relative name is taken
  // relative to the image's directory. It is opened at creation (to check it
  // and, without a size, to read its virtual size).
  std::optional<std::string> backing_file;
  // "qcow2" or "raw" (the formats OpenImage reads). Unset: detected from the
  // backing file (qcow2 magic or raw) and recorded in the image. qemu-img 7.2
  // refuses to create an image without a backing format; recording the detected
  // one gives the image it would have made with -F <detected format>.
  std::optional<std::string> backing_format;
  // Encryption (see EncryptOptions); unset: none.
  std::optional<EncryptOptions> encrypt;
  // The passphrase of a new encrypted image ("Parameter 'encrypt.key-secret'
  // is required for cipher" without one). Never logged.
  std::shared_ptr<const crypto::SecretBytes> passphrase;
};

// Parses qemu-img's `-o key=value,key=value` list on top of `base` (later
// keys win; ",," is a literal comma inside a value). Keys: size, compat,
// cluster_size, refcount_bits, extended_l2, compression_type, lazy_refcounts,
// data_file, data_file_raw, preallocation, backing_file, backing_fmt,
// encryption, encrypt.format, encrypt.key-secret, encrypt.cipher-alg,
// encrypt.cipher-mode, encrypt.ivgen-alg, encrypt.ivgen-hash-alg,
// encrypt.hash-alg, encrypt.iter-time.
// Sizes take qemu-img's suffixes (512, 64k, 2M, 0x1000, 1.5k); numbers take
// C prefixes (0x10, 010); booleans are on/off (also yes/no, true/false, y/n).
// The merged result is validated with ValidateCreateOptions().
//
// Errors (InvalidArgument unless noted), worded as qemu-img words them:
//   "Invalid parameter 'foo'" for an unknown key; a key without '=' or a bad
//   value names the key (for encrypt.* QEMU's words: "Parameter 'cipher-alg'
//   does not accept value 'foo'"); legacy AES encryption, ciphers QEMU has
//   and libcrypto lacks, nocow and preallocation=falloc/full are
//   NotSupported.
Result<CreateOptions> ParseCreateOptions(std::string_view comma_list, CreateOptions base);

// Checks that the options can make an image, in the order and with the
// messages of QEMU's qcow2_co_create(), e.g. "Cluster size must be a power of
// two between 512 and 2048k", "Refcount width must be a power of two and may
// not exceed 64 bits", "Lazy refcounts only supported with compatibility
// level 1.1 and above (use version=v3 or greater)", "data-file-raw requires
// data-file", "Backing file and data-file-raw cannot be used at the same
// time". Checks needing the final size (too large for the L1 table) happen in
// CreateImage().
Status ValidateCreateOptions(const CreateOptions& options);

// Creates the image (and the data file) described by `options` through
// `env`, then syncs them. Errors: InvalidArgument/NotSupported as above, and
// "The image size is too large for file format 'qcow2' (try using a larger
// cluster size)" when the L1 table would exceed 32 MiB or the refcount table
// 8 MiB (QEMU's limits); a backing file that cannot be opened ("Could not
// open backing image"); I/O errors naming the file. Everything is checked
// before any file is created or truncated; an I/O error part way leaves a
// partial file behind.
//
// Takes its options by value: the Task is lazy and may outlive the caller's
// temporaries.
Task<Status> CreateImage(Env* env, CreateOptions options);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_CREATE_CREATE_H_
