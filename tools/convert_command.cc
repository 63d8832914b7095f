#include "tools/convert_command.h"

#include <fmt/format.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <optional>
#include <utility>

#include "qcow2/create/create.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "tools/image_copy.h"
#include "tools/image_key.h"
#include "tools/io_context.h"
#include "tools/progress.h"
#include "tools/qcow2_copy.h"

namespace uq::tools {
namespace {

constexpr uint64_t kChunkSize = uint64_t{1} << 20;
constexpr uint64_t kSparseBlock = 4096;

std::optional<struct stat> StatPath(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return st;
}

// The output file, opened and sized for `size` bytes of data.
struct Target {
  std::unique_ptr<qcow2::File> file;
  bool zeroed = false;   // reads as zeros everywhere (created or truncated)
  bool syncable = true;  // not a character device or FIFO
};

Result<Target> OpenTarget(qcow2::Env* env, const std::string& path, uint64_t size) {
  std::optional<struct stat> st = StatPath(path);
  Target target;
  if (!st.has_value() || S_ISREG(st->st_mode)) {
    qcow2::OpenOptions options;
    options.writable = true;
    options.create = true;
    options.truncate = true;
    ASSIGN_OR_RETURN(target.file, env->Open(path, options));
    RETURN_IF_ERROR(target.file->Truncate(size));
    target.zeroed = true;
    return target;
  }
  // A device (or FIFO...): keep it, write every byte range, zeros included.
  qcow2::OpenOptions options;
  options.writable = true;
  ASSIGN_OR_RETURN(target.file, env->Open(path, options));
  target.syncable = S_ISBLK(st->st_mode);
  if (S_ISBLK(st->st_mode)) {
    uint64_t device_size = 0;
    if (::ioctl(target.file->fd(), BLKGETSIZE64, &device_size) != 0) {
      return Status::FromErrno(errno, fmt::format("{}: BLKGETSIZE64", path));
    }
    if (device_size < size) {
      return Status::NoSpace(
          fmt::format("{}: device holds {} bytes, the image needs {}", path, device_size, size));
    }
  }
  return target;
}

// Keeps the progress line (if any) and the error message on separate lines.
void EndProgressLineOnError(bool progress) {
  if (progress) {
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }
}

class ConvertCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", options_.source, "The image to read")->required();
    app.add_option("OUTPUT", options_.target, "The file to write (created or truncated)")
        ->required();
    app.add_option("-f,--format", options_.source_format, "IMAGE's format (default: probe)")
        ->check(CLI::IsMember({"qcow2", "raw"}));
    app.add_option("-O,--output-format", options_.target_format, "OUTPUT's format")
        ->check(CLI::IsMember({"raw", "qcow2"}))
        ->capture_default_str();
    app.add_flag("-c,--compress", options_.compress, "Write compressed clusters (-O qcow2)");
    app.add_option(
        "-o,--options", options_.create_options,
        "qemu-img create options for a qcow2 OUTPUT (cluster_size=64k,compression_type=zstd,...)");
    app.add_flag("-p,--progress", options_.progress, "Show progress on stdout");
    app.add_option("-m,--parallel", options_.parallel, "Chunks of 1 MiB in flight")
        ->check(CLI::Range(1, 256))
        ->capture_default_str();
    app.add_option("--io", options_.io,
                   "I/O engine: io_uring if available (auto), io_uring or fail (uring), "
                   "blocking syscalls (sync)")
        ->check(CLI::IsMember({"auto", "uring", "sync"}))
        ->capture_default_str();
    app.add_flag("--bitmaps", options_.bitmaps,
                 "Copy IMAGE's persistent bitmaps too (-O qcow2, as qemu-img)");
    app.add_flag("--skip-broken-bitmaps", options_.skip_broken_bitmaps,
                 "With --bitmaps: leave out bitmaps in use (inconsistent) instead of failing");
    app.add_flag("-U,--force-share", options_.force_share,
                 "Take no locks on IMAGE and its backing files: read an image another process "
                 "writes (the copy may then be inconsistent)");
  }

