// CheckPass: one run of QEMU's qcow2_co_check_locked over an image (read the
// snapshot table, count every reference, compare with the stored refcounts
// and repair, check the COPIED flags, repair the snapshot table, clear the
// dirty and corrupt bits). CheckImage (check.cc) runs one pass, and a second,
// read-only one after a repair; check.h describes what is checked.
//
// The pass is one object because its steps share the image's header, the
// computed and the stored refcounts and the counters, in the order QEMU
// updates them. Its methods are defined by job:
//   check.cc              Run, setup (header, sizes), the order of the steps
//   snapshot_check.cc     reading the snapshot table and repairing it
//   reference_walk.cc     counting references: header, L1/L2 tables, data
//                         clusters, snapshot L1s, refcount table and blocks
//   bitmap_refcounts.cc   counting the bitmap directory, tables and data
//   compare_refcounts.cc  computed vs stored refcounts, leak/error repair
//   copied_flags.cc       the COPIED flags of active L1 and L2 entries
//   rebuild_refcounts.cc  a new refcount structure from the computed one
//   metadata_map.cc       the map behind the "Overlap:" messages
//
// Internal to qcow2/check. Thread model: as CheckImage (awaits `file`; the
// pass is not shared).
#ifndef UBLK_QCOW2_QCOW2_CHECK_CHECK_PASS_H_
#define UBLK_QCOW2_QCOW2_CHECK_CHECK_PASS_H_

#include <fmt/format.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/task.h"
#include "qcow2/check/check.h"
#include "qcow2/check/metadata_map.h"
#include "qcow2/check/refcount_array.h"
#include "qcow2/check/stored_refcounts.h"
#include "qcow2/file.h"
#include "qcow2/geometry.h"
#include "qcow2/header.h"
#include "qcow2/snapshot_table.h"

namespace uq::qcow2::check_internal {

// Header field offsets the repair rewrites.
inline constexpr uint64_t kOffRefcountTableOffset = 48;  // + refcount_table_clusters at 56
inline constexpr uint64_t kOffNbSnapshots = 60;          // + snapshots_offset at 64
inline constexpr uint64_t kOffIncompatibleFeatures = 72;

// QEMU's BdrvCheckMode bits.
enum FixMode : int { kNoFix = 0, kFixLeaks = 1, kFixErrors = 2 };
// Flag for CheckL1/CheckL2: count BlockFragInfo (active L1 only).
inline constexpr int kFragInfo = 2;

// The numeric part of a CheckResult, which QEMU saves and restores whole.
struct Counters {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
};

enum class ClusterType { kUnallocated, kZeroPlain, kZeroAlloc, kNormal, kCompressed };

class CheckPass {
 public:
  // Fills `*out`, which must outlive the pass.
  CheckPass(File& file, const CheckOptions& options, CheckResult* out)
      : file_(file),
        options_(options),
        out_(*out),
        fix_(options.repair == RepairMode::kAll     ? (kFixLeaks | kFixErrors)
             : options.repair == RepairMode::kLeaks ? kFixLeaks
                                                    : kNoFix) {}

  // Non-OK only when there is nothing to check (see CheckImage).
  Task<Status> Run();

 private:
  // ---- messages and counters (check.cc) ----

  // Adds a message, or counts it as suppressed past options_.max_messages.
  template <class... Args>
  void Msg(fmt::format_string<Args...> f, Args&&... args) {
    if (out_.messages.size() < options_.max_messages) {
      out_.messages.push_back(fmt::format(f, std::forward<Args>(args)...));
    } else {
      suppressed_++;
    }
  }

  void CopyCounters();

  uint64_t cs() const { return g_.cluster_size; }
  uint32_t cb() const { return g_.cluster_bits; }
  bool has_data_file() const { return h_.has_data_file(); }

  // ---- setup and the order of the steps (check.cc) ----

  Task<Status> Setup();
  // ReadHeader, except that an encrypted image is parsed too: the check needs
  // no key, only where the encryption header lies (QEMU opens for check
  // without decrypting).
  Task<Result<Header>> ReadHeaderForCheck();
  Task<Status> CheckAll();
  // qcow2_check_refcounts.
  Task<Status> CheckRefcounts();
  Task<Status> LoadRefcountTable();
  // qcow2_mark_clean + qcow2_mark_consistent.
  Task<Status> MarkCleanAndConsistent();

  // ---- the snapshot table (snapshot_check.cc) ----

