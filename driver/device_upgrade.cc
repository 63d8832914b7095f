// Device's "upgrade" control verb: hand the live device to a new daemon
// (`ublk-qcow2 upgrade -n ID`) without failing any I/O.
//
// On the control thread, inside the socket handler:
//   1. checks (CheckUpgrade in ublk_abi.h: the kernel offers UBLK_F_QUIESCE,
//      the device has user recovery and was added with UBLK_F_QUIESCE);
//   2. every queue is told to hand over (QueueWorker::BeginHandover): from
//      now on a committed tag is not waited for;
//   3. QUIESCE_DEV: the kernel holds back new requests (requeued for the
//      next daemon; with fail-io they fail, as after a crash), waits until
//      every queue has an idle tag and aborts the idle fetches;
//   4. the queues are told it returned (EndHandover), the device forgets
//      that it must be deleted (no STOP_DEV, no DEL_DEV, the record stays),
//      and the answer goes back: {"pid":P,"quiesced":true}.
// Serve() then sees the queues finish once the requests they hold are
// committed, and Teardown flushes and closes the image (clean: not dirty, the
// unused cluster reserve given back) and closes /dev/ublkcN; the kernel then
// marks the device QUIESCED, waiting for the new daemon's
// START_USER_RECOVERY, which `upgrade` starts as `recover` does.
//
// A QUIESCE_DEV that fails before the kernel changed anything (the device is
// gone or not live: ENODEV, EOPNOTSUPP, EINVAL) undoes step 2 and is
// answered as an error: the device goes on being served. One that timed out
// (EBUSY: every tag of a queue stayed busy for kQuiesceTimeoutMs) or was
// interrupted has already held back new requests, which only a new daemon
// can undo: the handover goes on, finishing once no request is being served.
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>

#include "driver/device.h"
#include "driver/log.h"
#include "driver/ublk_abi.h"

namespace uq::driver {
namespace {

constexpr uint32_t kQuiesceTimeoutMs = 30'000;

}  // namespace

void Device::AddUpgradeHandlers(ControlHandlers& handlers) {
  // {"verb":"upgrade"} -> {"pid":P,"quiesced":true}
  handlers["upgrade"] = [this](const nlohmann::json&) -> Result<nlohmann::json> {
    RETURN_IF_ERROR(HandOver());
    nlohmann::json answer;
    answer["pid"] = static_cast<int>(::getpid());
    answer["quiesced"] = quiesced_for_handover_;
    return answer;
  };
}

Status Device::HandOver() {
  RETURN_IF_ERROR(CheckUpgrade(control_->features(), info_.flags, info_.dev_id));
  if (handing_over_) {
    return Status::Busy(fmt::format("ublk device {} is already being handed over", info_.dev_id));
  }
  const auto start = std::chrono::steady_clock::now();
  for (size_t q = 0; q < workers_.size(); ++q) {
    QueueWorker* worker = workers_[q].get();
    loops_[q]->Call([worker] { worker->BeginHandover(); });
  }
  Status quiesced = control_->QuiesceDevice(info_.dev_id, kQuiesceTimeoutMs);
  const int err = quiesced.error_number();
  if (!quiesced.ok() && err != EBUSY && err != EINTR) {
    // Refused before the kernel changed anything: serve on.
    for (size_t q = 0; q < workers_.size(); ++q) {
      QueueWorker* worker = workers_[q].get();
      loops_[q]->Call([worker] { worker->AbortHandover(); });
    }
    return quiesced;
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (quiesced.ok()) {
    Log(fmt::format("handing {} over to a new daemon: quiesced in {:.1f} ms", info_.block_path,
                    ms));
  } else {
    Log(
        fmt::format("handing {} over to a new daemon: {} after {:.1f} ms; new requests are held "
                    "back, handing over what is served",
                    info_.block_path, quiesced.ToString(), ms));
  }
  handing_over_ = true;
  quiesced_for_handover_ = quiesced.ok();
  // The device and its record are the next daemon's now.
  added_ = false;
  recorded_ = false;
  for (size_t q = 0; q < workers_.size(); ++q) {
    QueueWorker* worker = workers_[q].get();
    loops_[q]->Call([worker] { worker->EndHandover(); });
  }
  return Status::Ok();
}

}  // namespace uq::driver
