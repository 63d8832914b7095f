// The ublk kernel interface as this driver uses it: which opcodes to send,
// where a queue's I/O descriptors are mapped, and how a descriptor decodes.
//
// Everything that depends on the layout of <linux/ublk_cmd.h> is here, as
// pure functions over plain values, so that it can be unit-tested on a host
// without ublk. The structures themselves (ublksrv_ctrl_cmd, ublksrv_io_cmd,
// ublksrv_io_desc, ublk_params) are used as the system header declares them.
//
// Opcodes: kernels since 6.5 report UBLK_F_CMD_IOCTL_ENCODE from
// GET_FEATURES and accept ioctl-encoded opcodes (UBLK_U_*); older ones know
// only the legacy numbers (UBLK_CMD_*, UBLK_IO_*), and a kernel built without
// CONFIG_BLKDEV_UBLK_LEGACY_OPCODES only the encoded ones. Opcodes::For()
// picks one set from the reported features.
//
// Thread model: no state.
#ifndef UBLK_QCOW2_DRIVER_UBLK_ABI_H_
#define UBLK_QCOW2_DRIVER_UBLK_ABI_H_

#include <linux/ublk_cmd.h>
#include <sys/ioctl.h>  // _IOR/_IOWR, used by the UBLK_U_* macros

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

// Newer than Debian 12's <linux/ublk_cmd.h> (Linux 6.1): defined here when the
// system header lacks them, with the values of the kernel's UAPI. Whether the
// running kernel supports each one is decided from GET_FEATURES, never from
// the header we were built with.

// GET_FEATURES exists only in ioctl-encoded form (Linux 6.5+).
#ifndef UBLK_U_CMD_GET_FEATURES
#define UBLK_U_CMD_GET_FEATURES _IOR('u', 0x13, struct ublksrv_ctrl_cmd)
#endif
// UPDATE_SIZE (6.16, with UBLK_F_UPDATE_SIZE): the device's new size in
// 512-byte sectors in data[0]; the kernel sets dev_sectors and the disk's
// capacity (ublk_ctrl_set_size in drivers/block/ublk_drv.c). Encoded only.
#ifndef UBLK_U_CMD_UPDATE_SIZE
#define UBLK_U_CMD_UPDATE_SIZE _IOWR('u', 0x15, struct ublksrv_ctrl_cmd)
#endif
// Feature bits (6.2: unprivileged devices; 6.5: ioctl encoding, user copy;
// 6.6: zoned).
#ifndef UBLK_F_UNPRIVILEGED_DEV
#define UBLK_F_UNPRIVILEGED_DEV (1ULL << 5)
#endif
#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE (1ULL << 6)
#endif
#ifndef UBLK_F_USER_COPY
#define UBLK_F_USER_COPY (1ULL << 7)
#endif
#ifndef UBLK_F_ZONED
#define UBLK_F_ZONED (1ULL << 8)
#endif
// Feature bits of later kernels (values from include/uapi/linux/ublk_cmd.h of
// Linux 7.3; the first kernel with each in the comment). Named by `features`
// and `list`; used only where the kernel reports them.
#ifndef UBLK_F_USER_RECOVERY_FAIL_IO
#define UBLK_F_USER_RECOVERY_FAIL_IO (1ULL << 9)  // 6.13
#endif
#ifndef UBLK_F_UPDATE_SIZE
#define UBLK_F_UPDATE_SIZE (1ULL << 10)  // 6.16
#endif
#ifndef UBLK_F_AUTO_BUF_REG
#define UBLK_F_AUTO_BUF_REG (1ULL << 11)  // 6.16
#endif
#ifndef UBLK_F_QUIESCE
#define UBLK_F_QUIESCE (1ULL << 12)  // 6.16
#endif
#ifndef UBLK_F_PER_IO_DAEMON
#define UBLK_F_PER_IO_DAEMON (1ULL << 13)  // 6.16
#endif
#ifndef UBLK_F_BUF_REG_OFF_DAEMON
#define UBLK_F_BUF_REG_OFF_DAEMON (1ULL << 14)  // 6.17
#endif
#ifndef UBLK_F_BATCH_IO
#define UBLK_F_BATCH_IO (1ULL << 15)  // 7.0
#endif
#ifndef UBLK_F_INTEGRITY
#define UBLK_F_INTEGRITY (1ULL << 16)  // 7.0
#endif
#ifndef UBLK_F_SAFE_STOP_DEV
#define UBLK_F_SAFE_STOP_DEV (1ULL << 17)  // 7.0
#endif
#ifndef UBLK_F_NO_AUTO_PART_SCAN
#define UBLK_F_NO_AUTO_PART_SCAN (1ULL << 18)  // 7.0
#endif
#ifndef UBLK_F_SHMEM_ZC
#define UBLK_F_SHMEM_ZC (1ULL << 19)  // 7.1
#endif
#ifndef UBLK_F_IO_DESC_SIZE
#define UBLK_F_IO_DESC_SIZE (1ULL << 20)  // 7.3
#endif
// The state of a device in recovery mode whose server died, with
// UBLK_F_USER_RECOVERY_FAIL_IO (6.13): I/O fails until a new server recovers it.
#ifndef UBLK_S_DEV_FAIL_IO
#define UBLK_S_DEV_FAIL_IO 3
#endif
// User recovery (6.0): the legacy numbers are in Debian 12's header; the
// ioctl-encoded ones (6.5) may not be.
#ifndef UBLK_U_CMD_START_USER_RECOVERY
#define UBLK_U_CMD_START_USER_RECOVERY \
  _IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY _IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#endif
