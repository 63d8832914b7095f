#include "qcow2/compression.h"

// next_in is const with ZLIB_CONST.
#define ZLIB_CONST
#include <fmt/format.h>
#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <algorithm>
#include <climits>
#include <memory>
#include <string>

namespace uq::qcow2 {

namespace {

// QEMU's deflate parameters (block/qcow2-threads.c): raw stream, 4 KiB window.
constexpr int kDeflateWindowBits = -12;
constexpr int kDeflateMemLevel = 9;
// Reading accepts any raw deflate window up to 32 KiB, a superset of QEMU's.
constexpr int kInflateWindowBits = -MAX_WBITS;

// One z_stream per thread and direction, initialised on first use and reset
// before each cluster. `ok` is false if initialisation failed (out of memory).
class Deflater {
 public:
  Deflater() {
    ok_ = deflateInit2(&strm_, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kDeflateWindowBits,
                       kDeflateMemLevel, Z_DEFAULT_STRATEGY) == Z_OK;
  }
  ~Deflater() {
    if (ok_) deflateEnd(&strm_);
  }
  Deflater(const Deflater&) = delete;
  Deflater& operator=(const Deflater&) = delete;

  // The stream ready for a new cluster, or nullptr.
  z_stream* Fresh() {
    if (!ok_ || deflateReset(&strm_) != Z_OK) return nullptr;
    return &strm_;
  }

 private:
  z_stream strm_{};
  bool ok_ = false;
};

class Inflater {
 public:
  Inflater() { ok_ = inflateInit2(&strm_, kInflateWindowBits) == Z_OK; }
  ~Inflater() {
    if (ok_) inflateEnd(&strm_);
  }
  Inflater(const Inflater&) = delete;
  Inflater& operator=(const Inflater&) = delete;

  z_stream* Fresh() {
    if (!ok_ || inflateReset(&strm_) != Z_OK) return nullptr;
    return &strm_;
  }

 private:
  z_stream strm_{};
  bool ok_ = false;
};

struct ZstdDCtxFree {
  void operator()(ZSTD_DCtx* p) const { ZSTD_freeDCtx(p); }
};
struct ZstdCCtxFree {
  void operator()(ZSTD_CCtx* p) const { ZSTD_freeCCtx(p); }
};

ZSTD_DCtx* ThreadDCtx() {
  thread_local std::unique_ptr<ZSTD_DCtx, ZstdDCtxFree> dctx(ZSTD_createDCtx());
  return dctx.get();
}
ZSTD_CCtx* ThreadCCtx() {
  thread_local std::unique_ptr<ZSTD_CCtx, ZstdCCtxFree> cctx(ZSTD_createCCtx());
  return cctx.get();
}

Status NotAFullCluster(CompressionType type, size_t in_size, size_t out_size,
                       std::string_view why) {
  return Status::Corruption(
      fmt::format("compressed cluster ({}, {} bytes) does not decompress to a full cluster "
                  "of {} bytes: {}",
                  CompressionTypeName(type), in_size, out_size, why));
}

Status UnknownType(CompressionType type) {
  return Status::InvalidArgument(
      fmt::format("unknown compression type {}", static_cast<unsigned>(type)));
}

struct LibdeflateFree {
  void operator()(libdeflate_decompressor* p) const { libdeflate_free_decompressor(p); }
};

// libdeflate inflates a whole cluster 1.3x (base64 text) to 2.5x (program
// binaries) faster than zlib here. It answers only the plain case: a stream
// that fills the cluster exactly and ends there, with anything after it
// ignored. Every other case (a stream that goes on past the cluster or whose
// input stops early with the cluster full, which QEMU accepts; damaged data)
// goes to zlib, which decides it and words the error.
bool FastInflateCluster(std::span<const std::byte> in, std::span<std::byte> out) {
  thread_local std::unique_ptr<libdeflate_decompressor, LibdeflateFree> d(
      libdeflate_alloc_decompressor());
  if (!d) return false;
  size_t in_used = 0, produced = 0;
  return libdeflate_deflate_decompress_ex(d.get(), in.data(), in.size(), out.data(), out.size(),
                                          &in_used, &produced) == LIBDEFLATE_SUCCESS &&
         produced == out.size();
}

Status InflateCluster(std::span<const std::byte> in, std::span<std::byte> out) {
  if (FastInflateCluster(in, out)) return Status::Ok();
  thread_local Inflater inflater;
  z_stream* strm = inflater.Fresh();
  if (strm == nullptr) return Status::IoError("inflate: cannot initialise zlib (out of memory)");
  // Input beyond 4 GiB cannot matter: a cluster is at most 2 MiB.
  strm->next_in = reinterpret_cast<const Bytef*>(in.data());
  strm->avail_in = static_cast<uInt>(std::min<size_t>(in.size(), UINT_MAX));
  strm->next_out = reinterpret_cast<Bytef*>(out.data());
  strm->avail_out = static_cast<uInt>(out.size());
  int ret = inflate(strm, Z_FINISH);
  // Z_BUF_ERROR with a full output is the normal case: the stream goes on
  // (into padding) past the cluster, or the input ended exactly at the end.
  if (ret != Z_STREAM_END && ret != Z_BUF_ERROR) {
    return NotAFullCluster(
        CompressionType::kDeflate, in.size(), out.size(),
        fmt::format("invalid deflate data ({})", strm->msg != nullptr ? strm->msg : zError(ret)));
  }
  if (strm->avail_out != 0) {
    return NotAFullCluster(
        CompressionType::kDeflate, in.size(), out.size(),
        fmt::format("{} after {} bytes",
                    ret == Z_STREAM_END ? "the deflate stream ends" : "the input ends",
                    out.size() - strm->avail_out));
  }
  return Status::Ok();
}

Status ZstdDecompressCluster(std::span<const std::byte> in, std::span<std::byte> out) {
  ZSTD_DCtx* dctx = ThreadDCtx();
  if (dctx == nullptr) return Status::IoError("zstd: cannot create a decompression context");
  // A previous cluster may have stopped in the middle of a frame.
  ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only);
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  while (output.pos < output.size) {
    size_t in_before = input.pos;
    size_t out_before = output.pos;
    size_t ret = ZSTD_decompressStream(dctx, &output, &input);
    if (ZSTD_isError(ret)) {
      return NotAFullCluster(
          CompressionType::kZstd, in.size(), out.size(),
          fmt::format("invalid zstd data after {} bytes ({})", output.pos, ZSTD_getErrorName(ret)));
    }
    // A finished frame (ret == 0) may be followed by another, which QEMU
    // reads too; a call that makes no progress means the input is used up.
    if (output.pos < output.size && input.pos == in_before && output.pos == out_before) {
      return NotAFullCluster(CompressionType::kZstd, in.size(), out.size(),
                             fmt::format("the input ends after {} bytes", output.pos));
    }
  }
  return Status::Ok();
}

}  // namespace

