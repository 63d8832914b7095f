#include "qcow2/testing/mem_env.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <coroutine>
#include <cstring>
#include <utility>

namespace uq::qcow2::testing {

struct MemEnv::Node {
  std::vector<std::byte> bytes;
};

namespace {

constexpr uint64_t kDirectAlignment = 512;

bool Aligned(uint64_t value) { return value % kDirectAlignment == 0; }

// MemFile::Extent's unit: a block of zeros counts as a hole.
constexpr uint64_t kHoleBlock = 4096;

bool BlockIsZero(const std::vector<std::byte>& bytes, uint64_t block) {
  const uint64_t begin = block * kHoleBlock;
  const uint64_t end = std::min<uint64_t>(begin + kHoleBlock, bytes.size());
  for (uint64_t i = begin; i < end; i++) {
    if (bytes[i] != std::byte{0}) return false;
  }
  return true;
}

// Closes a host fd when it goes out of scope.
class HostFd {
 public:
  explicit HostFd(int fd) : fd_(fd) {}
  ~HostFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  HostFd(const HostFd&) = delete;
  HostFd& operator=(const HostFd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

}  // namespace

// One handle. It holds its Node, not the path, so Remove() leaves it working.
class MemEnv::MemFile final : public File {
 public:
  MemFile(MemEnv* env, std::shared_ptr<Node> node, std::string path, bool writable, bool direct)
      : env_(env),
        node_(std::move(node)),
        path_(std::move(path)),
        writable_(writable),
        direct_(direct) {}

  Result<uint64_t> Size() override {
    std::lock_guard lock(env_->mu_);
    return static_cast<uint64_t>(node_->bytes.size());
  }

  Status Truncate(uint64_t size) override {
    if (!writable_) {
      return Status::FromErrno(EBADF, fmt::format("{}: truncate to {} (read-only)", path_, size));
    }
    if (size > env_->options_.max_file_size) {
      return Status::FromErrno(EFBIG, fmt::format("{}: truncate to {}", path_, size));
    }
    std::lock_guard lock(env_->mu_);
    node_->bytes.resize(size);
    return Status::Ok();
  }

  const std::string& path() const override { return path_; }

  // Memory keeps no holes; this answers as a file system that stores no
  // all-zero block would (kHoleBlock bytes, the usual page), so sparse-file
  // logic (qemu-img map's holes) can be tested in memory.
  Result<FileExtent> Extent(uint64_t offset) override {
    std::lock_guard lock(env_->mu_);
    const std::vector<std::byte>& bytes = node_->bytes;
    const uint64_t size = bytes.size();
    if (offset >= size) return FileExtent{false, FileExtent::kToTheEnd};
    const bool data = !BlockIsZero(bytes, offset / kHoleBlock);
    uint64_t end = (offset / kHoleBlock + 1) * kHoleBlock;
    while (end < size && !BlockIsZero(bytes, end / kHoleBlock) == data) end += kHoleBlock;
    if (!data && end >= size) return FileExtent{false, FileExtent::kToTheEnd};
    return FileExtent{data, std::min(end, size) - offset};
  }

  Result<uint64_t> AllocatedBytes() override {
    std::lock_guard lock(env_->mu_);
    const std::vector<std::byte>& bytes = node_->bytes;
    uint64_t blocks = 0;
    for (uint64_t b = 0; b * kHoleBlock < bytes.size(); b++) blocks += !BlockIsZero(bytes, b);
    return blocks * kHoleBlock;
  }

  bool Start(IoRequest& req) override {
    if (env_->deferred()) {
      env_->Enqueue(Queued{&req, node_, writable_, direct_});
      return false;
    }
    std::lock_guard lock(env_->mu_);
    env_->Perform(*node_, writable_, direct_, req);
    return true;
  }

