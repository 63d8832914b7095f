// `ublk-qcow2 bench`: qemu-img bench on our engine, so the two can run side
// by side on the same image with the same flags.
//
//   ublk-qcow2 bench [-c COUNT] [-d DEPTH] [-f qcow2|raw] [-s SIZE] [-S STEP]
//                    [-o OFFSET] [-w] [--pattern=N] [--flush-interval=N]
//                    [--no-drain] [-t none|writeback|writethrough|directsync|unsafe]
//                    [-i io_uring|threads] [-q] [-U] [--random] [--seed=N]
//                    [--cache-size=SIZE] [--preallocate=SIZE] IMAGE
//
// Sends COUNT requests of SIZE bytes, DEPTH in flight, at offsets OFFSET,
// OFFSET+STEP, ... (STEP defaults to SIZE), wrapping at the end of the image
// like qemu-img bench; -w writes (every byte = the --pattern byte) instead of
// reading. --flush-interval=N flushes every N requests, first letting the
// requests in flight drain unless --no-drain. The requests go through the
// same path as the ublk device's: OpenImage() with the io_uring Env, the
// engine's BlockDevice::Read/Write, the calling thread's uring::Ring.
//
// Differences from qemu-img bench (7.2), all documented in --help:
//   --random     offsets drawn uniformly from OFFSET + k*STEP inside the image
//                (fixed seed, --seed to change it) instead of walking them.
//   --cache-size metadata cache bytes per image (ImageOptions::cache_size).
//   --preallocate grow the image file ahead of allocating writes, as the
//                device does (ImageOptions::preallocate; default 64M, 0: off).
//   --stable-metadata acknowledge writes that change metadata once it is in
//                the file, as a device with user recovery does
//                (ImageOptions::stable_metadata).
//   -i threads   blocking syscalls on the calling thread (we have no thread
//                pool): requests complete one at a time whatever DEPTH says.
//   -q           leaves out the "Sending ..." lines; results always print.
//   wrapping     a request that would cross the end of the image starts over
//                at offset 0 (qemu-img sends it and fails with EIO).
// Output: qemu-img's lines, then "IOPS: N, MiB/s: M". The clock stops when
// the last request completes (a final drained flush is not timed, as in
// qemu-img); Close() runs after the clock stops.
//
// Thread model: everything runs on the calling thread's event loop.
#ifndef UBLK_QCOW2_TOOLS_BENCH_COMMAND_H_
#define UBLK_QCOW2_TOOLS_BENCH_COMMAND_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "base/status.h"
#include "tools/command.h"

namespace uq::tools {

struct BenchOptions {
  std::string image;
  std::string format;                  // "", "qcow2" or "raw"
  uint64_t count = 75000;              // -c
  uint64_t depth = 64;                 // -d
  uint64_t size = 4096;                // -s, bytes per request
  uint64_t step = 0;                   // -S, 0: size
  uint64_t offset = 0;                 // -o, first request
  bool write = false;                  // -w
  uint64_t pattern = 0;                // --pattern, the byte written
  uint64_t flush_interval = 0;         // --flush-interval, 0: never
  bool drain = true;                   // !--no-drain
  std::string cache = "writeback";     // -t
  std::string aio = "io_uring";        // -i
  bool quiet = false;                  // -q
  bool force_share = false;            // -U: take no image locks
  bool random = false;                 // --random
  uint64_t seed = 1;                   // --seed
  uint64_t cache_size = 32ull << 20;   // --cache-size
  uint64_t preallocate = 64ull << 20;  // --preallocate (ImageOptions::preallocate)
  uint32_t poll_us = 0;                // --poll-us (RingOptions::spin_us)
  bool stable_metadata = false;        // --stable-metadata
};

// qemu's cvtnum(): a decimal byte count with an optional binary suffix,
// b/B (bytes), k/K, M/m, G/g, T/t, P/p, E/e (powers of 1024). A fraction is
// allowed with a suffix ("1.5M"); the result must be a whole byte count.
// nullopt when malformed or over 2^63 - 1.
std::optional<uint64_t> ParseByteCount(std::string_view text);

// qemu_strtoul(base 0): decimal, 0x hex or 0 octal, nothing after it.
std::optional<uint64_t> ParseUnsigned(std::string_view text);

// Declares bench's flags on `app`, bound to `options`, with per-flag checks
// (a bad value is a usage error) and qemu-img's cross-flag checks as the
// subcommand's callback (CLI::ValidationError, also a usage error).
void AddBenchFlags(CLI::App& app, BenchOptions& options);

// The cross-flag checks: --flush-interval only with -w and not below DEPTH,
// COUNT/DEPTH/SIZE not zero, --random with a step that fits. InvalidArgument
// naming the flag.
Status CheckBenchOptions(const BenchOptions& options);

// Where requests go, in order. Sequential (qemu-img's walk) or --random.
class OffsetSequence {
 public:
  // REQUIRES: CheckBenchOptions(options) ok; options.offset + options.size
  // <= image_size (ValidateFirstOffset says so).
  OffsetSequence(const BenchOptions& options, uint64_t image_size);

