#include "qcow2/paths.h"

#include <climits>
#include <cstdlib>
#include <memory>
#include <vector>

namespace uq::qcow2 {

std::string ResolveRelativeTo(const std::string& image_path, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  size_t slash = image_path.rfind('/');
  if (slash == std::string::npos) return name;
  return image_path.substr(0, slash + 1) + name;
}

std::string DataFilePath(const std::string& name, const std::string& working_dir) {
  if (name.empty() || name[0] == '/' || working_dir.empty()) return name;
  return working_dir.back() == '/' ? working_dir + name : working_dir + "/" + name;
}

std::string FileIdentity(const std::string& path) {
  std::unique_ptr<char, decltype(&std::free)> real(::realpath(path.c_str(), nullptr), &std::free);
  if (real) return real.get();
  // Lexical normalisation: collapse "//", "." and "..".
  std::vector<std::string> parts;
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    std::string part = path.substr(i, j - i);
    if (part == "..") {
      if (!parts.empty() && parts.back() != "..")
        parts.pop_back();
      else if (path[0] != '/')
        parts.push_back(part);
    } else if (!part.empty() && part != ".") {
      parts.push_back(part);
    }
    i = j + 1;
  }
  std::string out = path[0] == '/' ? "/" : "";
  for (size_t k = 0; k < parts.size(); k++) out += (k ? "/" : "") + parts[k];
  return out;
}

bool IsProtocolName(const std::string& name) {
  size_t colon = name.find(':');
  size_t slash = name.find('/');
  return colon != std::string::npos && (slash == std::string::npos || colon < slash);
}

}  // namespace uq::qcow2
