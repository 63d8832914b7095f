// The control socket and its client on the host (no ublk): round trips,
// malformed and unknown requests, peers that go away, who may connect.
#include "driver/control_socket.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>

#include "driver/control_client.h"

namespace uq::driver {
namespace {

using nlohmann::json;

constexpr int kTimeoutMs = 10'000;

// A short scratch directory: Unix socket paths are limited to 107 bytes, and
// TEST_TMPDIR can be longer.
class ScratchDir {
 public:
  ScratchDir() {
    char tmpl[] = "/tmp/uq-ctl.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~ScratchDir() { std::filesystem::remove_all(path_); }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

ControlHandlers TestHandlers() {
  ControlHandlers h;
  h["echo"] = [](const json& request) -> Result<json> {
    json answer;
    answer["size"] = request.at("size").get<uint64_t>();
    return answer;
  };
  h["fail"] = [](const json&) -> Result<json> {
    return Status::InvalidArgument("device 0: the new size must be a multiple of 512");
  };
  return h;
}

// Serves a ControlSocket on its own thread, as the daemon's wait loop does.
class Server {
 public:
  explicit Server(const std::string& path, ControlHandlers handlers = TestHandlers()) {
    Result<std::unique_ptr<ControlSocket>> socket =
        ControlSocket::Listen(path, std::move(handlers));
    EXPECT_TRUE(socket.ok()) << socket.status().ToString();
    if (!socket.ok()) return;
    socket_ = std::move(socket).value();
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC);
    thread_ = std::thread([this] {
      for (;;) {
        pollfd fds[2] = {{socket_->fd(), POLLIN, 0}, {stop_fd_, POLLIN, 0}};
        ::poll(fds, 2, -1);
        if (fds[1].revents & POLLIN) return;
        socket_->Serve();
        connections_.store(socket_->connections());
      }
    });
  }
  ~Server() { Stop(); }
  void Stop() {
    if (!thread_.joinable()) return;
    const uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof(one));
    thread_.join();
    ::close(stop_fd_);
    socket_.reset();
  }
  size_t connections() const { return connections_.load(); }

 private:
  std::unique_ptr<ControlSocket> socket_;
  int stop_fd_ = -1;
  std::atomic<size_t> connections_{0};
  std::thread thread_;
};

int Connect(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    ::close(fd);
    return -err;
  }
  return fd;
}

void SendText(int fd, const std::string& text) {
  ASSERT_EQ(::send(fd, text.data(), text.size(), MSG_NOSIGNAL), static_cast<ssize_t>(text.size()));
}

// Reads `lines` answer lines (or until EOF / 10 s).
std::string ReadLines(int fd, int lines) {
  std::string got;
  while (std::count(got.begin(), got.end(), '\n') < lines) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, kTimeoutMs) <= 0) break;
    char buf[4096];
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  return got;
}

// True when the server closed `fd` (EOF within 10 s).
bool ClosedByServer(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, kTimeoutMs) <= 0) return false;
  char c;
  return ::recv(fd, &c, 1, 0) == 0;
}

