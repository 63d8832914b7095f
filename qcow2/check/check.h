// CheckImage: the qcow2 consistency check and repair behind `ublk-qcow2 check`,
// counting exactly what `qemu-img check` counts (QEMU 7.2's
// qcow2_check_refcounts and friends are the reference for every rule below).
//
// What is checked. The check recomputes, for every host cluster of the image
// file, the number of references it should have:
//   the header (cluster 0);
//   the active L1 table, every L2 table it points to, and every host cluster
//     those L2 tables point to: standard and preallocated-zero clusters count
//     their host cluster, compressed clusters every cluster overlapped by
//     their sectors [offset & ~511, (offset & ~511) + (extra_sectors+1)*512);
//     with an external data file (incompatible bit 2) data clusters live in
//     the data file and are not counted;
//   each internal snapshot's L1 table, its L2 tables and their clusters (every
//     reference adds one: a cluster shared by the active L1 and one snapshot
//     is owed a refcount of 2);
//   the snapshot table (up to the end of its last entry);
//   the refcount table and every refcount block;
//   the encryption header (LUKS) when there is one;
//   the bitmap directory, the bitmap tables and bitmap data clusters when the
//     bitmaps extension is valid (autoclear bit 0 set; without it QEMU ignores
//     the bitmaps, whose clusters then show up as leaks).
// It then compares with the refcounts stored in the image:
//   stored < computed  corruption  "ERROR cluster N refcount=1 reference=2"
//   stored > computed  leak        "Leaked cluster N refcount=1 reference=0"
// and checks, also counted as corruptions (as QEMU does): the COPIED flag of
// every active L1 and L2 entry (set iff the refcount is exactly 1; data
// clusters in an external data file always have refcount 1), reserved bits in
// L1/L2/refcount table entries, unaligned L2 tables, data clusters and refcount
// blocks, references that reach one cluster or more past the end of the file,
// refcount blocks outside the file or with a computed refcount other than 1,
// refcount overflow (a cluster referenced more often than refcount_bits can
// count), compressed clusters with an external data file or a subcluster
// bitmap, snapshots in an image with a data file, v3 snapshot table entries
// with less than 16 bytes of extra data, a broken bitmap directory.
// Metadata overlaps (an L2 entry pointing into the L1 table, say) surface as
// clusters referenced more often than their refcount allows; the check also
// names the structure a data cluster overlaps in an extra message starting
// "Overlap:" (qemu-img has none), which is not counted again. Encrypted
// images are checked without their key.
//
// Repair. RepairMode::kLeaks lowers refcounts that are too high (and fixes
// COPIED flags only if nothing else is wrong afterwards). RepairMode::kAll
// also raises refcounts that are too low, fixes COPIED flags, zeroes
// unaligned preallocated-zero L2 entries, extends the file to cover refcount
// blocks past its end, and, when a refcount block is missing or broken,
// rebuilds the whole refcount structure from the computed refcounts into free
// clusters and switches the header to it (the old structure then leaks and is
// freed in the same run). Snapshot table entries with incomplete extra data
// are rewritten into a new table (once the refcounts are right, since the new
// table needs clusters allocated). Clusters whose refcount drops to 0 are
// discarded (File::Discard), as QEMU does. Like QEMU, a repaired image is
// checked again: the result then describes the image after repair, with
// corruptions_fixed and leaks_fixed from the repairing pass. With nothing left
// to complain about, the dirty and corrupt header bits are cleared (unlike
// QEMU, which also clears the dirty bit when a repair failed).
// Repair writes through File::Write (refcount blocks whole) and File::Sync,
// syncing before each header update that makes new structures reachable (a
// rebuilt refcount table and its blocks, a rewritten snapshot table).
//
// Errors. CheckImage fails (a non-OK Result) only when there is no image to
// check: the header cannot be read or parsed, the file is not qcow2, or it is
// too big to check within CheckOptions::max_memory_bytes. Problems met during
// the check are counted in the result instead; a check that had to stop early
// (an I/O error, a broken bitmap directory or snapshot table, a repair that
// could not be done) sets CheckResult::error, as qemu-img prints "Check
// failed: ...", and CheckExitCode() then returns 1.
//
// Memory: one refcount entry per host cluster of the file, in the image's own
// refcount width (file_size / cluster_size * refcount_bits / 8 bytes, bounded
// by CheckOptions::max_memory_bytes), a cache of at most 32 MiB of refcount
// blocks, one L1 table (at most 32 MiB) and one L2 table at a time, the offsets
// of the active L2 tables and of the refcount blocks (8 bytes each), and the
// messages (CheckOptions::max_messages).
//
// Thread model: CheckImage awaits `file`; it must run where that File's
// operations may be started. Nothing else may write the image meanwhile.
#ifndef UBLK_QCOW2_QCOW2_CHECK_CHECK_H_
#define UBLK_QCOW2_QCOW2_CHECK_CHECK_H_

