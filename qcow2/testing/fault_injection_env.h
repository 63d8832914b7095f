// FaultInjectionEnv: a MemEnv seen through a layer that injects I/O errors and
// models what a power loss leaves on disk (LevelDB's fault_injection_test and
// db_test's SpecialEnv are the model).
//
// Every File it opens forwards to a File of the underlying MemEnv, so the
// MemEnv's completion mode (synchronous or deferred, see mem_env.h) is the
// mode of these files too, and the MemEnv is the event loop to poll. It is
// MemEnv-only on purpose: the crash model needs each file's bytes as of its
// last sync, which it takes from MemEnv::Contents() and puts back with
// MemEnv::SetContents(), without issuing I/O of its own.
//
// Errors (Fault): a rule picks operations by kind and by path (or every
// file), lets `skip` of them pass, then hits the next `count` of them. A hit
// either fails the operation with an errno (EIO, ENOSPC: the engine sees
// IoError or NoSpace), without touching any bytes, or, for reads, makes it
// short. Injected failures complete synchronously (Start() returns true).
//
// Short reads. The File contract allows a short read only at end of file
// (implementations retry short transfers in the middle), so a short-read hit
// is shown to the engine exactly as end of file: the read returns at most
// `short_read_bytes` bytes, those bytes are the real data, and the rest of
// the buffer is untouched. That is what a file truncated under the engine
// looks like; ReadExact() turns it into Corruption. Use a kError rule on
// reads to model a read that fails instead.
//
// Crash model. For each file it keeps the durable bytes (as of the last
// completed Sync of that file) and the unsynced changes (writes, discards,
// zeroes, truncations) in the order they completed. A Sync makes durable what
// had completed when the Sync was *started*, as fdatasync does: a write still
// in flight then is not covered. A file's bytes when this Env first opens it
// count as durable; so do creating a file and truncating it at Open (as if
// the directory had been synced too). Changes made through the MemEnv
// directly, after this Env first opened the path, are invisible to the model
// (a crash undoes them): set files up before opening them here.
//
// Crash points. Writes, discards, zeroes, truncations and syncs are
// "boundaries", numbered from 0 across all files in the order they are
// started. CrashAtOperation(n) makes boundary n and everything after it not
// happen: from boundary n on, every operation on every file (reads too) and
// every Open fails with EIO, and operations in flight at that moment report
// EIO when they complete (a write among them did reach the file and counts
// as unsynced; a sync among them makes nothing durable). operation_count()
// says how many boundaries have happened, so a test runs its workload once to
// learn the count, then for each n in [0, count) runs it on a fresh
// MemEnv/FaultInjectionEnv with CrashAtOperation(n), drains the event loop,
// calls SimulateCrash() and reopens the image to check it.
//
// SimulateCrash(mode) rewrites every file this Env has opened to what a power
// loss could leave (see CrashMode), makes that the durable state, freezes
// every File opened before it (each of their operations fails with EIO) and
// clears the crash point and the crashed state; files opened afterwards work
// normally. Fault rules and the boundary count carry on.
//
// Thread model: every method and File may be used from any thread (one mutex
// guards the model). Completion order is the order the crash model records;
// overlapping writes racing on different threads are recorded in whichever
// order they complete, which is as undefined as on a real disk.
// REQUIRES: the MemEnv outlives this Env, and this Env outlives its Files'
// in-flight operations.
#ifndef UBLK_QCOW2_QCOW2_TESTING_FAULT_INJECTION_ENV_H_
#define UBLK_QCOW2_QCOW2_TESTING_FAULT_INJECTION_ENV_H_

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "qcow2/file.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2::testing {

// One error-injection rule.
struct Fault {
  // Operation kinds, combined with | in `ops`.
  static constexpr uint32_t kRead = 1u << 0;
  static constexpr uint32_t kWrite = 1u << 1;
  static constexpr uint32_t kSync = 1u << 2;
  static constexpr uint32_t kDiscard = 1u << 3;
  static constexpr uint32_t kZero = 1u << 4;
  static constexpr uint32_t kTruncate = 1u << 5;
  static constexpr uint32_t kAllocate = 1u << 6;
  static constexpr uint32_t kAllOps = (1u << 7) - 1;
  static constexpr uint64_t kForever = std::numeric_limits<uint64_t>::max();

  enum class Effect { kError, kShortRead };

  uint32_t ops = kAllOps;
  // Only operations on this path count; "" means every file.
  std::string path;
  // Matching operations (counted from AddFault) that pass before the first hit.
  uint64_t skip = 0;
  // Matching operations hit after the skipped ones; kForever: all of them.
  uint64_t count = 1;
  Effect effect = Effect::kError;
  // kError: the positive errno the operation fails with.
  int error = EIO;
  // kShortRead (reads only): the most bytes a hit read returns.
  uint64_t short_read_bytes = 0;
};

