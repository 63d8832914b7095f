// ScratchDir: a fresh directory under $TEST_TMPDIR for tests that make images
// with qemu-img/qemu-io and inspect files, with the few shell and file helpers
// those tests share. Test-only; not thread-safe.
#ifndef UBLK_QCOW2_QCOW2_TESTING_SCRATCH_DIR_H_
#define UBLK_QCOW2_QCOW2_TESTING_SCRATCH_DIR_H_

#include <fmt/format.h>
#include <sys/wait.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace uq::qcow2::testing {

class ScratchDir {
 public:
  // Removes and recreates $TEST_TMPDIR/<name> (or /tmp/<name>).
  explicit ScratchDir(const std::string& name) {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = fmt::format("{}/{}", tmp ? tmp : "/tmp", name);
    ok_ = std::system(fmt::format("rm -rf '{0}' && mkdir -p '{0}'", dir_).c_str()) == 0;
  }

  bool ok() const { return ok_; }
  const std::string& dir() const { return dir_; }
  std::string path(const std::string& rel) const { return dir_ + "/" + rel; }

  // Runs `cmd` with sh in the directory; returns its exit status. Output goes
  // to `out` (stdout and stderr) when given, else is discarded.
  int Sh(const std::string& cmd, std::string* out = nullptr) const {
    const std::string file = path(".out");
    int st = std::system(fmt::format("cd '{}' && {} >'{}' 2>&1", dir_, cmd, file).c_str());
    if (out) {
      std::ifstream in(file);
      *out = std::string(std::istreambuf_iterator<char>(in), {});
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  }

  std::vector<std::byte> Slurp(const std::string& rel) const {
    std::ifstream in(path(rel), std::ios::binary);
    std::string c((std::istreambuf_iterator<char>(in)), {});
    std::vector<std::byte> bytes(c.size());
    std::memcpy(bytes.data(), c.data(), c.size());
    return bytes;
  }

  void Spit(const std::string& rel, const std::vector<std::byte>& bytes) const {
    std::ofstream(path(rel), std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }

 private:
  std::string dir_;
  bool ok_ = false;
};

// The shell words that run qemu-img for a LUKS create. QEMU 7.2 times PBKDF2 with a CPU clock
// that often does not move on tick-accounted kernels and then gives up ("Unable to get accurate
// CPU usage"); a test whose BUILD rule puts //tests/qemu:libprecise_thread_cpu.so in its data and
// its runfiles path in $QEMU_PRELOAD gets qemu-img with that library preloaded, which gives the
// probe the exact clock. Without it, plain qemu-img (callers retry).
inline std::string QemuImgForLuks() {
  const char* preload = std::getenv("QEMU_PRELOAD");
  const char* runfiles = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (!preload || !runfiles || !workspace) return "qemu-img";
  return fmt::format("LD_PRELOAD='{}/{}/{}' qemu-img", runfiles, workspace, preload);
}

}  // namespace uq::qcow2::testing

#endif  // UBLK_QCOW2_QCOW2_TESTING_SCRATCH_DIR_H_