#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"

namespace uq::qcow2 {

enum class RepairMode {
  kNone,   // report only; the file is not written
  kLeaks,  // qemu-img check -r leaks
  kAll,    // qemu-img check -r all
};

struct CheckOptions {
  RepairMode repair = RepairMode::kNone;
  // The in-memory refcount array may not grow beyond this; larger images are
  // refused (InvalidArgument) before anything is read past the header.
  uint64_t max_memory_bytes = uint64_t{1} << 30;
  // CheckResult::messages keeps at most this many lines (a badly damaged
  // image can have a message per cluster), then one saying how many more
  // there were. The counters are always complete.
  size_t max_messages = 100000;
};

struct CheckResult {
  // qemu-img's counters (BdrvCheckResult).
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  // (highest cluster with a stored or computed refcount + 1) * cluster size.
  uint64_t image_end_offset = 0;
  // BlockFragInfo, from the active L1 table only. total_clusters covers the
  // virtual disk; allocated counts clusters with a host cluster (standard,
  // preallocated zero, compressed); fragmented counts allocated clusters
  // that do not follow their predecessor in the same L2 table on the host,
  // plus every compressed cluster.
  uint64_t total_clusters = 0;
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  // One line per finding or repair, worded like qemu-img's stderr lines
  // ("ERROR cluster 5 refcount=0 reference=1", "Repairing ...", "Leaked
  // ..."), in the order found. A repaired image's lines come first, then
  // those of the second check.
  std::vector<std::string> messages;
  // Non-empty if the check stopped early; the reason ("Check failed: " goes
  // in front when printed). The counters then cover what was checked.
  std::string error;
};

// Checks (and with options.repair, repairs) the qcow2 image in `file`, which
// must be open for writing when repairing. See the file comment.
Task<Result<CheckResult>> CheckImage(File& file, const CheckOptions& options = {});

// qemu-img check's exit status: 1 if the check failed or had internal errors,
// else 2 if corruptions remain, else 3 if leaks remain, else 0.
int CheckExitCode(const CheckResult& result);

// What `qemu-img check` prints on stdout for `result` (without the stderr
// messages): "No errors were found on the image." or the error summary, the
// allocation line, the image end offset; preceded by the "The following
// inconsistencies were found and repaired" block when something was fixed.
// `filename` is accepted for symmetry with the JSON form (qemu-img's human
// output does not name the file). Empty when result.error is set: qemu-img
// prints only "Check failed: <error>" (to stderr) then.
std::string FormatCheckHuman(const CheckResult& result, const std::string& filename);

// `qemu-img check --output=json`: the fields in qemu-img's order, each a
// number or a string. Always present: check-errors, filename, format
// ("qcow2"). Present only when non-zero: image-end-offset,
// compressed-clusters, total-clusters, corruptions, corruptions-fixed, leaks,
// leaks-fixed, allocated-clusters, fragmented-clusters. Render in order (for
// example with nlohmann::ordered_json) to match qemu-img byte for byte:
//   image-end-offset, compressed-clusters, total-clusters, corruptions,
//   corruptions-fixed, check-errors, leaks, leaks-fixed, allocated-clusters,
//   filename, format, fragmented-clusters
using CheckJsonValue = std::variant<uint64_t, std::string>;
std::vector<std::pair<std::string, CheckJsonValue>> CheckJsonFields(const CheckResult& result,
                                                                    const std::string& filename);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_CHECK_CHECK_H_
