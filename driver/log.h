// The daemon's log: one line on stderr, which the daemon's parent points at
// the log file (or the terminal with --foreground), flushed at once so that
// a crash loses no line. Key material and image contents never go here.
#ifndef UBLK_QCOW2_DRIVER_LOG_H_
#define UBLK_QCOW2_DRIVER_LOG_H_

#include <cstdio>
#include <string>

namespace uq::driver {

inline void Log(const std::string& line) {
  const std::string text = "ublk-qcow2: " + line + "\n";
  std::fputs(text.c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace uq::driver

#endif  // UBLK_QCOW2_DRIVER_LOG_H_
