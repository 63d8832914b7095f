// WrappingEnv: an Env over another one whose files forward everything to the
// base Env's files, except that each request they start passes through
// StartOn first, where a test Env records it, holds it, or lets it through.
// The base of RecordingEnv and of the gates tests build to order events.
// Test-only.
#ifndef UBLK_QCOW2_QCOW2_TESTING_WRAPPING_ENV_H_
#define UBLK_QCOW2_QCOW2_TESTING_WRAPPING_ENV_H_

#include <memory>
#include <string>

#include "base/status.h"
#include "qcow2/file.h"

namespace uq::qcow2::testing {

class WrappingEnv : public Env {
 public:
  explicit WrappingEnv(Env* base) : base_(base) {}
  Result<std::unique_ptr<File>> Open(const std::string& path, const OpenOptions& options) final {
    ASSIGN_OR_RETURN(std::unique_ptr<File> f, base_->Open(path, options));
    return std::unique_ptr<File>(std::make_unique<WrappedFile>(std::move(f), this));
  }
  bool Exists(const std::string& path) final { return base_->Exists(path); }

 protected:
  // A request started on a file of this Env, whose base file is `base`:
  // what File::Start returns (true once it completed). The default starts it
  // on the base file.
  virtual bool StartOn(File& base, IoRequest& req) { return base.Start(req); }

 private:
  class WrappedFile final : public File {
   public:
    WrappedFile(std::unique_ptr<File> base, WrappingEnv* env) : base_(std::move(base)), env_(env) {}
    bool Start(IoRequest& req) override { return env_->StartOn(*base_, req); }
    Result<uint64_t> Size() override { return base_->Size(); }
    Status Truncate(uint64_t size) override { return base_->Truncate(size); }
    const std::string& path() const override { return base_->path(); }

   private:
    std::unique_ptr<File> base_;
    WrappingEnv* env_;
  };

  Env* base_;
};

}  // namespace uq::qcow2::testing

#endif  // UBLK_QCOW2_QCOW2_TESTING_WRAPPING_ENV_H_