  // qcow2_check_read_snapshot_table: QEMU's table limits, then the entries.
  // With repair, entries past the limits are dropped at once (the header's
  // count is rewritten; the clusters they held leak and the refcount check
  // frees them) and extra data over the limit is cut (the table is rewritten
  // by FixSnapshotTable, which needs consistent refcounts).
  Task<Status> ReadSnapshots();
  // qcow2_check_fix_snapshot_table: rewrites the snapshot table with
  // complete extra data into newly allocated clusters, then frees the old
  // table. Only attempted when the refcounts are known to be right, so that
  // the in-memory refcounts can allocate.
  Task<Status> FixSnapshotTable();
  Task<Status> RewriteSnapshotTable();

  // ---- computing the references, calculate_refcounts (reference_walk.cc) ----

  // qcow2_inc_refcounts_imrt.
  Status Inc(uint64_t offset, uint64_t size);
  Task<Status> CalculateRefcounts(int fix, bool* rebuild);
  // check_refcounts_l1. `active`: the L1 table is the header's.
  Task<Status> CheckL1(uint64_t l1_offset, uint32_t l1_size, int flags, int fix, bool active);
  ClusterType TypeOf(uint64_t entry) const;
  // check_refcounts_l2. `l1_index` >= 0 for the active L1 (names the guest
  // offset in overlap messages).
  Task<Status> CheckL2(uint64_t l2_offset, AlignedBuffer& buf, int flags, int fix,
                       int64_t l1_index);
  // fix_l2_entry_by_zero: makes entry `i` read as zeros (all its allocated
  // subclusters, with extended L2) and writes it back.
  Task<Status> FixL2EntryByZero(uint64_t l2_offset, std::span<std::byte> table, uint64_t i);
  // check_refblocks.
  Task<Status> CheckRefblocks(int fix, bool* rebuild);
  // Grows the file so that the refcount block at `offset` lies inside it.
  Task<Status> ExtendFileToCover(uint64_t offset, uint64_t cluster);

  // ---- bitmaps (bitmap_refcounts.cc) ----

  // qcow2_check_bitmaps_refcounts. Only a valid bitmaps extension counts: QEMU
  // ignores one whose autoclear bit is clear.
  Task<Status> CheckBitmaps();

  // ---- comparing with the stored refcounts (compare_refcounts.cc) ----

  // compare_refcounts.
  Task<Status> CompareRefcounts(int fix, bool* rebuild, uint64_t* highest);
  // Like QEMU (QCOW2_DISCARD_ALWAYS), hands clusters whose refcount dropped
  // to 0 back to the host file system. Advisory: failures are ignored.
  Task<void> DiscardFreed();

  // ---- COPIED flags (copied_flags.cc) ----

  // check_oflag_copied.
  Task<Status> CheckOflagCopied();

  // ---- rebuilding the refcount structure (rebuild_refcounts.cc) ----

  // alloc_clusters_imrt: `count` contiguous free clusters at or after
  // *first_free, growing the array past its end if need be. Returns the
  // offset; *first_free moves to the first gap seen.
  Result<uint64_t> AllocClusters(uint64_t count, uint64_t* first_free);
  // rebuild_refcounts_write_refblocks: writes a refcount block (a slice of
  // the in-memory array) for every block that has a non-zero entry among
  // clusters [first, end), allocating blocks that have no place yet.
  // Returns whether the refcount table had to grow.
  Task<Result<bool>> WriteRefblocks(uint64_t first, uint64_t end, std::vector<uint64_t>* table);
  // rebuild_refcount_structure: a new refcount table and blocks, built from
  // the computed refcounts in free clusters, then switched to in the header.
  // The old structure is left behind as leaked clusters.
  Task<Status> RebuildRefcountStructure();

  // ---- overlap messages (metadata_map.cc) ----

  Task<Status> BuildMetadataMap();
  // Names the metadata that data cluster `cluster` overlaps, if any. Not
  // counted: the refcount comparison counts the double use.
  void NoteOverlap(uint64_t cluster, int64_t l1_index, uint64_t l2_index, const char* what);

  File& file_;
  const CheckOptions& options_;
  CheckResult& out_;
  const int fix_;
  uint64_t file_size_ = 0;
  Header h_;
  Geometry g_;
  std::optional<RefcountArray> imrt_;
  std::optional<StoredRefcounts> stored_;
  PackedSnapshotTable snapshots_;
  uint64_t snapshots_size_ = 0;
  uint64_t snapshot_corruptions_ = 0;
  uint64_t snapshot_fixed_ = 0;  // snapshots dropped from the table (repaired)
  Counters res_;
  MetadataMap map_;
  bool dirty_ = false;
  std::vector<uint64_t> freed_;  // clusters freed by the current compare
  uint64_t suppressed_ = 0;
};

}  // namespace uq::qcow2::check_internal

#endif  // UBLK_QCOW2_QCOW2_CHECK_CHECK_PASS_H_