// QUIESCE_DEV (6.16, with UBLK_F_QUIESCE, on a device added with it and
// with UBLK_F_USER_RECOVERY): data[0] is a timeout in ms (0: none). The
// kernel stops handing new requests to the daemon (they are requeued; with
// UBLK_F_USER_RECOVERY_FAIL_IO they fail), waits until each queue has a tag
// idle in the daemon (EBUSY after the timeout), then completes the idle
// tags' fetches with UBLK_IO_RES_ABORT; requests the daemon holds are its to
// finish. Once the daemon has closed /dev/ublkcN the device is QUIESCED (or
// FAIL_IO), waiting for START_USER_RECOVERY (ublk_ctrl_quiesce_dev in
// drivers/block/ublk_drv.c). Encoded only.
#ifndef UBLK_U_CMD_QUIESCE_DEV
#define UBLK_U_CMD_QUIESCE_DEV _IOWR('u', 0x16, struct ublksrv_ctrl_cmd)
#endif
// DEL_DEV_ASYNC (6.9): DEL_DEV without waiting for the last reference to the
// device to go (a file system still mounted on a force-stopped /dev/ublkbN
// holds one until it is unmounted). No feature bit announces it.
#ifndef UBLK_U_CMD_DEL_DEV_ASYNC
#define UBLK_U_CMD_DEL_DEV_ASYNC _IOR('u', 0x14, struct ublksrv_ctrl_cmd)
#endif
// TRY_STOP_DEV (7.0, with UBLK_F_SAFE_STOP_DEV): STOP_DEV unless the block
// device is open; EBUSY if it is. Only in ioctl-encoded form here.
#ifndef UBLK_U_CMD_TRY_STOP_DEV
#define UBLK_U_CMD_TRY_STOP_DEV _IOWR('u', 0x17, struct ublksrv_ctrl_cmd)
#endif
// The ioctl-encoded opcodes (6.5): the legacy numbers wrapped in _IOR/_IOWR.
#ifndef UBLK_U_CMD_ADD_DEV
#define UBLK_U_CMD_GET_DEV_INFO _IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS _IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_IO_FETCH_REQ
#define UBLK_U_IO_FETCH_REQ _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ \
  _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#endif
