// WhenAll: run several Task<Status> concurrently and wait for all of them.
// Returns the first error (in argument order), after every task has finished,
// so no task outlives the buffers its caller owns.
#ifndef UBLK_QCOW2_BASE_WHEN_ALL_H_
#define UBLK_QCOW2_BASE_WHEN_ALL_H_

#include <vector>

#include "base/status.h"
#include "base/task.h"
#include "base/wait_list.h"

namespace uq {

inline Task<Status> WhenAll(std::vector<Task<Status>> tasks) {
  struct Shared {
    size_t remaining;
    std::vector<Status> results;
    WaitList done;
  } shared{tasks.size(), std::vector<Status>(tasks.size()), {}};
  if (tasks.empty()) co_return Status::Ok();
  for (size_t i = 0; i < tasks.size(); i++) {
    Spawn([](Task<Status> t, Shared* s, size_t i) -> Task<void> {
      s->results[i] = co_await std::move(t);
      if (--s->remaining == 0) s->done.NotifyAll();
    }(std::move(tasks[i]), &shared, i));
  }
  if (shared.remaining > 0) co_await shared.done.Wait();
  for (Status& s : shared.results) {
    if (!s.ok()) co_return std::move(s);
  }
  co_return Status::Ok();
}

}  // namespace uq

#endif  // UBLK_QCOW2_BASE_WHEN_ALL_H_
