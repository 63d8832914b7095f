#include "tools/bench_command.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <utility>

#include "base/aligned_buffer.h"
#include "base/task.h"
#include "base/wait_list.h"
#include "qcow2/block_device.h"
#include "qcow2/open_image.h"
#include "tools/image_key.h"
#include "tools/io_context.h"
#include "uring/ring.h"

namespace uq::tools {

// --- parsing ---

std::optional<uint64_t> ParseUnsigned(std::string_view text) {
  if (text.empty() || text.front() == '-' || text.front() == '+' ||
      std::isspace(static_cast<unsigned char>(text.front()))) {
    return std::nullopt;
  }
  std::string copy(text);
  errno = 0;
  char* end = nullptr;
  unsigned long long value = std::strtoull(copy.c_str(), &end, 0);
  if (errno != 0 || end != copy.c_str() + copy.size()) return std::nullopt;
  return static_cast<uint64_t>(value);
}

std::optional<uint64_t> ParseByteCount(std::string_view text) {
  size_t i = 0;
  unsigned __int128 whole = 0;
  size_t whole_digits = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    whole = whole * 10 + static_cast<unsigned>(text[i] - '0');
    if (whole > (unsigned __int128){INT64_MAX}) return std::nullopt;
    ++i;
    ++whole_digits;
  }
  unsigned __int128 fraction = 0;
  unsigned __int128 fraction_scale = 1;
  size_t fraction_digits = 0;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      if (fraction_digits < 18) {
        fraction = fraction * 10 + static_cast<unsigned>(text[i] - '0');
        fraction_scale *= 10;
      } else if (text[i] != '0') {
        return std::nullopt;  // more precision than any byte count needs
      }
      ++i;
      ++fraction_digits;
    }
    if (fraction_digits == 0) return std::nullopt;
  }
  if (whole_digits == 0) return std::nullopt;
  unsigned __int128 unit = 1;
  if (i < text.size()) {
    switch (text[i]) {
      case 'b':
      case 'B':
        unit = 1;
        break;
      case 'k':
      case 'K':
        unit = uint64_t{1} << 10;
        break;
      case 'm':
      case 'M':
        unit = uint64_t{1} << 20;
        break;
      case 'g':
      case 'G':
        unit = uint64_t{1} << 30;
        break;
      case 't':
      case 'T':
        unit = uint64_t{1} << 40;
        break;
      case 'p':
      case 'P':
        unit = uint64_t{1} << 50;
        break;
      case 'e':
      case 'E':
        unit = uint64_t{1} << 60;
        break;
      default:
        return std::nullopt;
    }
    ++i;
  }
  if (i != text.size()) return std::nullopt;
  const unsigned __int128 fraction_bytes = fraction * unit;
  if (fraction_bytes % fraction_scale != 0) return std::nullopt;  // not a whole byte
  const unsigned __int128 value = whole * unit + fraction_bytes / fraction_scale;
  if (value > (unsigned __int128){INT64_MAX}) return std::nullopt;
  return static_cast<uint64_t>(value);
}

namespace {

// A CLI11 check from one of the parsers above; `max` bounds the value.
CLI::Validator Checked(std::optional<uint64_t> (*parse)(std::string_view), uint64_t max,
                       std::string what) {
  return CLI::Validator(
      [parse, max, what](std::string& text) -> std::string {
        std::optional<uint64_t> value = parse(text);
        if (!value.has_value() || *value > max) return fmt::format("Invalid {} '{}'", what, text);
        return {};
      },
      "", what);
}

// Binds `flag` to `*target` through `parse`.
void AddParsed(CLI::App& app, const std::string& flag, uint64_t* target,
               std::optional<uint64_t> (*parse)(std::string_view), uint64_t max,
               const std::string& what, const std::string& help) {
  app.add_option_function<std::string>(
         flag, [target, parse](const std::string& text) { *target = *parse(text); }, help)
      ->check(Checked(parse, max, what))
      ->type_name(parse == &ParseByteCount ? "SIZE" : "N");
}

struct CacheMode {
  bool direct = false;      // O_DIRECT
  bool fua = false;         // every write durable on completion
  bool skip_flush = false;  // flushes do nothing
};

CacheMode ParseCacheMode(const std::string& name) {
  if (name == "none") return {true, false, false};
  if (name == "writethrough") return {false, true, false};
  if (name == "directsync") return {true, true, false};
  if (name == "unsafe") return {false, false, true};
  return {};  // writeback
}

constexpr uint64_t kMaxBufferBytes = uint64_t{4} << 30;

}  // namespace