// Zoned operations (6.6): never advertised by us, answered with an error.
#ifndef UBLK_IO_OP_ZONE_OPEN
#define UBLK_IO_OP_ZONE_OPEN 10
#define UBLK_IO_OP_ZONE_CLOSE 11
#define UBLK_IO_OP_ZONE_FINISH 12
#define UBLK_IO_OP_ZONE_APPEND 13
#define UBLK_IO_OP_ZONE_RESET_ALL 14
#define UBLK_IO_OP_ZONE_RESET 15
#define UBLK_IO_OP_REPORT_ZONES 18
#endif

namespace uq::driver {

// The character device, block device and control node names.
inline constexpr const char* kControlPath = "/dev/ublk-control";
std::string CharDevicePath(int dev_id);   // "/dev/ublkcN"
std::string BlockDevicePath(int dev_id);  // "/dev/ublkbN"

// The opcodes of one encoding.
struct Opcodes {
  uint32_t get_dev_info;
  uint32_t add_dev;
  uint32_t del_dev;
  uint32_t start_dev;
  uint32_t stop_dev;
  uint32_t set_params;
  uint32_t get_params;
  uint32_t fetch_req;
  uint32_t commit_and_fetch_req;
  uint32_t start_user_recovery;
  uint32_t end_user_recovery;