  Status Run() override { return RunConvert(options_); }

 private:
  ConvertOptions options_;
};

}  // namespace

namespace {

// --bitmaps: what qemu-img refuses before it creates the output.
Status CheckBitmapsCopyable(const ConvertOptions& options, qcow2::BlockDevice& source) {
  if (options.target_format != "qcow2") {
    return Status::NotSupported(
        fmt::format("Format driver '{}' does not support bitmaps", options.target_format));
  }
  auto* image = dynamic_cast<qcow2::Qcow2Image*>(&source);
  if (image == nullptr) return Status::Ok();
  // QEMU walks its list newest first: the last inconsistent one is named.
  const std::vector<qcow2::BitmapSummary> list = image->bitmaps();
  for (auto it = list.rbegin(); it != list.rend(); ++it) {
    if (it->in_use && !options.skip_broken_bitmaps) {
      return Status::InvalidArgument(fmt::format("Cannot copy inconsistent bitmap '{}'", it->name));
    }
  }
  return Status::Ok();
}

// Each of the source's bitmaps, as it is, into the new image (stored by its
// Close); one in use only with --skip-broken-bitmaps, which leaves it out.
Status CopyBitmaps(IoContext& io, qcow2::BlockDevice& source, qcow2::Qcow2Image& target) {
  auto* image = dynamic_cast<qcow2::Qcow2Image*>(&source);
  if (image == nullptr) return Status::Ok();
  for (const qcow2::BitmapSummary& b : image->bitmaps()) {
    if (b.in_use) {
      std::fprintf(stderr, "ublk-qcow2: warning: Skipping inconsistent bitmap '%s'\n",
                   b.name.c_str());
      continue;
    }
    ASSIGN_OR_RETURN(std::shared_ptr<const qcow2::DirtyBitmap> bits,
                     io.Run(image->BitmapContents(b.name)));
    Status st = target.AddBitmap(b.name, b.granularity, b.enabled);
    if (st.ok()) st = io.Run(target.MergeBitmap(b.name, *bits));
    if (!st.ok()) return st.WithContext(target.path());
  }
  return Status::Ok();
}

}  // namespace

// convert -O qcow2: create the output like `qemu-img create`, then copy
// through its write path (compressed with -c).
Status ConvertToQcow2(const ConvertOptions& options, IoContext& io, qcow2::BlockDevice& source) {
  qcow2::CreateOptions create;
  create.path = options.target;
  create.size = source.size();
  // Option errors name the output, as qemu-img's ("y.qcow2: error while
  // converting qcow2: ...") and our create's do.
  Result<qcow2::CreateOptions> parsed = qcow2::ParseCreateOptions(options.create_options, create);
  if (!parsed.ok()) return parsed.status().WithContext(options.target);
  create = std::move(parsed).value();
  std::shared_ptr<const qcow2::crypto::SecretBytes> target_key;
  if (create.encrypt) {
    Result<std::shared_ptr<const qcow2::crypto::SecretBytes>> key =
        NewImageKey(create.encrypt->key_secret);
    if (!key.ok()) return key.status().WithContext(options.target);
    create.passphrase = target_key = *key;
  }
  if (options.compress && create.data_file) {
    return Status::InvalidArgument(
        fmt::format("{}: compression is not possible with an external data file", options.target));
  }
  if (options.bitmaps && create.compat != "1.1") {
    return Status::NotSupported("Format driver 'qcow2' does not support bitmaps");
  }
  if (Status st = io.Run(qcow2::CreateImage(io.env(), create)); !st.ok()) {
    // Name the output, as qemu-img does, unless the message already does.
    if (st.message().starts_with(options.target + ":")) return st;
    return st.WithContext(options.target);
  }
  qcow2::ImageOptions image_options;
  // The new image opens with the key it was made with.
  image_options.key = target_key;
  image_options.env = io.env();
  image_options.format = "qcow2";
  image_options.writable = true;
  image_options.no_backing = true;  // a new image: nothing shows through
  ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> target,
                   io.Run(qcow2::OpenImage(options.target, image_options)));
  auto* image = static_cast<qcow2::Qcow2Image*>(target.get());
  ProgressMeter meter(options.progress ? stdout : nullptr);
  meter.Start();
  Qcow2CopyOptions copy;
  copy.compress = options.compress;
  copy.parallel = options.parallel;
  copy.on_progress = [&meter](uint64_t done, uint64_t total) { meter.Update(done, total); };
  Status copied = io.Run(CopyToQcow2(source, *image, std::move(copy)));
  if (copied.ok() && options.bitmaps) copied = CopyBitmaps(io, source, *image);
  Status closed = io.Run(target->Close());
  if (!copied.ok()) {
    EndProgressLineOnError(options.progress);
    return copied;
  }
  meter.Finish();
  return closed;
}

