// ControlSocket: a daemon's control channel, the Unix stream socket at
// /run/ublk-qcow2/<id>.sock (state_file.h's SocketPath) on which other
// processes ask a running device to do things (`ublk-qcow2 resize -n ID`).
//
// Protocol: one JSON object per line, each way. A request names its verb and
// carries the verb's fields:
//   {"verb":"resize","size":1073741824,"shrink":false}
// and is answered by one line: the handler's object with "ok":true added,
//   {"ok":true,"size":1073741824}
// or, when the request is not valid JSON, names no verb or an unknown one, or
// the handler fails, the handler's one-line message:
//   {"error":"unknown verb \"frobnicate\""}
// A connection may carry several requests, answered in order; a peer may
// close its side after its last request and still gets the answers. A line
// longer than kMaxRequestBytes is answered with an error, and nothing more is
// read from that connection (the answer is sent, our side shut down, and the
// connection closed when the peer closes its side). The client side is driver/control_client.h.
//
// Who may talk: the socket file is created with mode 0600 (its directory is
// root's), and each peer's uid (SO_PEERCRED) must be this process's euid or
// root; others get an error line and nothing more, as an overlong request.
//
// Never blocking: the sockets are non-blocking and Serve() does only what is
// ready, so a peer that connects and says nothing, or never reads its
// answer, holds nothing up. Handlers run inside Serve(), on its thread, and
// may block for as long as their work takes (resize waits for the image's
// thread); requests on other connections wait meanwhile.
//
// Thread model: one thread (the daemon's control thread). fd() is an epoll
// descriptor that polls readable when Serve() has work; the owner adds it to
// its own poll set.
#ifndef UBLK_QCOW2_DRIVER_CONTROL_SOCKET_H_
#define UBLK_QCOW2_DRIVER_CONTROL_SOCKET_H_

#include <sys/types.h>

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "base/status.h"

namespace uq::driver {

// One verb's work: the request (a JSON object with "verb") to the answer's
// fields, or an error whose message() is sent back. A field of the wrong type
// may throw nlohmann::json::exception: it is answered as an error too.
using ControlHandler = std::function<Result<nlohmann::json>(const nlohmann::json& request)>;
using ControlHandlers = std::map<std::string, ControlHandler, std::less<>>;

inline constexpr size_t kMaxRequestBytes = 64 * 1024;
// Connections served at once; more are answered with an error and closed.
inline constexpr size_t kMaxControlConnections = 32;

class ControlSocket {
 private:
  struct Key {
    explicit Key() = default;
  };

 public:
  explicit ControlSocket(Key) {}
  // Listens on `path`, replacing a socket file left there by a daemon that
  // died (nothing can be listening on it: the device id is ours). Fails with
  // InvalidArgument for a path too long for a Unix socket, IoError naming
  // the path otherwise.
  static Result<std::unique_ptr<ControlSocket>> Listen(const std::string& path,
                                                       ControlHandlers handlers);
  // Closes every connection and removes the socket file.
  ~ControlSocket();
  ControlSocket(const ControlSocket&) = delete;
  ControlSocket& operator=(const ControlSocket&) = delete;

  // Polls readable when there is something for Serve() to do.
  int fd() const { return epoll_fd_; }
  const std::string& path() const { return path_; }
  // Accepts, reads, answers, writes what is ready; never waits for a peer.
  void Serve();
  size_t connections() const { return connections_.size(); }

  // The answer to one request line (no newline), as Serve() sends it.
  // Exposed for tests.
  std::string Answer(const std::string& line) const;

 private:
  struct Connection {
    std::string in, out;
    bool peer_done = false;  // EOF seen: close once `out` is sent
    bool closing = false;    // refused or overlong: answer, then only wait for EOF
    bool shut = false;       // our side shut down after the last answer
  };
  void Accept();
  // Returns false when the connection is to be closed now.
  bool Receive(int fd, Connection& c);
  bool Send(int fd, Connection& c);
  // Sends what is ready and closes the connection when it is done (or
  // `keep` is false), else updates what it waits for.
  void Progress(int fd, Connection& c, bool keep);
  void Update(int fd, Connection& c);
  void Close(int fd);

  std::string path_;
  ControlHandlers handlers_;
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  uid_t euid_ = 0;
  std::map<int, Connection> connections_;
};

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_CONTROL_SOCKET_H_
