// Telling a service manager (systemd, Type=notify) how a foreground daemon is
// doing: the sd_notify protocol, written from its documentation, without
// libsystemd. The manager names a Unix datagram socket in $NOTIFY_SOCKET (a
// path, or "@name" for the abstract namespace); each notification is one
// datagram of "KEY=VALUE" lines, e.g. "READY=1" once the device is live.
//
// Thread model: plain functions; safe from any thread.
#ifndef UBLK_QCOW2_DRIVER_SERVICE_NOTIFY_H_
#define UBLK_QCOW2_DRIVER_SERVICE_NOTIFY_H_

#include <string_view>

#include "base/status.h"

namespace uq::driver {

// Sends `state` to the socket $NOTIFY_SOCKET names. OK and nothing sent when
// it is unset or empty (not started by a service manager). Errors: a name
// that is not a usable socket address (InvalidArgument), or the send's
// errno (IoError naming the socket).
Status NotifyServiceManager(std::string_view state);

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_SERVICE_NOTIFY_H_