std::string_view CompressionTypeName(CompressionType type) {
  switch (type) {
    case CompressionType::kDeflate:
      return "zlib";
    case CompressionType::kZstd:
      return "zstd";
  }
  return "unknown";
}

Status Decompress(CompressionType type, std::span<const std::byte> in, std::span<std::byte> out) {
  if (out.size() > UINT_MAX) {
    return Status::InvalidArgument(fmt::format("cluster of {} bytes is too large", out.size()));
  }
  switch (type) {
    case CompressionType::kDeflate:
      return InflateCluster(in, out);
    case CompressionType::kZstd:
      return ZstdDecompressCluster(in, out);
  }
  return UnknownType(type);
}

Result<size_t> Compress(CompressionType type, std::span<const std::byte> in,
                        std::span<std::byte> out) {
  if (in.empty()) return Status::InvalidArgument("compress: empty input");
  if (in.size() > UINT_MAX || out.size() > UINT_MAX) {
    return Status::InvalidArgument(
        fmt::format("compress: {} bytes into {} bytes is too large", in.size(), out.size()));
  }
  Status no_fit =
      Status::NoSpace(fmt::format("compressed cluster does not fit in {} bytes", out.size()));
  switch (type) {
    case CompressionType::kDeflate: {
      thread_local Deflater deflater;
      z_stream* strm = deflater.Fresh();
      if (strm == nullptr)
        return Status::IoError("deflate: cannot initialise zlib (out of memory)");
      strm->next_in = reinterpret_cast<const Bytef*>(in.data());
      strm->avail_in = static_cast<uInt>(in.size());
      strm->next_out = reinterpret_cast<Bytef*>(out.data());
      strm->avail_out = static_cast<uInt>(out.size());
      int ret = deflate(strm, Z_FINISH);
      if (ret == Z_STREAM_END) return out.size() - strm->avail_out;
      // Z_OK / Z_BUF_ERROR: Z_FINISH could not complete for lack of room.
      if (ret == Z_OK || ret == Z_BUF_ERROR) return no_fit;
      return Status::IoError(fmt::format("deflate failed ({})", zError(ret)));
    }
    case CompressionType::kZstd: {
      ZSTD_CCtx* cctx = ThreadCCtx();
      if (cctx == nullptr) return Status::IoError("zstd: cannot create a compression context");
      // One frame, default level, as QEMU writes.
      size_t ret = ZSTD_compress2(cctx, out.data(), out.size(), in.data(), in.size());
      if (ZSTD_isError(ret)) {
        if (ZSTD_getErrorCode(ret) == ZSTD_error_dstSize_tooSmall) return no_fit;
        return Status::IoError(fmt::format("zstd compression failed ({})", ZSTD_getErrorName(ret)));
      }
      return ret;
    }
  }
  return UnknownType(type);
}

}  // namespace uq::qcow2
