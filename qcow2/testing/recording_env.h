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

#include "base/status.h"
#include "qcow2/file.h"

namespace uq::qcow2::testing {

struct IoRecord {
  std::string path;
  uint64_t offset;
  uint64_t length;
};

class RecordingEnv final : public Env {
 public:
  explicit RecordingEnv(Env* base) : base_(base) {}
  Result<std::unique_ptr<File>> Open(const std::string& path, const OpenOptions& options) override {
    ASSIGN_OR_RETURN(std::unique_ptr<File> f, base_->Open(path, options));
    return std::unique_ptr<File>(std::make_unique<RecordingFile>(std::move(f), this));
  }
  bool Exists(const std::string& path) override { return base_->Exists(path); }

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
  class RecordingFile final : public File {
   public:
    RecordingFile(std::unique_ptr<File> base, RecordingEnv* env)
        : base_(std::move(base)), env_(env) {}
    bool Start(IoRequest& req) override {
      if (req.op == IoRequest::Op::kWrite) env_->writes.push_back({path(), req.offset, req.length});
      if (req.op == IoRequest::Op::kRead) env_->reads.push_back({path(), req.offset, req.length});
      return base_->Start(req);
    }
    Result<uint64_t> Size() override { return base_->Size(); }
    Status Truncate(uint64_t size) override { return base_->Truncate(size); }
    const std::string& path() const override { return base_->path(); }

   private:
    std::unique_ptr<File> base_;
    RecordingEnv* env_;
  };

  Env* base_;
};

}  // namespace uq::qcow2::testing

#endif  // UBLK_QCOW2_QCOW2_TESTING_RECORDING_ENV_H_
