// Command lines and errors of the power-failure test's tools (plr-writer, plr-replay).
//
// Each tool is "TOOL VERB --name value ...": ToolFlags parses the pairs after the verb, and
// every problem, with a flag or later, ends the tool through Die: one line
// "TOOL: problem" on stderr and exit 2, which 23-power-failure.sh reports as a failed step.
#ifndef UQ_TESTS_POWER_TOOL_FLAGS_H_
#define UQ_TESTS_POWER_TOOL_FLAGS_H_

#include <cstdint>
#include <map>
#include <string>

namespace uq::power {

// Prints "tool: message" to stderr and exits 2.
[[noreturn]] void Die(const std::string& tool, const std::string& message);

// Like Die, with ": strerror(errno)" after `what`.
[[noreturn]] void DieErrno(const std::string& tool, const std::string& what);

class ToolFlags {
 public:
  // Parses argv[2..] ("--name value" pairs); anything else ends the tool.
  ToolFlags(std::string tool, int argc, char** argv);

  bool Has(const std::string& name) const { return values_.count(name) != 0; }
  // The value of --name; ends the tool when it is missing.
  std::string Need(const std::string& name) const;
  // The value of --name, or `fallback` when it is missing.
  std::string Get(const std::string& name, const std::string& fallback) const;
  // --name as an unsigned decimal number, or `fallback` when it is missing; ends the tool
  // when the value is not one.
  uint64_t Number(const std::string& name, uint64_t fallback) const;
  // --name, required, as an unsigned decimal number.
  uint64_t NeedNumber(const std::string& name) const;
  // --name, required, as a signed decimal number (a writer mark may be -1).
  int64_t SignedNumber(const std::string& name) const;

 private:
  std::string tool_;
  std::map<std::string, std::string> values_;
};

}  // namespace uq::power

#endif  // UQ_TESTS_POWER_TOOL_FLAGS_H_