  // The ioctl-encoded set if `features` has UBLK_F_CMD_IOCTL_ENCODE, else
  // the legacy one.
  static Opcodes For(uint64_t features);
};

// --- UBLK_F_* flags: what the kernel offers (GET_FEATURES) and what a device
// was created with (ublksrv_ctrl_dev_info.flags) ---

// The kernel's names of the flags, without the "UBLK_F_" prefix
// ("CMD_IOCTL_ENCODE"), of the bits set in `flags` that this driver knows,
// lowest bit first.
std::vector<std::string> KnownFlagNames(uint64_t flags);
// The bits set in `flags` that have no name here (a kernel newer than this
// driver), ascending.
std::vector<int> UnknownFlagBits(uint64_t flags);
// Both in one list: the known names, then "bit N" for each unknown bit.
std::vector<std::string> FlagLabels(uint64_t flags);
// FlagLabels comma-separated ("" for none), for log lines.
std::string FeatureNames(uint64_t flags);

// The flags `add` asks ADD_DEV for, given the kernel's `features`: only
// those it offers. Today that is CMD_IOCTL_ENCODE (the opcode encoding);
// every other feature is left off.
inline constexpr uint64_t kFlagsAddUses = UBLK_F_CMD_IOCTL_ENCODE;
inline uint64_t AddFlags(uint64_t features) { return features & kFlagsAddUses; }

// How `del` stops a device that may be in use, when not forced: the kernel's
// own check-and-stop where GET_FEATURES offers UBLK_F_SAFE_STOP_DEV (7.0+),
// which fails with EBUSY while anyone has /dev/ublkbN open; before that an
// exclusive open of /dev/ublkbN, held across STOP_DEV, which fails while the
// device is mounted or held exclusively (mkfs, LVM, a VM's image lock) but
// not while it is merely open.
enum class SafeStop { kTryStopDev, kExclusiveOpen };
inline SafeStop SafeStopFor(uint64_t features) {
  return (features & UBLK_F_SAFE_STOP_DEV) ? SafeStop::kTryStopDev : SafeStop::kExclusiveOpen;
}

// "live", "dead", "quiesced", "fail-io", or "state N".
std::string DeviceStateName(uint16_t state);

// --- User recovery: the device outlives its daemon ---

// What happens to a device's I/O when its daemon dies (add --recovery):
//   kReissue: the kernel keeps the device, queues its requests (those the
//             daemon had taken too) and re-issues them to the daemon that
//             `recover` starts (UBLK_F_USER_RECOVERY | _REISSUE, Linux 6.0+);
//   kFailIo:  the device stays, but its I/O fails until `recover`
//             (UBLK_F_USER_RECOVERY | _FAIL_IO, 6.13+);
//   kOff:     the kernel fails the I/O and removes the device.
enum class RecoveryMode { kOff, kReissue, kFailIo };
// "off", "reissue", "fail-io".
std::string RecoveryModeName(RecoveryMode mode);
// The mode of a device created with `flags`.
RecoveryMode RecoveryModeOf(uint64_t flags);
// The UBLK_F_* bits that ADD_DEV needs for `mode`, given the kernel's
// `features` (GET_FEATURES; 0 on kernels without it), UBLK_F_QUIESCE
// included where the kernel offers it and `mode` is not kOff (so that
// `upgrade` can hand the device to a new daemon). A mode the kernel does
// not offer: NotSupported naming the missing feature if `requested` (the user
// asked for it), else 0 (kOff: the default falls back quietly).
Result<uint64_t> RecoveryFlags(RecoveryMode mode, bool requested, uint64_t features);
// Whether `upgrade -n ID` can hand device `dev_id` to a new daemon, from the
// kernel's GET_FEATURES (`features`) and the device's flags (GET_DEV_INFO):
// the kernel must offer UBLK_F_QUIESCE (NotSupported naming it, Linux
// 6.16+), the device must have user recovery (InvalidArgument: added with
// --recovery=off) and must have been added with UBLK_F_QUIESCE
// (InvalidArgument: by a ublk-qcow2 that did not ask for it). Never from the
// kernel version.
Status CheckUpgrade(uint64_t features, uint64_t device_flags, int dev_id);
// Whether a device in `state` waits for a new daemon (recover -n).
inline bool AwaitsRecovery(uint16_t state) {
  return state == UBLK_S_DEV_QUIESCED || state == UBLK_S_DEV_FAIL_IO;
}

// --- Options of `add` that need a newer kernel (gated on GET_FEATURES) ---

// add --no-partition-scan: the kernel does not read a partition table when
// the device starts (UBLK_F_NO_AUTO_PART_SCAN, 7.0+). The flag for ADD_DEV,
// 0 without the option; NotSupported naming the flag when the kernel lacks it.
Result<uint64_t> PartitionScanFlags(bool no_partition_scan, uint64_t features);

// add --nthreads above --queues: each queue served by several threads, each
// fetching (and so serving) every Nth tag, which the kernel allows only with
// UBLK_F_PER_IO_DAEMON (6.16+): without it one task must issue all of a
// queue's commands. The flag for ADD_DEV, 0 for one thread per queue;
// NotSupported naming the flag when the kernel lacks it.
Result<uint64_t> PerIoDaemonFlags(unsigned threads_per_queue, uint64_t features);

// add --zero-copy: the data of reads and writes of plain, allocated clusters
// goes between the request's pages and the image file as io_uring
// fixed-buffer I/O, the kernel registering each request's pages in the
// queue's ring (UBLK_F_AUTO_BUF_REG, 6.16+); requests whose bytes the engine
// must see reach it through pread/pwrite on /dev/ublkcN (UBLK_F_USER_COPY,
// 6.5+). Both flags or neither (driver/README.md, "Zero copy").
//   kAuto: both where the kernel offers both, else neither (the default);
//   kOn:   both, or NotSupported naming the missing flag;
//   kOff:  neither (the daemon's buffer, copied by the kernel).
enum class ZeroCopyMode { kAuto, kOn, kOff };
inline constexpr uint64_t kZeroCopyFlags = UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY;
Result<uint64_t> ZeroCopyFlags(ZeroCopyMode mode, uint64_t features);
// Whether a device created with `flags` is served with zero copy.
inline bool UsesZeroCopy(uint64_t flags) { return (flags & kZeroCopyFlags) == kZeroCopyFlags; }

// --- The I/O descriptor area of /dev/ublkcN ---

// Bytes the kernel maps for one queue of `depth` tags: the descriptor array
// rounded up to a page. mmap must ask for exactly this length.
uint64_t DescriptorAreaSize(uint32_t depth, uint64_t page_size);
// The mmap offset of queue `queue`'s descriptor array: each queue's area
// starts at a stride sized for the largest queue (UBLK_MAX_QUEUE_DEPTH).
uint64_t DescriptorAreaOffset(uint32_t queue, uint64_t page_size);

// One request, decoded from its ublksrv_io_desc.
struct IoDescriptor {
  uint8_t op = 0;       // UBLK_IO_OP_*
  uint32_t flags = 0;   // UBLK_IO_F_* bits, in place (op_flags & ~0xff)
  uint64_t offset = 0;  // bytes
  uint64_t length = 0;  // bytes
  bool fua() const { return (flags & UBLK_IO_F_FUA) != 0; }
};
// Copies the descriptor out of the shared area (the kernel rewrites it for
// the next request on the tag) and converts sectors to bytes.
IoDescriptor DecodeDescriptor(const volatile ublksrv_io_desc& desc);

// "read", "write", "flush", "discard", "write-zeroes", or "op N".
std::string OpName(uint8_t op);

// What goes into user_data's CommandId.op for the I/O commands: the two of
// the per-tag protocol, and the three of UBLK_F_BATCH_IO.
enum class IoCommand : uint8_t {
  kFetch = 1,
  kCommitAndFetch = 2,
  kPrepBatch = 3,
  kFetchBatch = 4,
  kCommitBatch = 5,
};

// --- UBLK_F_BATCH_IO (Linux 7.0+): per-queue batch commands ---
//
// PREP_IO_CMDS readies a list of tags (and their buffers) once; a multishot
// FETCH_IO_CMDS then posts, per completion, a provided buffer of 2-byte tags
// whose requests are ready; COMMIT_IO_CMDS completes a list of tags with
// their results and readies them for the next request. PREP and COMMIT name
// their list in the SQE's addr: nr_elem elements of elem_bytes, each a
// BatchElemHeader followed by the buffer address when the kernel copies the
// data (not with user copy or zero copy). Layouts from the 7.0 UAPI header.
struct BatchIoCmd {  // struct ublk_batch_io, in the SQE's command area
  uint16_t q_id;
  uint16_t flags;  // kBatchHasBufAddr...
  uint16_t nr_elem;
  uint8_t elem_bytes;
  uint8_t reserved;
  uint64_t reserved2;
};
static_assert(sizeof(BatchIoCmd) == 16);
struct BatchElemHeader {  // struct ublk_elem_header
  uint16_t tag;
  uint16_t buf_index;  // the auto-registration index (zero copy)
  int32_t result;      // COMMIT only
};
static_assert(sizeof(BatchElemHeader) == 8);
inline constexpr uint16_t kBatchHasBufAddr = 1 << 1;  // UBLK_BATCH_F_HAS_BUF_ADDR
inline constexpr uint32_t kPrepIoCmds = _IOWR('u', 0x25, BatchIoCmd);
inline constexpr uint32_t kCommitIoCmds = _IOWR('u', 0x26, BatchIoCmd);
inline constexpr uint32_t kFetchIoCmds = _IOWR('u', 0x27, BatchIoCmd);
// sqe->uring_cmd_flags: a multishot uring_cmd (io_uring, 6.19+).
inline constexpr uint32_t kUringCmdMultishot = 1U << 1;

// add --batch-io: serve the queues with the batch commands (the device has
// UBLK_F_BATCH_IO). The flag for ADD_DEV, 0 without the option;
// NotSupported naming the flag when the kernel lacks it, InvalidArgument
// with --nthreads above --queues (a batch queue is served by one thread
// here).
Result<uint64_t> BatchIoFlags(bool batch_io, unsigned threads_per_queue, uint64_t features);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_UBLK_ABI_H_
