// log_writes: a reader of the kernel dm-log-writes target's log and a replayer that applies
// it to a copy of the logged device (Documentation/admin-guide/device-mapper/log-writes.rst;
// the on-disk layout is the one drivers/md/dm-log-writes.c documents).
//
// Layout, all little-endian, in units of the data device's logical block size `sectorsize`
// (recorded in the superblock):
//   sector 0          superblock: magic u64 (0x6a736677736872), version u64 (1),
//                     nr_entries u64, sectorsize u32
//   then nr_entries entries, each a header sector followed by its data:
//     header          sector u64, nr_sectors u64, flags u64, data_len u64; for a mark
//                     the name (data_len bytes) follows in the same sector
//     data            nr_sectors sectors, except for discards (no data)
// flags: FLUSH 1, FUA 2, DISCARD 4, MARK 8, METADATA 16.
// The log lists writes in the order they became durable: plain writes at the flush that
// covered them, then the flush itself; FUA writes as they complete; marks when sent.
//
// Not thread-safe; one reader per log.
#ifndef UBLK_QCOW2_TESTS_POWER_LOG_WRITES_H_
#define UBLK_QCOW2_TESTS_POWER_LOG_WRITES_H_

#include <cstdint>
#include <optional>
#include <string>

#include "base/status.h"

namespace uq::power {

inline constexpr uint64_t kLogFlush = 1, kLogFua = 2, kLogDiscard = 4, kLogMark = 8,
                          kLogMetadata = 16;

struct LogEntry {
  uint64_t index = 0;       // 0-based position in the log
  uint64_t sector = 0;      // on the data device, in sectorsize units
  uint64_t nr_sectors = 0;  // in sectorsize units
  uint64_t flags = 0;
  std::string mark;          // the mark's name (kLogMark only)
  uint64_t data_offset = 0;  // byte offset of the data in the log
};

class LogReader {
 public:
  // Opens the log and checks its superblock.
  static Result<LogReader> Open(const std::string& path);
  LogReader(LogReader&& other) noexcept;
  LogReader& operator=(LogReader&&) = delete;
  ~LogReader();

  uint64_t nr_entries() const { return nr_entries_; }
  uint32_t sectorsize() const { return sectorsize_; }

  // Positions the reader at entry `index` whose header is at byte `offset` (as returned by
  // next_offset() after reading entry index-1). Entry 0 is at sectorsize().
  void Seek(uint64_t index, uint64_t offset) {
    index_ = index;
    offset_ = offset;
  }
  uint64_t next_index() const { return index_; }
  uint64_t next_offset() const { return offset_; }

  // The next entry, nullopt at the end of the log.
  Result<std::optional<LogEntry>> Next();

  // Applies `e` to the file `target_fd`: copies its data, or punches the discarded range.
  Status Apply(const LogEntry& e, int target_fd);

 private:
  LogReader(int fd, std::string path, uint64_t nr_entries, uint32_t sectorsize)
      : fd_(fd),
        path_(std::move(path)),
        nr_entries_(nr_entries),
        sectorsize_(sectorsize),
        offset_(sectorsize) {}

  int fd_;
  std::string path_;
  uint64_t nr_entries_;
  uint32_t sectorsize_;
  uint64_t index_ = 0;
  uint64_t offset_;
};

}  // namespace uq::power

#endif  // UBLK_QCOW2_TESTS_POWER_LOG_WRITES_H_