template <class Pred>
bool Eventually(Pred pred) {
  for (int i = 0; i < 1000; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

TEST(ControlSocketTest, RoundTrip) {
  ScratchDir dir;
  Server server(dir / "0.sock");
  Result<json> answer =
      CallControlSocket(dir / "0.sock", {{"verb", "echo"}, {"size", 1ull << 40}}, kTimeoutMs);
  ASSERT_TRUE(answer.ok()) << answer.status().ToString();
  EXPECT_EQ(*answer, json({{"ok", true}, {"size", 1ull << 40}}));
}

TEST(ControlSocketTest, HandlerErrorIsTheAnswer) {
  ScratchDir dir;
  Server server(dir / "0.sock");
  Result<json> answer = CallControlSocket(dir / "0.sock", {{"verb", "fail"}}, kTimeoutMs);
  ASSERT_FALSE(answer.ok());
  EXPECT_EQ(answer.status().message(), "device 0: the new size must be a multiple of 512");
}

TEST(ControlSocketTest, UnknownVerb) {
  ScratchDir dir;
  Server server(dir / "0.sock");
  Result<json> answer = CallControlSocket(dir / "0.sock", {{"verb", "frobnicate"}}, kTimeoutMs);
  ASSERT_FALSE(answer.ok());
  EXPECT_EQ(answer.status().message(), "unknown verb \"frobnicate\"");
}

TEST(ControlSocketTest, MalformedRequestsAreAnsweredAndTheConnectionGoesOn) {
  ScratchDir dir;
  Server server(dir / "0.sock");
  int fd = Connect(dir / "0.sock");
  ASSERT_GE(fd, 0);
  SendText(fd,
           "not json\n[1,2]\n{}\n{\"verb\":7}\n{\"verb\":\"echo\",\"size\":\"big\"}\n"
           "\n{\"verb\":\"echo\",\"size\":512}\r\n");
  std::string got = ReadLines(fd, 6);
  ::close(fd);
  std::vector<json> lines;
  for (size_t start = 0, nl; (nl = got.find('\n', start)) != std::string::npos; start = nl + 1) {
    lines.push_back(json::parse(got.substr(start, nl - start)));
  }
  ASSERT_EQ(lines.size(), 6u) << got;
  EXPECT_EQ(lines[0], json({{"error", "the request is not valid JSON"}}));
  EXPECT_EQ(lines[1], json({{"error", "the request is not a JSON object"}}));
  EXPECT_EQ(lines[2], json({{"error", "the request names no \"verb\""}}));
  EXPECT_EQ(lines[3], json({{"error", "the request names no \"verb\""}}));
  ASSERT_TRUE(lines[4].contains("error"));
  EXPECT_EQ(lines[4]["error"].get<std::string>().rfind("echo: a field has the wrong type", 0), 0u)
      << lines[4];
  EXPECT_EQ(lines[5], json({{"ok", true}, {"size", 512}}));
}

TEST(ControlSocketTest, LastRequestWithoutNewlineAfterShutdown) {
  ScratchDir dir;
  Server server(dir / "0.sock");
  int fd = Connect(dir / "0.sock");
  ASSERT_GE(fd, 0);
  SendText(fd, "{\"verb\":\"echo\",\"size\":4096}");
  ::shutdown(fd, SHUT_WR);
  EXPECT_EQ(ReadLines(fd, 1), "{\"ok\":true,\"size\":4096}\n");
  EXPECT_TRUE(ClosedByServer(fd));
  ::close(fd);
}

TEST(ControlSocketTest, OverlongRequestClosesTheConnection) {
  ScratchDir dir;
  Server server(dir / "0.sock");
  int fd = Connect(dir / "0.sock");
  ASSERT_GE(fd, 0);
  std::string big(kMaxRequestBytes + 10, 'x');
  // The server may close before taking it all: ignore a short send.
  (void)!::send(fd, big.data(), big.size(), MSG_NOSIGNAL);
  std::string got = ReadLines(fd, 1);
  EXPECT_NE(got.find("request longer than 65536 bytes"), std::string::npos) << got;
  EXPECT_TRUE(ClosedByServer(fd));
  ::close(fd);
}

TEST(ControlSocketTest, PeersThatDisconnectLeaveNothingBehind) {
  ScratchDir dir;
  Server server(dir / "0.sock");
  // Half a request, then gone.
  int a = Connect(dir / "0.sock");
  ASSERT_GE(a, 0);
  SendText(a, "{\"verb\":\"ec");
  // A whole request, gone before reading the answer.
  int b = Connect(dir / "0.sock");
  ASSERT_GE(b, 0);
  SendText(b, "{\"verb\":\"echo\",\"size\":1}\n");
  // Connected and silent: holds nothing up while it stays.
  int c = Connect(dir / "0.sock");
  ASSERT_GE(c, 0);
  ::close(a);
  ::close(b);
  Result<json> answer =
      CallControlSocket(dir / "0.sock", {{"verb", "echo"}, {"size", 2}}, kTimeoutMs);
  ASSERT_TRUE(answer.ok()) << answer.status().ToString();
  EXPECT_EQ((*answer)["size"], 2);
  EXPECT_TRUE(Eventually([&] { return server.connections() == 1; })) << server.connections();
  ::close(c);
  EXPECT_TRUE(Eventually([&] { return server.connections() == 0; })) << server.connections();
}

TEST(ControlSocketTest, SocketIsRootOnlyAndRemovedAtTheEnd) {
  ScratchDir dir;
  const std::string path = dir / "0.sock";
  {
    Server server(path);
    struct stat st;
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 07777, 0600u);
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

// Another user: refused by the file's mode, and by the peer check when the
// mode is opened up. Needs root, to become another user.
TEST(ControlSocketTest, OtherUsersAreRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to connect as another user";
  ScratchDir dir;
  const std::string path = dir / "0.sock";
  Server server(path);
  ASSERT_EQ(::chmod(std::filesystem::path(path).parent_path().c_str(), 0755), 0);
  auto as_nobody = [&]() -> int {  // 0: refused as expected, else a failure code
    pid_t child = ::fork();
    if (child == 0) {
      if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(10);
      int fd = Connect(path);
      if (fd == -EACCES) ::_exit(0);  // the file's mode
      if (fd < 0) ::_exit(11);
      // The server may have answered and closed already: ignore a failed send.
      const std::string request = "{\"verb\":\"echo\",\"size\":1}\n";
      (void)!::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
      std::string got = ReadLines(fd, 1);
      ::_exit(got.find("permission denied") != std::string::npos && ClosedByServer(fd) ? 0 : 12);
    }
    int status = 0;
    ::waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 99;
  };
  const int first = as_nobody();
  // Bazel's sandbox may run tests in a user namespace with no other uid.
  if (first == 10) GTEST_SKIP() << "cannot become uid 65534 here (setuid failed)";
  EXPECT_EQ(first, 0);
  ASSERT_EQ(::chmod(path.c_str(), 0666), 0);
  EXPECT_EQ(as_nobody(), 0);
  // Root still gets its answers.
  EXPECT_TRUE(CallControlSocket(path, {{"verb", "echo"}, {"size", 1}}, kTimeoutMs).ok());
}

TEST(ControlSocketTest, StaleSocketFileIsReplaced) {
  ScratchDir dir;
  const std::string path = dir / "0.sock";
  {
    // What a killed daemon leaves: a socket file nobody listens on.
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    ASSERT_EQ(::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(fd);
  }
  Result<json> stale = CallControlSocket(path, {{"verb", "echo"}, {"size", 1}}, kTimeoutMs);
  ASSERT_FALSE(stale.ok());
  EXPECT_TRUE(stale.status().IsNotSupported());
  EXPECT_EQ(stale.status().message(), "no daemon is listening on " + path);
  Server server(path);
  EXPECT_TRUE(CallControlSocket(path, {{"verb", "echo"}, {"size", 1}}, kTimeoutMs).ok());
}

TEST(ControlSocketTest, NoDaemon) {
  ScratchDir dir;
  Result<json> answer = CallControlSocket(dir / "7.sock", {{"verb", "echo"}}, kTimeoutMs);
  ASSERT_FALSE(answer.ok());
  EXPECT_TRUE(answer.status().IsNotSupported());
  EXPECT_EQ(answer.status().message(), "no daemon is listening on " + (dir / "7.sock"));
}

TEST(ControlSocketTest, DaemonThatNeverAnswersTimesOut) {
  ScratchDir dir;
  const std::string path = dir / "0.sock";
  // Listening, never served: the client gives up after its time.
  Result<std::unique_ptr<ControlSocket>> socket = ControlSocket::Listen(path, TestHandlers());
  ASSERT_TRUE(socket.ok());
  Result<json> answer = CallControlSocket(path, {{"verb", "echo"}, {"size", 1}}, 200);
  ASSERT_FALSE(answer.ok());
  EXPECT_NE(answer.status().message().find("no answer from the daemon"), std::string::npos)
      << answer.status().ToString();
}

TEST(ControlSocketTest, PathTooLong) {
  Result<std::unique_ptr<ControlSocket>> socket =
      ControlSocket::Listen("/tmp/" + std::string(200, 'x'), TestHandlers());
  ASSERT_FALSE(socket.ok());
  EXPECT_TRUE(socket.status().IsInvalidArgument());
}

}  // namespace
}  // namespace uq::driver
