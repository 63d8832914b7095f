// QueuedWrites: guest writes waiting on a cluster's locks, so that the write
// allocating that cluster can take them along.
//
// Sequential small writes into new clusters (mkfs, a file copy, a log) queue
// behind the one request that allocates their cluster: at depth 32 with 4 KiB
// writes and 64 KiB clusters, fifteen wait for the allocation and then write
// 4 KiB each. Instead, the allocating request copies the data of every
// waiting write that lies inside the window it writes anyway into its own
// buffer, makes one write, and when its L2 entry is updated completes them
// all with its own status.
//
// Why that is safe: a write is "parked" only while it waits (for a lock, or
// for its L2 entry to load), before it has issued any I/O of its own, and the
// first thing it does on waking is ask taken(); a taken write then waits for
// the taker's result and returns it. So a taken write completes exactly when
// its bytes are in place and mapped, never earlier, and never writes them a
// second time (which could land after a later write of the guest's to the
// same bytes).
//
// Thread model: the image's event loop only, like the locks it works with.
#ifndef UBLK_QCOW2_QCOW2_QUEUED_WRITES_H_
#define UBLK_QCOW2_QCOW2_QUEUED_WRITES_H_

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "base/wait_list.h"

namespace uq::qcow2 {

class QueuedWrites;

// One guest write inside one cluster, registered for its whole life.
class QueuedWrite {
 public:
  QueuedWrite(QueuedWrites* set, uint64_t cluster, uint64_t offset,
              std::span<const std::byte> data);
  ~QueuedWrite();
  QueuedWrite(const QueuedWrite&) = delete;
  QueuedWrite& operator=(const QueuedWrite&) = delete;

  // co_await Parked(lock.Lock(...)): awaits `awaiter`, takeable while it is
  // suspended there.
  template <class Awaiter>
  auto Parked(Awaiter awaiter) {
    struct Wrapped {
      QueuedWrite* self;
      Awaiter inner;
      bool await_ready() { return inner.await_ready(); }
      void await_suspend(std::coroutine_handle<> h) {
        self->parked_ = true;
        inner.await_suspend(h);
      }
      auto await_resume() {
        self->parked_ = false;
        return inner.await_resume();
      }
    };
    return Wrapped{this, std::move(awaiter)};
  }
  // The same around any other wait (a table load): Park() before the
  // co_await, Unpark() right after it, then ask taken().
  void Park() { parked_ = true; }
  void Unpark() { parked_ = false; }
  // Whether another request took this write along. Then the caller lets go
  // of its locks and returns co_await Result().
  bool taken() const { return taken_; }
  // The taker's status, once it has finished. REQUIRES: taken().
  Task<Status> Result() {
    while (!finished_) co_await finished_list_.Wait();
    co_return status_;
  }

  uint64_t offset() const { return offset_; }
  std::span<const std::byte> data() const { return data_; }

 private:
  friend class QueuedWrites;
  QueuedWrites* set_;
  uint64_t cluster_;
  uint64_t offset_;
  std::span<const std::byte> data_;
  bool parked_ = false;
  bool taken_ = false;
  bool finished_ = false;
  Status status_;
  WaitList finished_list_;
};

class QueuedWrites {
 public:
  // Marks taken, and returns, every parked write of guest `cluster` that lies
  // wholly inside guest bytes [begin, end).
  std::vector<QueuedWrite*> Take(uint64_t cluster, uint64_t begin, uint64_t end) {
    std::vector<QueuedWrite*> out;
    auto [it, last] = by_cluster_.equal_range(cluster);
    for (; it != last; ++it) {
      QueuedWrite* w = it->second;
      if (!w->parked_ || w->taken_) continue;
      if (w->offset_ < begin || w->offset_ + w->data_.size() > end) continue;
      w->taken_ = true;
      out.push_back(w);
      ++taken_total_;
    }
    return out;
  }
  // Completes taken writes with the taker's `status`. Each may resume (and
  // be gone) during this call.
  static void Finish(const std::vector<QueuedWrite*>& taken, const Status& status) {
    for (QueuedWrite* w : taken) {
      w->status_ = status;
      w->finished_ = true;
      w->finished_list_.NotifyAll();  // `w` may be destroyed from here on
    }
  }
  // How many writes have been taken along since this set was made.
  uint64_t taken_total() const { return taken_total_; }

 private:
  friend class QueuedWrite;
  std::unordered_multimap<uint64_t, QueuedWrite*> by_cluster_;
  uint64_t taken_total_ = 0;
};

inline QueuedWrite::QueuedWrite(QueuedWrites* set, uint64_t cluster, uint64_t offset,
                                std::span<const std::byte> data)
    : set_(set), cluster_(cluster), offset_(offset), data_(data) {
  set_->by_cluster_.emplace(cluster_, this);
}

inline QueuedWrite::~QueuedWrite() {
  auto [it, last] = set_->by_cluster_.equal_range(cluster_);
  for (; it != last; ++it) {
    if (it->second == this) {
      set_->by_cluster_.erase(it);
      return;
    }
  }
}

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_QUEUED_WRITES_H_
