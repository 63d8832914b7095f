// Device records: what `add` leaves behind about each served device, for
// `list` and `del` to find its image and daemon.
//
//   /run/ublk-qcow2/<id>.json   {"id":0,"image":"/abs/a.qcow2","pid":123,
//                                "queues":1,"depth":128,"size":1073741824,
//                                "read_only":false,"working_dir":"/root",
//                                "direct":true,"cache_size":33554432,
//                                "preallocate":67108864,"max_io":1048576,
//                                "poll_us":0,"recovery":"reissue",
//                                "encrypted":false}
//   /run/ublk-qcow2/<id>.log    the daemon's stderr
//   /run/ublk-qcow2/<id>.sock   the daemon's control socket (driver/control_socket.h)
//
// The directory can be moved with UBLK_QCOW2_STATE_DIR (tests). A record is
// written before the device goes live (after ADD_DEV, before START_DEV;
// temporary file + rename, so readers see all or nothing), the pid updated
// by each daemon that recovers the device, and removed when the daemon ends
// cleanly, or by `del`. It holds what `recover` needs to serve the device
// again as `add` set it up (the fields after read_only; a record without
// them, from an older version, gets the defaults).
// The kernel remains the authority on which devices exist; a record whose
// device is gone is stale.
//
// Thread model: plain functions over files.
#ifndef UBLK_QCOW2_DRIVER_STATE_FILE_H_
#define UBLK_QCOW2_DRIVER_STATE_FILE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"

namespace uq::driver {

struct DeviceRecord {
  int id = -1;
  std::string image;
  int pid = 0;
  uint16_t queues = 0;
  uint16_t depth = 0;
  uint64_t size = 0;
  bool read_only = false;
  // For `recover`: DeviceOptions as `add` set them.
  std::string working_dir;
  bool direct = true;
  uint64_t cache_size = 32ull << 20;
  uint64_t preallocate = 64ull << 20;
  uint32_t max_io = 1024 * 1024;
  uint32_t poll_us = 0;
  std::string recovery = "off";  // RecoveryModeName
  // The image (or a backing file) is encrypted: `recover` needs --key-file.
  // Only this flag: no key material is ever written here.
  bool encrypted = false;
  friend bool operator==(const DeviceRecord&, const DeviceRecord&) = default;
};

std::string StateDir();
std::string RecordPath(int id);
std::string LogPath(int id);
std::string SocketPath(int id);

std::string RecordToJson(const DeviceRecord& record);
// Corruption naming `origin` if the text is not a record.
Result<DeviceRecord> RecordFromJson(const std::string& text, const std::string& origin);

// Creates the state directory (mode 0755) if needed.
Status EnsureStateDir();
Status WriteRecord(const DeviceRecord& record);
// nullopt when there is no record for `id`.
Result<std::optional<DeviceRecord>> ReadRecord(int id);
// Removes the record and a socket left beside it. OK when already gone.
Status RemoveRecord(int id);
// Ids with a record file, ascending.
std::vector<int> RecordIds();

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_STATE_FILE_H_
