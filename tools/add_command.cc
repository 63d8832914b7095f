#include "tools/add_command.h"

#include <fmt/format.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "driver/control.h"
#include "driver/daemon.h"
#include "qcow2/open_image.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"
#include "tools/io_context.h"
#include "tools/serve_device.h"

namespace uq::tools {
namespace {

// Opens and closes the image the way the daemon will, so that its errors
// come out here, before anything is created.
Status ValidateImage(const AddOptions& options, const std::string& path, bool direct) {
  ASSIGN_OR_RETURN(std::unique_ptr<IoContext> io, IoContext::Create(IoMode::kAuto));
  qcow2::ImageOptions image_options;
  UseImageKey(image_options);
  image_options.env = io->env();
  image_options.writable = !options.read_only;
  image_options.cache_size = options.cache_size;
  image_options.direct = direct;
  ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> image,
                   io->Run(qcow2::OpenImage(path, image_options)));
  return io->Run(image->Close());
}

// Threads per queue from --nthreads (0: one per queue).
unsigned ThreadsPerQueue(const AddOptions& options) {
  return options.nthreads <= 0 ? 1 : static_cast<unsigned>(options.nthreads / options.queues);
}

class AddCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("-f,--file", options_.image, "The image to serve (qcow2 or raw)")->required();
    AddDeviceIdOption(app, options_.id,
                      "Device number N for /dev/ublkbN (default: the lowest free)");
    app.add_option("-q,--queues", options_.queues, "Hardware queues (at most the CPU count)")
        ->check(CLI::Range(1, 64))
        ->capture_default_str();
    app.add_option("--nthreads", options_.nthreads,
                   "Threads serving the queues: a multiple of --queues; above it each queue's "
                   "tags are shared among its threads (needs UBLK_F_PER_IO_DAEMON; default: "
                   "one per queue)")
        ->check(CLI::Range(1, 256));
    app.add_option("-d,--depth", options_.depth, "Requests in flight per queue")
        ->check(CLI::Range(1, UBLK_MAX_QUEUE_DEPTH))
        ->capture_default_str();
    app.add_flag("--read-only", options_.read_only, "Serve the image read-only");
    app.add_flag("--foreground", options_.foreground,
                 "Serve from this process until the device is deleted or a signal arrives");
    app.add_option("--cache", options_.cache,
                   "Host page cache for the image files: none (O_DIRECT) or writeback")
        ->check(CLI::IsMember({"none", "writeback"}))
        ->capture_default_str();
    app.add_option("--preallocate", options_.preallocate,
                   "Grow the image file this far ahead of allocating writes (K, M, G; 0: off)")
        ->transform(CLI::AsSizeValue(false))
        ->capture_default_str();
    app.add_option("--max-io", options_.max_io,
                   "Largest request the device takes, bytes (K, M suffixes; a multiple of 4K). "
                   "Each tag of each queue gets a buffer this big, touched as requests use it")
        ->transform(CLI::AsSizeValue(false))
        ->check(CLI::Range(uint64_t{4096}, uint64_t{32} << 20))
        ->capture_default_str();
    app.add_option("--poll-us", options_.poll_us,
                   "Busy-poll each queue's ring up to this long (microseconds; an adaptive "
                   "window) before its thread sleeps: lower latency at low queue depth, for CPU "
                   "spent while the device is in use (0: off)")
        ->check(CLI::Range(0, 1000000))
        ->capture_default_str();
    app.add_option("--recovery", options_.recovery,
                   "When the daemon dies: reissue (I/O waits for 'recover -n N', default where "
                   "the kernel offers it), fail-io (I/O fails until then; Linux 6.13+), off (I/O "
                   "fails, the device goes)")
        ->check(CLI::IsMember({"reissue", "fail-io", "off"}));
    app.add_option("--timeout", options_.timeout_s,
                   "Seconds to wait for the daemon to report the device live; then it is "
                   "killed and the device removed (not with --foreground)")
        ->check(CLI::Range(1, 3600))
        ->capture_default_str();
    app.add_flag("--no-partition-scan", options_.no_partition_scan,
                 "The kernel does not scan the device for partitions when it starts "
                 "(UBLK_F_NO_AUTO_PART_SCAN, Linux 7.0+; an error where the kernel lacks it)");
    app.add_option("--zero-copy", options_.zero_copy,
                   "Move the data of reads and writes of allocated clusters between the "
                   "request's pages and the image file, no copy through the daemon: auto (where "
                   "the kernel offers UBLK_F_AUTO_BUF_REG, Linux 6.16+), on (an error elsewhere), "
                   "off")
        ->check(CLI::IsMember({"auto", "on", "off"}))
        ->capture_default_str();
    app.add_flag("--batch-io", options_.batch_io,
                 "Serve the queues with ublk's batch commands (UBLK_F_BATCH_IO, Linux 7.0+; an "
                 "error where the kernel lacks it): one command readies and one commits many "
                 "requests. Experimental, off by default; not with --nthreads or upgrade");
    app.add_option("--cache-size", options_.cache_size,
                   "Metadata cache per image of the chain, bytes (K, M, G suffixes)")
        ->transform(CLI::AsSizeValue(false))
        ->capture_default_str();
    app.footer(
        "Prints /dev/ublkbN once the device is live. The daemon logs to\n"
        "/run/ublk-qcow2/N.log; remove the device with 'ublk-qcow2 del -n N'.\n"
        "If the daemon dies, 'ublk-qcow2 recover -n N' starts a new one.\n"
        "An encrypted (LUKS) image needs its passphrase: --key-file FILE, or --object\n"
        "secret,id=ID,file=FILE. The daemon keeps only the master key, locked in\n"
        "memory; recover needs the passphrase again.");
  }

  Status Run() override { return RunAdd(options_); }

 private:
  AddOptions options_;
};

}  // namespace