  // The offset of the next request.
  uint64_t Next();

  // OK if the first request fits in an image of `image_size` bytes, else
  // InvalidArgument naming the offset.
  static Status ValidateFirstOffset(const BenchOptions& options, uint64_t image_size);

 private:
  uint64_t NextRandom();

  uint64_t image_size_;
  uint64_t size_;
  uint64_t step_;
  uint64_t start_;
  uint64_t next_;
  bool random_;
  uint64_t slots_ = 0;  // --random: how many offsets start_ + k*step_ fit
  uint64_t rng_state_;
};

// qemu-img bench's bench_cb() as a state machine, without the I/O: who may
// start a request, and when to flush. COUNT requests, at most DEPTH in
// flight. With a flush interval, once the number of requests not yet sent
// is a multiple of it (zero included, so the run ends with a flush), a
// completion triggers a flush: drained, no new request starts until the
// requests in flight have completed and the flush with them; undrained, the
// flush runs alongside the requests (one per completion that hits the
// condition, as qemu-img does).
class BenchSchedule {
 public:
  enum class Flush { kNone, kDrained, kUndrained };

  BenchSchedule(uint64_t count, uint64_t depth, uint64_t flush_interval, bool drain);

  // Whether a request may start now.
  bool CanIssue() const {
    return !draining_ && !in_flush_ && remaining_ > in_flight_ && in_flight_ < depth_;
  }
  // A request started. REQUIRES: CanIssue().
  void Issued() { ++in_flight_; }
  // A request completed. Returns the flush to start now, if any; kDrained
  // blocks issuing until FlushDone().
  Flush Completed();
  // The drained flush completed.
  void FlushDone() { in_flush_ = false; }

  // Every request completed.
  bool done() const { return remaining_ == 0; }
  // Whether a request that cannot start now may start later (draining or
  // flushing, with requests left to send).
  bool paused() const { return (draining_ || in_flush_) && remaining_ > in_flight_; }
  uint64_t in_flight() const { return in_flight_; }
  uint64_t remaining() const { return remaining_; }

 private:
  uint64_t remaining_;  // requests not yet completed (qemu-img's n)
  uint64_t in_flight_ = 0;
  const uint64_t depth_;
  const uint64_t flush_interval_;
  const bool drain_;
  bool draining_ = false;  // waiting for in_flight_ to reach 0 before a flush
  bool in_flush_ = false;  // the drained flush is running
};

// Runs the benchmark, printing on stdout. Errors: the image cannot be opened,
// the first offset lies outside it, a request or flush failed (the first
// error, naming the offset).
Status RunBench(const BenchOptions& options);

std::unique_ptr<Command> MakeBenchCommand();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_BENCH_COMMAND_H_