void AddBenchFlags(CLI::App& app, BenchOptions& options) {
  app.add_option("IMAGE", options.image, "The image to benchmark")->required();
  AddParsed(app, "-c,--count", &options.count, &ParseUnsigned, INT_MAX, "request count",
            "Requests to send (default 75000)");
  AddParsed(app, "-d,--depth", &options.depth, &ParseUnsigned, INT_MAX, "queue depth",
            "Requests in flight (default 64)");
  app.add_option("-f,--format", options.format, "IMAGE's format (default: probe)")
      ->check(CLI::IsMember({"qcow2", "raw"}));
  AddParsed(app, "-s,--size", &options.size, &ParseByteCount, INT_MAX, "buffer size",
            "Bytes per request (default 4096; k, M, G suffixes)");
  AddParsed(app, "-S,--step", &options.step, &ParseByteCount, INT_MAX, "step size",
            "Distance between consecutive offsets (default: the request size)");
  AddParsed(app, "-o,--offset", &options.offset, &ParseByteCount, INT64_MAX, "offset",
            "Offset of the first request (default 0)");
  app.add_flag("-w,--write", options.write, "Write (the --pattern byte) instead of reading");
  AddParsed(app, "--pattern", &options.pattern, &ParseUnsigned, 0xff, "pattern byte",
            "The byte every write carries (default 0)");
  AddParsed(app, "--flush-interval", &options.flush_interval, &ParseUnsigned, INT_MAX,
            "flush interval", "Flush every N requests (write tests only; N >= depth)");
  app.add_flag_callback(
      "--no-drain", [&options] { options.drain = false; },
      "Flush without first waiting for the requests in flight");
  app.add_option("-t,--cache", options.cache,
                 "Cache mode: none (O_DIRECT), writeback, writethrough (FUA writes), "
                 "directsync (both), unsafe (flushes do nothing)")
      ->check(CLI::IsMember({"none", "writeback", "writethrough", "directsync", "unsafe"}))
      ->capture_default_str();
  app.add_option("-i,--aio", options.aio,
                 "io_uring (the device path's ring), or threads: blocking syscalls on this "
                 "thread, one request at a time")
      ->check(CLI::IsMember({"io_uring", "threads"}))
      ->capture_default_str();
  app.add_flag("-q,--quiet", options.quiet, "Leave out the 'Sending ...' lines");
  app.add_flag("-U,--force-share", options.force_share, "Take no image locks");
  app.add_flag("--random", options.random,
               "Uniformly random offsets OFFSET + k*STEP inside the image (fixed seed)");
  AddParsed(app, "--seed", &options.seed, &ParseUnsigned, UINT64_MAX, "seed",
            "Seed of --random (default 1)");
  AddParsed(app, "--cache-size", &options.cache_size, &ParseByteCount, INT64_MAX, "cache size",
            "Metadata cache bytes per image of the chain (default 32M)");
  AddParsed(app, "--preallocate", &options.preallocate, &ParseByteCount, INT64_MAX, "preallocation",
            "Grow the image file this far ahead of allocating writes, as the device does "
            "(default 64M; 0: off)");
  app.add_flag("--stable-metadata", options.stable_metadata,
               "Acknowledge writes that change metadata once it is in the file, as a device "
               "with user recovery (add --recovery) does");
  app.add_option("--poll-us", options.poll_us,
                 "Busy-poll the ring up to this long (microseconds; an adaptive window) before "
                 "sleeping, as add --poll-us (default 0: off)")
      ->check(CLI::Range(0, 1000000));
  app.footer(
      "Like qemu-img bench: prints 'Sending ...' and 'Run completed in T seconds.', then\n"
      "'IOPS: N, MiB/s: M'. Offsets wrap at the end of the image; a request that would\n"
      "cross it starts over at offset 0.");
  app.callback([&options] {
    Status status = CheckBenchOptions(options);
    if (!status.ok()) throw CLI::ValidationError(status.message());
  });
}