Status RunAdd(const AddOptions& options) {
  if (options.nthreads > 0 &&
      (options.nthreads < options.queues || options.nthreads % options.queues != 0)) {
    return Status::InvalidArgument(fmt::format("--nthreads {} must be a multiple of --queues {}",
                                               options.nthreads, options.queues));
  }
  char resolved[PATH_MAX];
  if (::realpath(options.image.c_str(), resolved) == nullptr) {
    return Status::FromErrno(errno, options.image);
  }
  const std::string path = resolved;
  bool direct = options.cache == "none";
  if (direct && !qcow2::SupportsDirectIo(path)) {
    // tmpfs and a few others: serving buffered beats refusing.
    std::fprintf(stderr,
                 "ublk-qcow2: %s: the file system does not support O_DIRECT; "
                 "serving through the page cache (--cache=writeback)\n",
                 path.c_str());
    direct = false;
  }
  RETURN_IF_ERROR(ValidateImage(options, path, direct));
  driver::RecoveryMode recovery = driver::RecoveryMode::kReissue;
  if (options.recovery == "fail-io") recovery = driver::RecoveryMode::kFailIo;
  if (options.recovery == "off") recovery = driver::RecoveryMode::kOff;
  const bool recovery_requested = !options.recovery.empty();
  driver::ZeroCopyMode zero_copy = driver::ZeroCopyMode::kAuto;
  if (options.zero_copy == "on") zero_copy = driver::ZeroCopyMode::kOn;
  if (options.zero_copy == "off") zero_copy = driver::ZeroCopyMode::kOff;
  {
    // Say plainly when the kernel has no ublk, or not the recovery asked
    // for, before forking anything.
    ASSIGN_OR_RETURN(std::unique_ptr<driver::ControlDevice> control, driver::ControlDevice::Open());
    RETURN_IF_ERROR(
        driver::RecoveryFlags(recovery, recovery_requested, control->features()).status());
    RETURN_IF_ERROR(
        driver::PartitionScanFlags(options.no_partition_scan, control->features()).status());
    RETURN_IF_ERROR(driver::ZeroCopyFlags(zero_copy, control->features()).status());
    RETURN_IF_ERROR(
        driver::PerIoDaemonFlags(ThreadsPerQueue(options), control->features()).status());
    RETURN_IF_ERROR(
        driver::BatchIoFlags(options.batch_io, ThreadsPerQueue(options), control->features())
            .status());
  }

  driver::DeviceOptions device;
  device.image = path;
  if (char* cwd = ::getcwd(nullptr, 0)) {
    device.working_dir = cwd;
    std::free(cwd);
  }
  device.dev_id = options.id;
  device.queues = static_cast<uint16_t>(options.queues);
  device.threads_per_queue = static_cast<uint16_t>(ThreadsPerQueue(options));
  device.depth = static_cast<uint16_t>(options.depth);
  device.read_only = options.read_only;
  device.cache_size = options.cache_size;
  device.direct = direct;
  device.preallocate = options.preallocate;
  device.max_io_buf_bytes = static_cast<uint32_t>(options.max_io);
  device.poll_us = options.poll_us;
  device.handle_signals = true;
  device.recovery = recovery;
  device.recovery_requested = recovery_requested;
  device.no_partition_scan = options.no_partition_scan;
  device.zero_copy = zero_copy;
  device.batch_io = options.batch_io;
  device.key = ImageKeyToWipe();

  return ServeAndPrintDevice(device, options.foreground, std::chrono::seconds(options.timeout_s));
}

std::unique_ptr<Command> MakeAddCommand() { return std::make_unique<AddCommand>(); }

}  // namespace uq::tools
