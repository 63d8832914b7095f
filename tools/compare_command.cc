#include "tools/compare_command.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/when_all.h"
#include "qcow2/block_device.h"
#include "qcow2/open_image.h"
#include "tools/chain_status.h"
#include "tools/image_key.h"
#include "tools/io_context.h"
#include "tools/progress.h"
#include "tools/sector_scan.h"

namespace uq::tools {
namespace {

using qcow2::BlockDevice;

// qemu-img compare's exit statuses.
constexpr int kIdentical = 0;
constexpr int kDifferent = 1;
constexpr int kOpenFailed = 2;
constexpr int kStatusFailed = 3;
constexpr int kReadFailed = 4;

// Bytes read from each image at a time (qemu-img reads 2 MiB; the offsets
// reported do not depend on it).
constexpr uint64_t kReadChunk = uint64_t{4} << 20;

// qemu-img's progress line moves in steps of at least 2 points.
constexpr double kProgressStep = 2.0;

// An error's message names `path` (once).
Status Named(Status status, const std::string& path) {
  if (status.ok() || status.message().find(path) != std::string::npos) return status;
  return status.WithContext(path);
}

// One image being compared.
struct Side {
  std::string path;
  std::unique_ptr<BlockDevice> device;
  AlignedBuffer buffer;  // kReadChunk bytes once open

  std::span<std::byte> Span(uint64_t length) { return {buffer.data(), length}; }
};

class CompareCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE1", a_.path, "The first image")->required();
    app.add_option("IMAGE2", b_.path, "The second image")->required();
    app.add_option("-f", format_a_, "IMAGE1's format: qcow2 or raw (default: probe)");
    app.add_option("-F", format_b_, "IMAGE2's format: qcow2 or raw (default: probe)");
    app.add_flag("-s", strict_,
                 "Strict: the sizes, and the block status at every offset, must be equal too");
    app.add_flag("-p", progress_, "Show progress on stdout");
    app.add_flag("-q", quiet_, "Print nothing on stdout (the exit status tells)");
    app.add_flag("-U,--force-share", force_share_,
                 "Take no image locks: compare images another process writes");
    app.footer(
        "Exit status (as qemu-img compare): 0 identical, 1 different or a bad command line,\n"
        "2 an image would not open, 3 a block status query failed, 4 a read failed.");
  }

  Status Run() override {
    if (quiet_) progress_ = false;
    meter_ = ProgressMeter(progress_ ? stdout : nullptr, kProgressStep);
    Status status = Compare();
    if (progress_) {
      std::fputc('\n', stdout);  // qemu-img ends its progress line last
    }
    std::fflush(stdout);
    return status;
  }

  int exit_code() const override { return exit_; }
  int error_exit_code() const override { return exit_; }
  int usage_exit_code() const override { return kDifferent; }

 private:
  Status Compare() {
    exit_ = kOpenFailed;
    Result<std::unique_ptr<IoContext>> io = IoContext::Create(IoMode::kAuto);
    if (!io.ok()) return io.status();
    io_ = std::move(io).value();
    Status status = Open(a_, format_a_);
    if (status.ok()) status = Open(b_, format_b_);
    if (status.ok()) status = io_->Run(CompareOpen());
    for (Side* side : {&a_, &b_}) {
      if (side->device == nullptr) continue;
      Status closed = io_->Run(side->device->Close());
      side->device.reset();
      if (status.ok() && !closed.ok()) {
        exit_ = kReadFailed;
        status = Named(closed, side->path);
      }
    }
    return status;
  }

  // Opens `side` as qemu-img would (image 1 first): an unknown format is
  // refused before the file is touched.
  Status Open(Side& side, const std::string& format) {
    if (!format.empty() && format != "qcow2" && format != "raw") {
      return Status::NotSupported(
          fmt::format("{}: unknown format '{}' (qcow2 or raw)", side.path, format));
    }
    qcow2::ImageOptions options;
    UseImageKey(options);
    options.env = io_->env();
    options.format = format;
    options.lock = !force_share_;
    Result<std::unique_ptr<BlockDevice>> device = io_->Run(qcow2::OpenImage(side.path, options));
    if (!device.ok()) return Named(device.status(), side.path);
    side.device = std::move(device).value();
    side.buffer = AlignedBuffer(kReadChunk);
    return Status::Ok();
  }

  // Prints an outcome line (unless -q).
  void Say(const std::string& line) {
    if (!quiet_) std::fputs(line.c_str(), stdout);
  }