Status CheckBenchOptions(const BenchOptions& options) {
  if (options.depth == 0) return Status::InvalidArgument("Invalid queue depth specified: 0");
  if (options.size == 0) return Status::InvalidArgument("Invalid buffer size specified: 0");
  if (!options.write && options.flush_interval != 0) {
    return Status::InvalidArgument("--flush-interval is only available in write tests");
  }
  if (options.flush_interval != 0 && options.flush_interval < options.depth) {
    return Status::InvalidArgument("Flush interval can't be smaller than depth");
  }
  if (options.depth * options.size > kMaxBufferBytes) {
    return Status::InvalidArgument(
        fmt::format("depth {} x size {} needs more than {} bytes of buffers", options.depth,
                    options.size, kMaxBufferBytes));
  }
  return Status::Ok();
}

// --- offsets ---

OffsetSequence::OffsetSequence(const BenchOptions& options, uint64_t image_size)
    : image_size_(image_size),
      size_(options.size),
      step_(options.step != 0 ? options.step : options.size),
      start_(options.offset),
      next_(options.offset),
      random_(options.random),
      rng_state_(options.seed) {
  if (random_) slots_ = (image_size_ - start_ - size_) / step_ + 1;
}

Status OffsetSequence::ValidateFirstOffset(const BenchOptions& options, uint64_t image_size) {
  if (options.offset > image_size || image_size - options.offset < options.size) {
    return Status::InvalidArgument(
        fmt::format("offset {} + size {} lies beyond the end of the image ({} bytes)",
                    options.offset, options.size, image_size));
  }
  return Status::Ok();
}

uint64_t OffsetSequence::Next() {
  if (random_) return NextRandom();
  const uint64_t offset = next_;
  // qemu-img: offset += step; offset %= image_size. A request that would then
  // cross the end of the image starts over at 0 instead of failing.
  uint64_t next = (next_ + step_) % image_size_;
  if (image_size_ - next < size_) next = 0;
  next_ = next;
  return offset;
}

