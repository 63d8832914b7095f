// Compressed cluster codecs: raw deflate (compression type 0, "zlib") and
// zstd (compression type 1), as QEMU writes and reads them.
//
// A compressed cluster is stored as a byte string whose exact length the image
// does not record: the L2 descriptor gives its host offset and a count of
// 512-byte sectors, so the bytes read for it usually end with padding or with
// the start of the next compressed cluster. Decompress() therefore reads only
// what it needs to fill one cluster and ignores whatever follows.
//
// On disk (QEMU's block/qcow2-threads.c, the reference):
//   deflate  a raw deflate stream (no zlib header or trailer), written with a
//            4 KiB window (windowBits -12), the default level and memLevel 9.
//   zstd     one zstd frame (QEMU's reader also accepts several frames in a
//            row, and so does Decompress()), default level.
//
// Thread model: every function is safe to call from several threads at once;
// each thread keeps its own codec state, reused from call to call.
#ifndef UBLK_QCOW2_QCOW2_COMPRESSION_H_
#define UBLK_QCOW2_QCOW2_COMPRESSION_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "base/status.h"

namespace uq::qcow2 {

// The header's compression_type byte (v3 header byte 104).
enum class CompressionType : uint8_t { kDeflate = 0, kZstd = 1 };

// "zlib" or "zstd", as qemu-img names them; "unknown" for other values.
std::string_view CompressionTypeName(CompressionType type);

// Decompresses one cluster: fills all of `out` (out.size() is the cluster
// size) from the compressed bytes at the start of `in`. Bytes of `in` after
// the point where `out` is full are ignored (sector padding, the next
// cluster's data), and so is anything the stream would produce beyond `out`.
//
// Errors: Corruption "compressed cluster (<type>, N bytes) does not decompress
// to a full cluster of M bytes: <why>" when the data is invalid or ends before
// `out` is full; InvalidArgument for an unknown `type`. On error the contents
// of `out` are unspecified.
Status Decompress(CompressionType type, std::span<const std::byte> in, std::span<std::byte> out);

// Compresses `in` (one cluster) into the start of `out` and returns the
// compressed size (> 0, <= out.size()). Callers that want compression to pay
// off pass an `out` smaller than the cluster, as QEMU does (cluster size - 1).
//
// Errors: NoSpace "compressed cluster does not fit in N bytes" when the
// compressed form is larger than `out` (store the cluster uncompressed
// instead, as QEMU does); InvalidArgument for an unknown `type` or empty
// `in`; IoError if the codec fails for another reason (out of memory).
Result<size_t> Compress(CompressionType type, std::span<const std::byte> in,
                        std::span<std::byte> out);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_COMPRESSION_H_
