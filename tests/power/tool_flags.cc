#include "tests/power/tool_flags.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace uq::power {

void Die(const std::string& tool, const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", tool.c_str(), message.c_str());
  std::exit(2);
}

void DieErrno(const std::string& tool, const std::string& what) {
  Die(tool, what + ": " + std::strerror(errno));
}

ToolFlags::ToolFlags(std::string tool, int argc, char** argv) : tool_(std::move(tool)) {
  for (int i = 2; i < argc; i += 2) {
    if (std::strncmp(argv[i], "--", 2) != 0 || i + 1 >= argc) {
      Die(tool_, std::string("bad argument: ") + argv[i]);
    }
    values_[argv[i] + 2] = argv[i + 1];
  }
}

std::string ToolFlags::Need(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) Die(tool_, "--" + name + " is required");
  return it->second;
}

std::string ToolFlags::Get(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

uint64_t ToolFlags::Number(const std::string& name, uint64_t fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  const std::string& text = it->second;
  char* end = nullptr;
  errno = 0;
  const unsigned long long n = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || text[0] == '-' || *end != '\0' || errno != 0) {
    Die(tool_, "--" + name + ": not a number: " + text);
  }
  return n;
}

uint64_t ToolFlags::NeedNumber(const std::string& name) const {
  Need(name);
  return Number(name, 0);
}

int64_t ToolFlags::SignedNumber(const std::string& name) const {
  const std::string text = Need(name);
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0) {
    Die(tool_, "--" + name + ": not a number: " + text);
  }
  return n;
}

}  // namespace uq::power