uint64_t OffsetSequence::NextRandom() {
  // splitmix64, then Lemire's multiply-shift onto [0, slots_): the same
  // sequence on every machine and library.
  uint64_t z = (rng_state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  const uint64_t k = static_cast<uint64_t>((static_cast<unsigned __int128>(z) * slots_) >> 64);
  return start_ + k * step_;
}

// --- schedule ---

BenchSchedule::BenchSchedule(uint64_t count, uint64_t depth, uint64_t flush_interval, bool drain)
    : remaining_(count), depth_(depth), flush_interval_(flush_interval), drain_(drain) {}

BenchSchedule::Flush BenchSchedule::Completed() {
  const uint64_t unsent = remaining_ - in_flight_;
  --remaining_;
  --in_flight_;
  if (flush_interval_ == 0 || unsent % flush_interval_ != 0) return Flush::kNone;
  if (!drain_) return Flush::kUndrained;
  if (in_flight_ > 0) {
    draining_ = true;
    return Flush::kNone;
  }
  draining_ = false;
  in_flush_ = true;
  return Flush::kDrained;
}

// --- the run ---

namespace {

using Clock = std::chrono::steady_clock;

// Shared by the workers of one run; lives in RunRequests' frame, which
// outlives them (it waits until the last one is done).
struct BenchRun {
  qcow2::BlockDevice* device = nullptr;
  bool write = false;
  CacheMode cache;
  BenchSchedule schedule;
  OffsetSequence offsets;
  Status error;  // the first failure
  int active_workers = 0;
  int background_flushes = 0;
  WaitList resume;    // workers waiting for a drained flush
  WaitList finished;  // RunRequests, waiting for the workers
  Clock::time_point end;
  bool ended = false;

  void Fail(Status status) {
    if (error.ok()) error = std::move(status);
  }
  bool Idle() const { return active_workers == 0 && background_flushes == 0; }
};

Task<Status> FlushDevice(BenchRun& run) {
  if (run.cache.skip_flush) co_return Status::Ok();
  Status status = co_await run.device->Flush();
  co_return status.WithContext("flush");
}

Task<void> BackgroundFlush(BenchRun* run) {
  Status status = co_await FlushDevice(*run);
  if (!status.ok()) run->Fail(std::move(status));
  // Last touch of `run` (see Worker).
  if (--run->background_flushes == 0 && run->active_workers == 0) run->finished.NotifyAll();
}

// One of DEPTH request slots, with its own buffer: sends requests while the
// schedule allows, qemu-img's bench_cb() turned into a loop.
Task<void> Worker(BenchRun* run, std::span<std::byte> buffer) {
  while (run->error.ok()) {
    if (!run->schedule.CanIssue()) {
      if (!run->schedule.paused()) break;
      co_await run->resume.Wait();
      continue;
    }
    run->schedule.Issued();
    const uint64_t offset = run->offsets.Next();
    Status status;
    // As a ublk queue does (driver TryServeHere): a request on clusters whose
    // mapping the engine has published is served without the engine.
    std::optional<Task<Status>> here;
    if (!run->write || !run->cache.fua)
      here = run->device->TryAnyThread(run->write, offset, buffer);
    if (here) {
      status = co_await std::move(*here);
    } else if (run->write) {
      status = co_await run->device->Write(offset, buffer, run->cache.fua);
    } else {
      status = co_await run->device->Read(offset, buffer);
    }
    if (!status.ok()) {
      run->Fail(status.WithContext(fmt::format(
          "{} of {} bytes at offset {}", run->write ? "write" : "read", buffer.size(), offset)));
    }
    const BenchSchedule::Flush flush = run->schedule.Completed();
    if (run->schedule.done() && !run->ended) {
      run->end = Clock::now();
      run->ended = true;
    }
    if (flush == BenchSchedule::Flush::kDrained) {
      Status flushed = co_await FlushDevice(*run);
      if (!flushed.ok()) run->Fail(std::move(flushed));
      run->schedule.FlushDone();
      run->resume.NotifyAll();
    } else if (flush == BenchSchedule::Flush::kUndrained) {
      ++run->background_flushes;
      Spawn(BackgroundFlush(run));
    }
  }
  // Last touch of `run`: waking RunRequests may end the run, and its frame
  // with `run`, before NotifyAll() returns here.
  if (--run->active_workers == 0 && run->background_flushes == 0) run->finished.NotifyAll();
}

// Sends every request; returns the seconds from the first request to the
// completion of the last one.
Task<Result<double>> RunRequests(qcow2::BlockDevice& device, const BenchOptions& options,
                                 CacheMode cache, std::span<std::byte> buffers) {
  BenchRun run{.device = &device,
               .write = options.write,
               .cache = cache,
               .schedule = BenchSchedule(options.count, options.depth, options.flush_interval,
                                         options.drain),
               .offsets = OffsetSequence(options, device.size())};
  const uint64_t workers = std::min(options.depth, options.count);
  run.active_workers = static_cast<int>(workers);
  const Clock::time_point start = Clock::now();
  // With synchronous I/O the first worker sends everything before the others
  // start (and find nothing to do).
  for (uint64_t i = 0; i < workers; ++i) {
    Spawn(Worker(&run, buffers.subspan(i * options.size, options.size)));
  }
  while (!run.Idle()) co_await run.finished.Wait();
  if (!run.error.ok()) co_return std::move(run.error);
  const Clock::time_point end = run.ended ? run.end : start;
  co_return std::chrono::duration<double>(end - start).count();
}

// Ring entries for DEPTH requests: a request may take several SQEs (a
// cluster boundary, copy-on-write), and GetSqe() submits early when full.
uint32_t RingEntries(uint64_t depth) {
  uint64_t entries = 64;
  while (entries < depth * 2 && entries < 4096) entries *= 2;
  return static_cast<uint32_t>(entries);
}

class BenchCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override { AddBenchFlags(app, options_); }
  Status Run() override { return RunBench(options_); }

 private:
  BenchOptions options_;
};

}  // namespace