 private:
  MemEnv* const env_;
  const std::shared_ptr<Node> node_;
  const std::string path_;
  const bool writable_;
  const bool direct_;
};

MemEnv::MemEnv(MemEnvOptions options) : options_(options), rng_(options.seed) {}

// Out of line: Node is complete only here.
MemEnv::~MemEnv() {
  for (std::thread& t : off_threads_) t.join();
}

Result<std::unique_ptr<File>> MemEnv::Open(const std::string& path, const OpenOptions& options) {
  const bool writable = options.writable || options.create;
  if (options.truncate && !writable) {
    return Status::InvalidArgument(fmt::format("{}: truncate needs a writable open", path));
  }
  std::lock_guard lock(mu_);
  auto it = files_.find(path);
  if (it == files_.end()) {
    if (!options.create) return Status::FromErrno(ENOENT, path);
    it = files_.emplace(path, std::make_shared<Node>()).first;
  } else if (options.truncate) {
    it->second->bytes.clear();
  }
  return std::unique_ptr<File>(
      std::make_unique<MemFile>(this, it->second, path, writable, options.direct));
}

bool MemEnv::Exists(const std::string& path) {
  std::lock_guard lock(mu_);
  return files_.contains(path);
}

void MemEnv::Perform(Node& node, bool writable, bool direct, IoRequest& req) const {
  std::vector<std::byte>& bytes = node.bytes;
  const uint64_t size = bytes.size();
  const uint64_t end = req.offset + req.length;
  if (end < req.offset) {  // the range wraps around
    req.result = -EINVAL;
    return;
  }
  switch (req.op) {
    case IoRequest::Op::kRead: {
      if (direct && !(Aligned(req.offset) && Aligned(req.length) &&
                      Aligned(reinterpret_cast<uintptr_t>(req.data)))) {
        req.result = -EINVAL;
        return;
      }
      const uint64_t n = req.offset >= size ? 0 : std::min(req.length, size - req.offset);
      if (n > 0) std::memcpy(req.data, bytes.data() + req.offset, n);
      req.result = static_cast<int64_t>(n);
      return;
    }
    case IoRequest::Op::kWrite: {
      if (!writable) {
        req.result = -EBADF;
        return;
      }
      if (direct && !(Aligned(req.offset) && Aligned(req.length) &&
                      Aligned(reinterpret_cast<uintptr_t>(req.data)))) {
        req.result = -EINVAL;
        return;
      }
      if (end > options_.max_file_size) {
        req.result = -EFBIG;
        return;
      }
      if (end > size) bytes.resize(end);  // value-initialised: the gap reads as zeros
      if (req.length > 0) std::memcpy(bytes.data() + req.offset, req.data, req.length);
      req.result = static_cast<int64_t>(req.length);
      return;
    }
    case IoRequest::Op::kSync:
      req.result = 0;
      return;
    case IoRequest::Op::kDiscard:
    case IoRequest::Op::kZero: {
      if (!writable) {
        req.result = -EBADF;
        return;
      }
      if (req.offset < size) {
        std::fill(bytes.begin() + req.offset, bytes.begin() + std::min(end, size), std::byte{0});
      }
      req.result = 0;
      return;
    }
    case IoRequest::Op::kAllocate:
      if (!writable) {
        req.result = -EBADF;
        return;
      }
      if (end > options_.max_file_size) {
        req.result = -EFBIG;
        return;
      }
      if (end > size) bytes.resize(end);  // the new space reads as zeros
      req.result = 0;
      return;
  }
  req.result = -EINVAL;
}

void MemEnv::Enqueue(Queued queued) {
  std::lock_guard lock(mu_);
  queue_.push_back(std::move(queued));
}

bool MemEnv::Defer(std::coroutine_handle<> h) {
  if (!deferred()) return false;
  std::lock_guard lock(mu_);
  deferred_.push_back(h);
  return true;
}

Task<void> MemEnv::RunOffThread(std::function<void()> work) {
  if (!deferred()) {
    work();
    co_return;
  }
  struct Awaiter {
    MemEnv* env;
    std::function<void()>* work;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) {
      {
        std::lock_guard lock(env->mu_);
        env->off_thread_running_++;
      }
      env->off_threads_.emplace_back([env = env, work = work, h] {
        (*work)();
        std::lock_guard lock(env->mu_);
        env->off_thread_running_--;
        env->off_thread_done_.push_back(h);
        env->off_thread_cv_.notify_all();
      });
    }
    void await_resume() const noexcept {}
  };
  co_await Awaiter{this, &work};
}

bool MemEnv::Poll() {
  std::unique_lock lock(mu_);
  if (queue_.empty() && deferred_.empty() && off_thread_done_.empty()) {
    if (off_thread_running_ == 0) return false;
    // Nothing to complete here until off-thread work is done.
    off_thread_cv_.wait(lock, [this] { return !off_thread_done_.empty(); });
  }
  // Plain modulo on mt19937_64 output, not std::uniform_int_distribution:
  // the latter's algorithm differs between standard libraries, and a seed
  // must name one order everywhere.
  const size_t limit = std::max<size_t>(1, options_.max_completions_per_poll);
  const size_t count = queue_.empty() ? 0 : 1 + rng_() % std::min(limit, queue_.size());
  for (size_t i = 0; i < count && !queue_.empty(); ++i) {
    std::swap(queue_[rng_() % queue_.size()], queue_.back());
    Queued queued = std::move(queue_.back());
    queue_.pop_back();
    Perform(*queued.node, queued.writable, queued.direct, *queued.request);
    // The request may die as soon as its waiter runs: read the handle first.
    std::coroutine_handle<> waiter = queued.request->waiter;
    // The waiter may start more operations, which take mu_.
    lock.unlock();
    if (waiter) waiter.resume();
    lock.lock();
  }
  std::vector<std::coroutine_handle<>> deferred;
  deferred.swap(deferred_);
  deferred.insert(deferred.end(), off_thread_done_.begin(), off_thread_done_.end());
  off_thread_done_.clear();
  const bool reap = off_thread_running_ == 0 && !off_threads_.empty();
  lock.unlock();
  if (reap) {  // all have finished their work; they only have to exit
    for (std::thread& t : off_threads_) t.join();
    off_threads_.clear();
  }
  for (std::coroutine_handle<> h : deferred) h.resume();
  return true;
}

size_t MemEnv::pending() const {
  std::lock_guard lock(mu_);
  return queue_.size();
}

std::vector<std::byte> MemEnv::Contents(const std::string& path) const {
  std::lock_guard lock(mu_);
  auto it = files_.find(path);
  return it == files_.end() ? std::vector<std::byte>() : it->second->bytes;
}

void MemEnv::SetContents(const std::string& path, std::span<const std::byte> bytes) {
  std::lock_guard lock(mu_);
  std::shared_ptr<Node>& node = files_[path];
  if (!node) node = std::make_shared<Node>();
  node->bytes.assign(bytes.begin(), bytes.end());
}

bool MemEnv::Remove(const std::string& path) {
  std::lock_guard lock(mu_);
  return files_.erase(path) > 0;
}

Result<uint64_t> MemEnv::FileSize(const std::string& path) const {
  std::lock_guard lock(mu_);
  auto it = files_.find(path);
  if (it == files_.end()) return Status::FromErrno(ENOENT, path);
  return static_cast<uint64_t>(it->second->bytes.size());
}

std::vector<std::string> MemEnv::Paths() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> paths;
  paths.reserve(files_.size());
  for (const auto& [path, node] : files_) paths.push_back(path);
  return paths;
}

Status MemEnv::ExportToHostFile(const std::string& path_in_env,
                                const std::string& host_path) const {
  std::vector<std::byte> bytes;
  {
    std::lock_guard lock(mu_);
    auto it = files_.find(path_in_env);
    if (it == files_.end()) return Status::FromErrno(ENOENT, path_in_env);
    bytes = it->second->bytes;
  }
  HostFd fd(::open(host_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) return Status::FromErrno(errno, host_path);
  uint64_t done = 0;
  while (done < bytes.size()) {
    ssize_t n =
        ::pwrite(fd.get(), bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(
          errno, fmt::format("{}: export of {} at offset {}", host_path, path_in_env, done));
    }
    done += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status MemEnv::ImportFromHostFile(const std::string& host_path, const std::string& path_in_env) {
  HostFd fd(::open(host_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return Status::FromErrno(errno, host_path);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, host_path + ": stat");
  if (static_cast<uint64_t>(st.st_size) > options_.max_file_size) {
    return Status::FromErrno(EFBIG, fmt::format("{}: import as {}", host_path, path_in_env));
  }
  std::vector<std::byte> bytes(static_cast<size_t>(st.st_size));
  uint64_t done = 0;
  while (done < bytes.size()) {
    ssize_t n =
        ::pread(fd.get(), bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, fmt::format("{}: import at offset {}", host_path, done));
    }
    if (n == 0) break;  // the file shrank under us: keep what was there
    done += static_cast<uint64_t>(n);
  }
  bytes.resize(done);
  SetContents(path_in_env, bytes);
  return Status::Ok();
}

}  // namespace uq::qcow2::testing