// What SimulateCrash() keeps of the unsynced changes. Truncations are always
// kept (in order) by the two random modes; they are rare and the engine
// syncs around them.
enum class CrashMode {
  // Every file goes back to its durable bytes.
  kDropAllUnsynced,
  // Each unsynced change is kept or dropped by a coin flip (seeded); the kept
  // ones are applied in completion order. Every sector ends up holding a
  // version it really had: reordering, but no torn writes.
  kKeepRandomSubset,
  // As kKeepRandomSubset, but the coin is flipped for each 512-byte sector of
  // each change: also tears multi-sector writes.
  kKeepRandomSectors,
  // Every change that reached the file is kept, in completion order: the
  // process died, the host did not (the page cache keeps what was written).
  // A write in flight at the crash point counts as having reached the file.
  kKeepAll,
};

class FaultInjectionEnv final : public Env {
 public:
  // REQUIRES: base outlives this Env.
  explicit FaultInjectionEnv(MemEnv* base);
  ~FaultInjectionEnv() override;
  FaultInjectionEnv(const FaultInjectionEnv&) = delete;
  FaultInjectionEnv& operator=(const FaultInjectionEnv&) = delete;

  // Env. Fails with EIO once crashed (until SimulateCrash()).
  Result<std::unique_ptr<File>> Open(const std::string& path, const OpenOptions& options) override;
  bool Exists(const std::string& path) override;
  // The MemEnv's (so deferred coroutines resume from its Poll()).
  bool Defer(std::coroutine_handle<> h) override { return base_->Defer(h); }

  // --- Errors ---
  void AddFault(Fault fault);
  // The n-th (0-based) write from now on, to `path` or to any file, fails.
  void FailNthWrite(uint64_t n, int error = EIO, std::string path = {});
  // The n-th sync from now on fails; nothing becomes durable.
  void FailNthSync(uint64_t n, int error = EIO, std::string path = {});
  // The n-th operation of any kind from now on and every one after it fail.
  void FailFrom(uint64_t n, int error = EIO, std::string path = {});
  // The n-th read from now on returns at most `bytes` bytes (see above).
  void ShortNthRead(uint64_t n, uint64_t bytes, std::string path = {});
  void ClearFaults();

  // --- Crash model ---
  // Boundary n and everything after it fail, see above. n may lie in the past
  // of operation_count(): then the next boundary crashes.
  void CrashAtOperation(uint64_t n);
  // Boundaries that have happened (started and not refused by the crash).
  uint64_t operation_count() const;
  // Whether the crash point has been reached.
  bool crashed() const;
  // Operations forwarded to the MemEnv and not completed yet.
  size_t in_flight() const;
  // Rewrites every file as described above, choosing with a generator seeded
  // by `seed`. InvalidArgument (and no change) while operations are in
  // flight: poll the MemEnv until in_flight() is 0 first.
  Status SimulateCrash(CrashMode mode, uint64_t seed = 0);

  // The bytes of `path` that a crash now would keep for sure; IoError(ENOENT)
  // for a file this Env has not opened.
  Result<std::vector<std::byte>> DurableContents(const std::string& path) const;
  // Unsynced changes recorded for `path` (0 for unknown paths).
  size_t unsynced_changes(const std::string& path) const;

 private:
  class FaultFile;

  // The crash model of one path (durable bytes, unsynced changes), shared by
  // the path's Files; defined in the .cc.
  struct FileModel;
  struct ActiveFault {
    Fault fault;
    uint64_t seen = 0;
  };
  // What Admit() decided for one operation.
  struct Admission {
    int error = 0;                       // > 0: fail now with this errno
    std::optional<uint64_t> short_read;  // cap on a read's length
    uint64_t sync_limit = 0;             // kSync: changes with seq below it
  };

  // Decides whether an operation of kind `kind` (a Fault bit) on a File of
  // `generation` happens; counts boundaries and fault rules. Admitted
  // operations count as in flight until Finish().
  Admission Admit(const std::string& path, uint64_t generation, uint32_t kind,
                  const FileModel& model);
  // Records the completion of an admitted operation whose raw result was
  // `result`; returns the result the caller sees.
  int64_t Finish(FileModel& model, const IoRequest& request, int64_t result, uint64_t sync_limit);
  // Records a truncation that `status` says did (or did not) happen.
  Status FinishTruncate(FileModel& model, uint64_t size, Status status);
  // Whether a File of `generation` may still do anything.
  bool Alive(uint64_t generation) const;
  // Runs `inner` on `base` and completes `outer` from it (see the .cc).
  Task<void> Forward(File* base, std::shared_ptr<FileModel> model, IoRequest* outer,
                     IoRequest inner, uint64_t sync_limit, bool* completed_inline);

  MemEnv* const base_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<FileModel>> models_;  // guarded by mu_
  std::vector<ActiveFault> faults_;                           // guarded by mu_
  uint64_t operation_count_ = 0;                              // guarded by mu_
  std::optional<uint64_t> crash_at_;                          // guarded by mu_
  bool crashed_ = false;                                      // guarded by mu_
  uint64_t generation_ = 0;                                   // guarded by mu_
  size_t in_flight_ = 0;                                      // guarded by mu_
};

}  // namespace uq::qcow2::testing

#endif  // UBLK_QCOW2_QCOW2_TESTING_FAULT_INJECTION_ENV_H_
