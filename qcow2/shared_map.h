// SharedMap: where some guest clusters live in the host file, for threads
// other than the image's own.
//
// The engine (Qcow2Image) owns the image on one thread. Most requests of a
// running disk are reads and overwrites of clusters that are already
// allocated, whose mapping does not change while they run: they need the
// host offset and nothing else from the engine. The engine publishes such
// mappings here as it sees them, and the ublk queue threads serve those
// requests themselves, on their own rings (Qcow2Image::TryAnyThread), with
// no hop to the image's thread.
//
// Safety rests on pins, which play the part of the engine's shared cluster
// lock. A thread pins every cluster of its request before it starts the I/O
// and unpins them when the I/O is done. Before the engine changes a mapping
// (anything that takes a cluster's exclusive lock: allocation, copy-on-write,
// zeroing, discard, compression) it revokes the cluster here and waits until
// no pin on it is left. So no host cluster is freed, reused or rewritten
// under a request that still uses the old mapping, and no request starts on
// a mapping once its revocation has begun.
//
// A published mapping is read-only, or writable: writable means the host
// cluster belongs to this image alone (the COPIED flag) and holds no
// metadata, so data may be written there in place, exactly as the engine's
// own in-place write would.
//
// The table is direct-mapped (slot = cluster mod slots): a fixed size
// whatever the image size, and publishing a cluster evicts whatever unpinned
// mapping was in its slot. A missing mapping only costs a trip to the engine.
//
// Thread model: Publish, Revoke, RevokeAll and WaitUnpinned from the image's
// thread only; Acquire and Pin's destructor from any thread. One mutex
// guards the table; it is held for a few loads and stores at a time.
#ifndef UBLK_QCOW2_QCOW2_SHARED_MAP_H_
#define UBLK_QCOW2_QCOW2_SHARED_MAP_H_

#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace uq::qcow2 {

class SharedMap {
 public:
  // The most clusters one request may pin (larger requests go to the engine):
  // a 1 MiB request (the device's default largest) spans up to 17 clusters of
  // 64 KiB, 33 of 32 KiB.
  static constexpr size_t kMaxPinned = 33;

  // The clusters a request pinned; unpins them when destroyed.
  class [[nodiscard]] Pin {
   public:
    Pin() = default;
    Pin(Pin&& o) noexcept
        : map_(std::exchange(o.map_, nullptr)), slots_(o.slots_), count_(o.count_) {}
    Pin& operator=(Pin&& o) noexcept {
      Release();
      map_ = std::exchange(o.map_, nullptr);
      slots_ = o.slots_;
      count_ = o.count_;
      return *this;
    }
    ~Pin() { Release(); }
    void Release();

   private:
    friend class SharedMap;
    SharedMap* map_ = nullptr;
    std::array<uint32_t, kMaxPinned> slots_{};
    size_t count_ = 0;
  };

  // `slots` is rounded up to a power of two (at least 1).
  explicit SharedMap(size_t slots);
  SharedMap(const SharedMap&) = delete;
  SharedMap& operator=(const SharedMap&) = delete;

  // Records guest `cluster` at host offset `host` (writable or read-only).
  // Leaves the table as it is if the slot is pinned by another cluster or
  // the map is disabled.
  void Publish(uint64_t cluster, uint64_t host, bool writable) {
    Batch(this).Publish(cluster, host, writable);
  }
  // Many Publish calls under one lock (a whole L2 slice at a time).
  class [[nodiscard]] Batch {
   public:
    explicit Batch(SharedMap* map) : map_(map), lock_(map->mu_) {}
    void Publish(uint64_t cluster, uint64_t host, bool writable);

   private:
    SharedMap* map_;
    std::lock_guard<std::mutex> lock_;
  };

  // If every one of `count` clusters from `first` on is published (and
  // writable, for a write), pins them, stores their host offsets in `hosts`
  // and returns true. Otherwise pins nothing and returns false.
  // REQUIRES: 0 < count <= kMaxPinned.
  bool Acquire(uint64_t first, size_t count, bool write, uint64_t* hosts, Pin* pin);

  // Removes `cluster`'s mapping. Returns true if requests still hold pins on
  // it: the caller must WaitUnpinned() before changing the mapping.
  bool Revoke(uint64_t cluster);
  // What RevokeAll leaves behind: kStop publishes nothing from now on (the
  // image is closing, or read-only after corruption); kPublish lets the
  // engine publish again as it meets clusters (a snapshot was taken, the
  // bitmaps changed: the mappings are fine, but no request may run here
  // across the change).
  enum class After { kPublish, kStop };
  // Removes every mapping. Returns true if pins remain.
  bool RevokeAll(After after);
  // Blocks until no revoked mapping is pinned. The caller runs it off the
  // image's thread (Env::RunOffThread): the pins go away as other threads'
  // I/O completes.
  void WaitUnpinned();

  // Counters for tests and benchmarks.
  uint64_t acquired() const;
  size_t published() const;

 private:
  struct Slot {
    uint64_t key = 0;   // guest cluster + 1; 0: empty (or revoked while pinned)
    uint64_t host = 0;  // host offset | kWritable
    uint32_t pins = 0;
    bool revoked = false;  // revoked while pinned: counted in revoked_pinned_
  };
  static constexpr uint64_t kWritable = 1;

  uint32_t SlotOf(uint64_t cluster) const { return static_cast<uint32_t>(cluster & mask_); }
  void Unpin(const Pin& pin);

  const uint64_t mask_;
  mutable std::mutex mu_;
  std::condition_variable unpinned_;
  std::vector<Slot> slots_;
  bool disabled_ = false;
  // Slots revoked while pinned: WaitUnpinned waits for this to reach 0.
  size_t revoked_pinned_ = 0;
  uint64_t acquired_ = 0;
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_SHARED_MAP_H_
