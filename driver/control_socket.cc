#include "driver/control_socket.h"

#include <fmt/format.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <utility>

namespace uq::driver {
namespace {

std::string ErrorLine(const std::string& message) {
  nlohmann::json j;
  j["error"] = message;
  return j.dump() + "\n";
}

}  // namespace

Result<std::unique_ptr<ControlSocket>> ControlSocket::Listen(const std::string& path,
                                                             ControlHandlers handlers) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument(fmt::format("{}: a Unix socket path must be 1 to {} bytes long",
                                               path, sizeof(addr.sun_path) - 1));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());

  auto socket = std::make_unique<ControlSocket>(Key());
  socket->path_ = path;
  socket->handlers_ = std::move(handlers);
  socket->euid_ = ::geteuid();
  socket->listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (socket->listen_fd_ < 0) return Status::FromErrno(errno, "socket");
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Status::FromErrno(errno, path);
  // Until the chmod the file has the umask's mode; the peer check below
  // refuses anyone else who connects in between.
  if (::bind(socket->listen_fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Status::FromErrno(errno, path);
  }
  if (::chmod(path.c_str(), 0600) != 0 || ::listen(socket->listen_fd_, 16) != 0) {
    Status status = Status::FromErrno(errno, path);
    ::unlink(path.c_str());
    return status;
  }
  socket->epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = socket->listen_fd_;
  if (socket->epoll_fd_ < 0 ||
      ::epoll_ctl(socket->epoll_fd_, EPOLL_CTL_ADD, socket->listen_fd_, &ev) != 0) {
    Status status = Status::FromErrno(errno, "epoll");
    ::unlink(path.c_str());
    return status;
  }
  return socket;
}

ControlSocket::~ControlSocket() {
  while (!connections_.empty()) Close(connections_.begin()->first);
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    ::unlink(path_.c_str());
  }
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
}

void ControlSocket::Serve() {
  epoll_event events[16];
  int n = ::epoll_wait(epoll_fd_, events, 16, 0);
  for (int i = 0; i < n; ++i) {
    const int fd = events[i].data.fd;
    if (fd == listen_fd_) {
      Accept();
      continue;
    }
    auto it = connections_.find(fd);
    if (it == connections_.end()) continue;
    Connection& c = it->second;
    bool keep = true;
    if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) keep = Receive(fd, c);
    Progress(fd, c, keep);
  }
}

void ControlSocket::Progress(int fd, Connection& c, bool keep) {
  if (keep) keep = Send(fd, c);
  if (keep && c.closing && c.out.empty() && !c.shut) {
    // Said all: end our side, and read the peer's until it closes its own,
    // so that what it still sends does not reset the answer away.
    ::shutdown(fd, SHUT_WR);
    c.shut = true;
  }
  if (keep && c.peer_done && c.out.empty()) keep = false;
  if (keep) {
    Update(fd, c);
  } else {
    Close(fd);
  }
}

void ControlSocket::Accept() {
  for (;;) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN: no more; anything else: the peer went away
    if (connections_.size() >= kMaxControlConnections) {
      const std::string busy = ErrorLine(fmt::format("{}: too many connections", path_));
      (void)!::send(fd, busy.data(), busy.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      ::close(fd);
      continue;
    }
    Connection c;
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
        (cred.uid != 0 && cred.uid != euid_)) {
      c.out = ErrorLine(fmt::format("{}: permission denied (uid {})", path_, cred.uid));
      c.closing = true;
    }
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = fd;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      ::close(fd);
      continue;
    }
    auto it = connections_.emplace(fd, std::move(c)).first;
    if (it->second.closing) Progress(fd, it->second, true);
  }
}

bool ControlSocket::Receive(int fd, Connection& c) {
  char buf[4096];
  while (!c.peer_done) {
    ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n < 0) return false;  // reset: nobody to answer
    if (n == 0) {
      c.peer_done = true;
      break;
    }
    if (c.closing) continue;  // refused or overlong: read nothing more
    c.in.append(buf, static_cast<size_t>(n));
    // Answer each complete line; an overlong one ends the connection.
    size_t start = 0;
    for (size_t nl; (nl = c.in.find('\n', start)) != std::string::npos; start = nl + 1) {
      std::string line = c.in.substr(start, nl - start);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      if (line.size() > kMaxRequestBytes) break;
      c.out += Answer(line) + "\n";
    }
    c.in.erase(0, start);
    if (c.in.size() > kMaxRequestBytes) {
      c.out += ErrorLine(fmt::format("request longer than {} bytes", kMaxRequestBytes));
      c.in.clear();
      c.closing = true;
    }
  }
  if (c.peer_done && !c.closing && c.in.find_first_not_of(" \t\r") != std::string::npos) {
    // The last request without its newline: answer it all the same.
    c.out += Answer(c.in) + "\n";
    c.in.clear();
  }
  return true;
}

bool ControlSocket::Send(int fd, Connection& c) {
  while (!c.out.empty()) {
    ssize_t n = ::send(fd, c.out.data(), c.out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    if (n < 0) return false;  // the peer is gone
    c.out.erase(0, static_cast<size_t>(n));
  }
  return true;
}

void ControlSocket::Update(int fd, Connection& c) {
  epoll_event ev{};
  // Read until the peer is done; wait for room to write what is left.
  ev.events = 0;
  if (!c.peer_done) ev.events |= EPOLLIN | EPOLLRDHUP;
  if (!c.out.empty()) ev.events |= EPOLLOUT;
  ev.data.fd = fd;
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, fd, &ev);
}

void ControlSocket::Close(int fd) {
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
  ::close(fd);
  connections_.erase(fd);
}

std::string ControlSocket::Answer(const std::string& line) const {
  auto error = [](const std::string& message) {
    nlohmann::json j;
    j["error"] = message;
    return j.dump();
  };
  nlohmann::json request = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (request.is_discarded()) return error("the request is not valid JSON");
  if (!request.is_object()) return error("the request is not a JSON object");
  auto verb = request.find("verb");
  if (verb == request.end() || !verb->is_string()) {
    return error("the request names no \"verb\"");
  }
  auto handler = handlers_.find(verb->get<std::string>());
  if (handler == handlers_.end()) {
    return error(fmt::format("unknown verb \"{}\"", verb->get<std::string>()));
  }
  std::optional<Result<nlohmann::json>> answer;
  try {
    answer.emplace(handler->second(request));
  } catch (const nlohmann::json::exception& e) {
    return error(fmt::format("{}: a field has the wrong type ({})", handler->first, e.what()));
  }
  if (!answer->ok()) return error(answer->status().message());
  nlohmann::json reply = (*answer)->is_object() ? **answer : nlohmann::json::object();
  reply["ok"] = true;
  return reply.dump();
}

}  // namespace uq::driver
