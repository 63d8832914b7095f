// RecordingEnv: an Env that wraps another and records every read and write
// started through the files it opens (path, offset, length), so a test can
// assert what the engine asked of storage: how many writes a cluster got,
// whether a backing file was read at all. Test-only.
//
// Thread model: one thread (the records are plain vectors).
#ifndef UBLK_QCOW2_QCOW2_TESTING_RECORDING_ENV_H_
#define UBLK_QCOW2_QCOW2_TESTING_RECORDING_ENV_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qcow2/file.h"
#include "qcow2/testing/wrapping_env.h"

namespace uq::qcow2::testing {

struct IoRecord {
  std::string path;
  uint64_t offset;
  uint64_t length;
};

class RecordingEnv final : public WrappingEnv {
 public:
  explicit RecordingEnv(Env* base) : WrappingEnv(base) {}

  // The writes (of any file) that touch [offset, offset + length).
  std::vector<IoRecord> WritesTouching(uint64_t offset, uint64_t length) const {
    std::vector<IoRecord> out;
    for (const IoRecord& w : writes) {
      if (w.offset < offset + length && offset < w.offset + w.length) out.push_back(w);
    }
    return out;
  }
  // The reads of file `path`.
  std::vector<IoRecord> ReadsOf(const std::string& path) const {
    std::vector<IoRecord> out;
    for (const IoRecord& r : reads) {
      if (r.path == path) out.push_back(r);
    }
    return out;
  }

  std::vector<IoRecord> writes;
  std::vector<IoRecord> reads;

 private:
  bool StartOn(File& base, IoRequest& req) override {
    if (req.op == IoRequest::Op::kWrite) writes.push_back({base.path(), req.offset, req.length});
    if (req.op == IoRequest::Op::kRead) reads.push_back({base.path(), req.offset, req.length});
    return base.Start(req);
  }
};

}  // namespace uq::qcow2::testing

#endif  // UBLK_QCOW2_QCOW2_TESTING_RECORDING_ENV_H_
