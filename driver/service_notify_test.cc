// NotifyServiceManager against a datagram socket of our own, as systemd's
// would receive it: a path, an abstract name, no $NOTIFY_SOCKET at all, and
// names that are not socket addresses.
#include "driver/service_notify.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <string>

namespace uq::driver {
namespace {

// A bound datagram socket; `name` as in $NOTIFY_SOCKET.
class Listener {
 public:
  explicit Listener(const std::string& name) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, name.data(), name.size());
    if (name[0] == '@') addr.sun_path[0] = '\0';
    socklen_t length =
        static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size() + (name[0] == '/'));
    bound_ = ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), length) == 0;
  }
  ~Listener() { ::close(fd_); }
  bool bound() const { return bound_; }
  // The next datagram, or "" if none is waiting.
  std::string Receive() {
    char buf[256];
    ssize_t n = ::recv(fd_, buf, sizeof(buf), MSG_DONTWAIT);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
  }

 private:
  int fd_ = -1;
  bool bound_ = false;
};

class ServiceNotifyTest : public ::testing::Test {
 protected:
  void TearDown() override { ::unsetenv("NOTIFY_SOCKET"); }
};

TEST_F(ServiceNotifyTest, SendsToASocketPath) {
  // Bazel's TEST_TMPDIR is too long for a socket path (108 bytes).
  char dir[] = "/tmp/notify-test.XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/notify.sock";
  Listener listener(path);
  ASSERT_TRUE(listener.bound());
  ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  ASSERT_TRUE(NotifyServiceManager("READY=1").ok());
  EXPECT_EQ(listener.Receive(), "READY=1");
  ::unlink(path.c_str());
  ::rmdir(dir);
}

TEST_F(ServiceNotifyTest, SendsToAnAbstractName) {
  const std::string name = "@ublk-qcow2-notify-test-" + std::to_string(::getpid());
  Listener listener(name);
  ASSERT_TRUE(listener.bound());
  ::setenv("NOTIFY_SOCKET", name.c_str(), 1);
  ASSERT_TRUE(NotifyServiceManager("READY=1\nSTATUS=serving").ok());
  EXPECT_EQ(listener.Receive(), "READY=1\nSTATUS=serving");
}

TEST_F(ServiceNotifyTest, NothingWithoutAServiceManager) {
  ::unsetenv("NOTIFY_SOCKET");
  EXPECT_TRUE(NotifyServiceManager("READY=1").ok());
  ::setenv("NOTIFY_SOCKET", "", 1);
  EXPECT_TRUE(NotifyServiceManager("READY=1").ok());
}

TEST_F(ServiceNotifyTest, BadNamesAndMissingSocketsAreErrors) {
  ::setenv("NOTIFY_SOCKET", "relative/name", 1);
  EXPECT_TRUE(NotifyServiceManager("READY=1").IsInvalidArgument());
  ::setenv("NOTIFY_SOCKET", ("/" + std::string(200, 'x')).c_str(), 1);
  EXPECT_TRUE(NotifyServiceManager("READY=1").IsInvalidArgument());
  ::setenv("NOTIFY_SOCKET", "/nonexistent-dir/notify.sock", 1);
  Status st = NotifyServiceManager("READY=1");
  EXPECT_TRUE(st.IsIoError()) << st.ToString();
  EXPECT_NE(st.message().find("/nonexistent-dir/notify.sock"), std::string::npos);
}

}  // namespace
}  // namespace uq::driver