Status RunBench(const BenchOptions& options) {
  RETURN_IF_ERROR(CheckBenchOptions(options));
  const IoMode mode = options.aio == "threads" ? IoMode::kSync : IoMode::kUring;
  ASSIGN_OR_RETURN(std::unique_ptr<IoContext> io,
                   IoContext::Create(mode, RingEntries(options.depth), options.poll_us));
  if (options.poll_us > 0 && io->spin_us() == 0) {
    std::fprintf(stderr, "ublk-qcow2 bench: --poll-us ignored: %s\n",
                 io->uses_uring() ? uring::kNoBusyPolling : "no io_uring (-i threads)");
  }
  const CacheMode cache = ParseCacheMode(options.cache);

  qcow2::ImageOptions image_options;

  UseImageKey(image_options);
  image_options.env = io->env();
  image_options.format = options.format;
  image_options.writable = options.write;
  image_options.direct = cache.direct;
  image_options.cache_size = options.cache_size;
  image_options.preallocate = options.preallocate;
  image_options.lock = !options.force_share;
  image_options.stable_metadata = options.stable_metadata;
  ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                   io->Run(qcow2::OpenImage(options.image, image_options)));

  Status fits = OffsetSequence::ValidateFirstOffset(options, device->size());
  if (!fits.ok()) {
    (void)io->Run(device->Close());
    return fits;
  }
  const uint64_t step = options.step != 0 ? options.step : options.size;
  if (!options.quiet) {
    std::printf(
        "Sending %llu %s requests, %llu bytes each, %llu in parallel "
        "(starting at offset %llu, step size %llu)\n",
        static_cast<unsigned long long>(options.count), options.write ? "write" : "read",
        static_cast<unsigned long long>(options.size),
        static_cast<unsigned long long>(options.depth),
        static_cast<unsigned long long>(options.offset), static_cast<unsigned long long>(step));
    if (options.flush_interval != 0) {
      std::printf("Sending flush every %llu requests\n",
                  static_cast<unsigned long long>(options.flush_interval));
    }
    if (options.random) {
      std::printf("Random offsets (seed %llu)\n", static_cast<unsigned long long>(options.seed));
    }
    std::fflush(stdout);
  }

  AlignedBuffer buffers(options.depth * options.size);
  std::memset(buffers.data(), static_cast<int>(options.pattern), buffers.size());
  Result<double> seconds = io->Run(RunRequests(*device, options, cache, buffers.span()));
  // Close (flush, clean) even after a failure; the run's error comes first.
  Status closed = io->Run(device->Close());
  if (!seconds.ok()) return seconds.status();
  RETURN_IF_ERROR(closed);

  const double t = *seconds;
  const double iops = t > 0 ? static_cast<double>(options.count) / t : 0;
  const double mib = iops * static_cast<double>(options.size) / (1 << 20);
  std::printf("Run completed in %3.3f seconds.\n", t);
  std::printf("IOPS: %.0f, MiB/s: %.2f\n", iops, mib);
  return Status::Ok();
}

std::unique_ptr<Command> MakeBenchCommand() { return std::make_unique<BenchCommand>(); }

}  // namespace uq::tools
