// Command: one verb of the ublk-qcow2 command line (info, convert, ...), and
// the binary's exit statuses.
//
// main() (tools/main.cc) makes every verb in its table, gives each its own
// CLI11 subcommand to declare flags on, parses the command line, then runs
// the verb that was chosen and turns its Status into the exit status.
#ifndef UBLK_QCOW2_TOOLS_COMMAND_H_
#define UBLK_QCOW2_TOOLS_COMMAND_H_

#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "base/status.h"

namespace uq::tools {

// Exit statuses.
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;  // the verb failed: "ublk-qcow2: <message>" on stderr
inline constexpr int kExitUsage = 2;  // bad command line: the message and usage on stderr

class Command {
 public:
  virtual ~Command() = default;

  // Declares the verb's flags and positionals on `app` (its subcommand),
  // bound to members of this object. Called once, before parsing; may set
  // the subcommand's footer or other help text.
  virtual void AddFlags(CLI::App& app) = 0;

  // Runs the verb with the parsed flags, printing results on stdout. Errors
  // are returned, not printed: their message is the one line the user sees
  // after "ublk-qcow2: ", naming the file and the problem.
  virtual Status Run() = 0;

  // The exit status when Run() succeeded: 0, except for verbs whose outcome
  // has more shades (check: 2 corruptions, 3 leaks, like qemu-img check).
  virtual int exit_code() const { return kExitOk; }

  // The exit status when Run() failed: 1, except for verbs that follow a
  // qemu-img verb with its own numbering (compare: 2 an image would not
  // open, 3 a block status query failed, 4 a read failed).
  virtual int error_exit_code() const { return kExitError; }

  // The exit status of a bad command line for this verb: 2, except where
  // qemu-img's verb says otherwise (compare exits 1, as qemu-img compare's
  // option parser does).
  virtual int usage_exit_code() const { return kExitUsage; }
};

// The largest ublk device number: the kernel numbers its devices below 1 << 20 (its minor
// numbers' limit).
inline constexpr int kMaxDeviceId = (1 << 20) - 1;

// Declares -n/--id, the number N of /dev/ublkbN, bound to `id` and checked against
// [0, kMaxDeviceId], as every verb that names a device spells it.
inline CLI::Option* AddDeviceIdOption(CLI::App& app, int& id, const std::string& help) {
  return app.add_option("-n,--id", id, help)->check(CLI::Range(0, kMaxDeviceId));
}

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_COMMAND_H_