Status RunConvert(const ConvertOptions& options) {
  if (options.skip_broken_bitmaps && !options.bitmaps) {
    return Status::InvalidArgument("Use of --skip-broken-bitmaps requires --bitmaps");
  }
  if (options.compress && options.target_format != "qcow2") {
    return Status::InvalidArgument("convert -c needs -O qcow2");
  }
  std::optional<IoMode> mode = ParseIoMode(options.io);
  if (!mode.has_value())
    return Status::InvalidArgument(fmt::format("unknown --io '{}'", options.io));

  std::optional<struct stat> source_st = StatPath(options.source);
  std::optional<struct stat> target_st = StatPath(options.target);
  if (source_st && target_st && source_st->st_dev == target_st->st_dev &&
      source_st->st_ino == target_st->st_ino) {
    return Status::InvalidArgument(
        fmt::format("{}: the output is the input image itself", options.target));
  }

  ASSIGN_OR_RETURN(std::unique_ptr<IoContext> io, IoContext::Create(*mode));

  qcow2::ImageOptions image_options;

  UseImageKey(image_options);
  image_options.env = io->env();
  image_options.format = options.source_format;
  image_options.lock = !options.force_share;
  ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> source,
                   io->Run(qcow2::OpenImage(options.source, image_options)));

  if (options.bitmaps) {
    Status st = CheckBitmapsCopyable(options, *source);
    if (!st.ok()) {
      (void)io->Run(source->Close());
      return st;
    }
  }
  if (options.target_format == "qcow2") {
    Status converted = ConvertToQcow2(options, *io, *source);
    Status closed = io->Run(source->Close());
    return converted.ok() ? closed : converted;
  }
  // The image opened: only now touch (create, truncate) the output.
  ASSIGN_OR_RETURN(Target target, OpenTarget(io->env(), options.target, source->size()));

  ProgressMeter meter(options.progress ? stdout : nullptr);
  meter.Start();
  CopyOptions copy;
  copy.parallel = options.parallel;
  copy.chunk_size = kChunkSize;
  copy.sparse_block = kSparseBlock;
  copy.target_zeroed = target.zeroed;
  copy.sync = target.syncable;
  copy.on_progress = [&meter](uint64_t done, uint64_t total) { meter.Update(done, total); };
  Result<CopyStats> copied = io->Run(CopyToFile(*source, *target.file, std::move(copy)));
  if (!copied.ok()) {
    EndProgressLineOnError(options.progress);
    // Close the image anyway; the copy's error is the one to report.
    (void)io->Run(source->Close());
    return copied.status();
  }
  meter.Finish();
  return io->Run(source->Close());
}

std::unique_ptr<Command> MakeConvertCommand() { return std::make_unique<ConvertCommand>(); }

}  // namespace uq::tools
