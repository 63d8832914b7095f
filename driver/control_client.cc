#include "driver/control_client.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

namespace uq::driver {
namespace {

using Clock = std::chrono::steady_clock;

// Closes the descriptor on every return path.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Milliseconds left until `deadline`, at least 0.
int Left(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() > 0 ? static_cast<int>(left.count()) : 0;
}

}  // namespace

Result<nlohmann::json> CallControlSocket(const std::string& path, const nlohmann::json& request,
                                         int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument(fmt::format("{}: path too long for a Unix socket", path));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  Fd s{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  if (s.fd < 0) return Status::FromErrno(errno, "socket");
  if (::connect(s.fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    if (err == ENOENT || err == ECONNREFUSED) {
      return Status::NotSupported(fmt::format("no daemon is listening on {}", path));
    }
    return Status::FromErrno(err, path);
  }

  const std::string line = request.dump() + "\n";
  for (size_t done = 0; done < line.size();) {
    ssize_t n = ::send(s.fd, line.data() + done, line.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno(errno, path);
    done += static_cast<size_t>(n);
  }

  std::string answer;
  for (;;) {
    size_t nl = answer.find('\n');
    if (nl != std::string::npos) {
      answer.resize(nl);
      break;
    }
    pollfd p{s.fd, POLLIN, 0};
    int ready = ::poll(&p, 1, Left(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return Status::FromErrno(errno, path);
    if (ready == 0) {
      return Status::IoError(
          fmt::format("{}: no answer from the daemon within {} s", path, timeout_ms / 1000));
    }
    char buf[4096];
    ssize_t n = ::recv(s.fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno(errno, path);
    if (n == 0) {
      return Status::IoError(
          fmt::format("{}: the daemon closed the connection without an answer", path));
    }
    answer.append(buf, static_cast<size_t>(n));
  }

  nlohmann::json reply = nlohmann::json::parse(answer, nullptr, /*allow_exceptions=*/false);
  if (reply.is_discarded() || !reply.is_object()) {
    return Status::IoError(fmt::format("{}: the daemon's answer is not a JSON object", path));
  }
  auto error = reply.find("error");
  if (error != reply.end()) {
    return Status::IoError(error->is_string() ? error->get<std::string>() : error->dump());
  }
  auto ok = reply.find("ok");
  if (ok == reply.end() || !ok->is_boolean() || !ok->get<bool>()) {
    return Status::IoError(fmt::format("{}: the daemon's answer says neither ok nor error", path));
  }
  return reply;
}

}  // namespace uq::driver