  // qemu-img's img_compare loop; sets exit_.
  Task<Status> CompareOpen() {
    const uint64_t size_a = a_.device->size();
    const uint64_t size_b = b_.device->size();
    const uint64_t common = std::min(size_a, size_b);
    const uint64_t total = std::max(size_a, size_b);
    meter_.Start();
    exit_ = kDifferent;
    if (strict_ && size_a != size_b) {
      Say("Strict mode: Image size mismatch!\n");
      co_return Status::Ok();
    }
    uint64_t offset = 0;
    while (offset < common) {
      exit_ = kStatusFailed;
      CO_ASSIGN_OR_RETURN(ChainStatus sa, co_await StatusOf(a_, offset));
      CO_ASSIGN_OR_RETURN(ChainStatus sb, co_await StatusOf(b_, offset));
      exit_ = kDifferent;
      uint64_t chunk = std::min(sa.length, sb.length);
      if (strict_ && !sa.SameFlags(sb)) {
        Say(fmt::format("Strict mode: Offset {} block status mismatch!\n", offset));
        co_return Status::Ok();
      }
      if (sa.zero && sb.zero) {
        // Both read as zeros: nothing to read.
      } else if (sa.allocated == sb.allocated) {
        if (sa.allocated) {
          chunk = std::min(chunk, kReadChunk);
          exit_ = kReadFailed;
          CO_RETURN_IF_ERROR(co_await WhenAll(MakeReads(offset, chunk)));
          exit_ = kDifferent;
          if (auto at = FirstDifferentSector(a_.Span(chunk), b_.Span(chunk))) {
            Say(fmt::format("Content mismatch at offset {}!\n", offset + *at));
            co_return Status::Ok();
          }
        }
      } else {
        chunk = std::min(chunk, kReadChunk);
        CO_ASSIGN_OR_RETURN(bool empty,
                            co_await ReadsAsZeros(sa.allocated ? a_ : b_, offset, chunk));
        if (!empty) co_return Status::Ok();
      }
      offset += chunk;
      meter_.Update(offset, total);
    }

    if (size_a != size_b) {
      Say("Warning: Image size mismatch!\n");
      Side& over = size_a > size_b ? a_ : b_;
      while (offset < total) {
        exit_ = kStatusFailed;
        CO_ASSIGN_OR_RETURN(ChainStatus s, co_await StatusOf(over, offset));
        exit_ = kDifferent;
        uint64_t chunk = s.length;
        if (s.allocated && !s.zero) {
          chunk = std::min(chunk, kReadChunk);
          CO_ASSIGN_OR_RETURN(bool empty, co_await ReadsAsZeros(over, offset, chunk));
          if (!empty) co_return Status::Ok();
        }
        offset += chunk;
        meter_.Update(offset, total);
      }
    }
    if (total > 0) meter_.ReachHundred();
    Say("Images are identical.\n");
    exit_ = kIdentical;
    co_return Status::Ok();
  }

  Task<Result<ChainStatus>> StatusOf(Side& side, uint64_t offset) {
    Result<ChainStatus> s =
        co_await ChainStatusAt(*side.device, offset, side.device->size() - offset);
    if (!s.ok()) co_return Named(s.status(), side.path);
    co_return s;
  }

  Task<Status> ReadInto(Side& side, uint64_t offset, uint64_t length) {
    co_return Named(co_await side.device->Read(offset, side.Span(length)), side.path);
  }

  std::vector<Task<Status>> MakeReads(uint64_t offset, uint64_t length) {
    std::vector<Task<Status>> reads;
    reads.push_back(ReadInto(a_, offset, length));
    reads.push_back(ReadInto(b_, offset, length));
    return reads;
  }

  // Whether [offset, offset + length) of `side` reads as zeros; if not, says
  // where it does not (exit_ stays kDifferent).
  Task<Result<bool>> ReadsAsZeros(Side& side, uint64_t offset, uint64_t length) {
    exit_ = kReadFailed;
    CO_RETURN_IF_ERROR(co_await ReadInto(side, offset, length));
    exit_ = kDifferent;
    if (auto at = FirstNonzeroSector(side.Span(length))) {
      Say(fmt::format("Content mismatch at offset {}!\n", offset + *at));
      co_return false;
    }
    co_return true;
  }

  // Declared first, destroyed last: the devices' files belong to it.
  std::unique_ptr<IoContext> io_;
  Side a_;
  Side b_;
  std::string format_a_;
  std::string format_b_;
  bool strict_ = false;
  bool progress_ = false;
  bool quiet_ = false;
  bool force_share_ = false;
  int exit_ = kIdentical;
  ProgressMeter meter_{nullptr};
};

}  // namespace

std::unique_ptr<Command> MakeCompareCommand() { return std::make_unique<CompareCommand>(); }

}  // namespace uq::tools
