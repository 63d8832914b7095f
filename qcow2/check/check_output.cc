// What qemu-img check prints and returns for a CheckResult: the human
// summary, the JSON fields and the exit status (declared in check.h).
#include <fmt/format.h>

#include <string>
#include <utility>
#include <vector>

#include "qcow2/check/check.h"

namespace uq::qcow2 {

int CheckExitCode(const CheckResult& result) {
  if (!result.error.empty() || result.check_errors) return 1;
  if (result.corruptions) return 2;
  if (result.leaks) return 3;
  return 0;
}

std::string FormatCheckHuman(const CheckResult& r, const std::string& /*filename*/) {
  if (!r.error.empty()) return "";
  std::string out;
  if (r.corruptions_fixed || r.leaks_fixed) {
    out += fmt::format(
        "The following inconsistencies were found and repaired:\n\n"
        "    {} leaked clusters\n"
        "    {} corruptions\n\n"
        "Double checking the fixed image now...\n",
        r.leaks_fixed, r.corruptions_fixed);
  }
  if (!(r.corruptions || r.leaks || r.check_errors)) {
    out += "No errors were found on the image.\n";
  } else {
    if (r.corruptions) {
      out += fmt::format(
          "\n{} errors were found on the image.\n"
          "Data may be corrupted, or further writes to the image may corrupt it.\n",
          r.corruptions);
    }
    if (r.leaks) {
      out += fmt::format(
          "\n{} leaked clusters were found on the image.\n"
          "This means waste of disk space, but no harm to data.\n",
          r.leaks);
    }
    if (r.check_errors) {
      out += fmt::format("\n{} internal errors have occurred during the check.\n", r.check_errors);
    }
  }
  if (r.total_clusters != 0 && r.allocated_clusters != 0) {
    out += fmt::format(
        "{}/{} = {:.2f}% allocated, {:.2f}% fragmented, {:.2f}% compressed clusters\n",
        r.allocated_clusters, r.total_clusters, r.allocated_clusters * 100.0 / r.total_clusters,
        r.fragmented_clusters * 100.0 / r.allocated_clusters,
        r.compressed_clusters * 100.0 / r.allocated_clusters);
  }
  if (r.image_end_offset) out += fmt::format("Image end offset: {}\n", r.image_end_offset);
  return out;
}

std::vector<std::pair<std::string, CheckJsonValue>> CheckJsonFields(const CheckResult& r,
                                                                    const std::string& filename) {
  std::vector<std::pair<std::string, CheckJsonValue>> out;
  auto optional = [&out](const char* key, uint64_t v) {
    if (v != 0) out.emplace_back(key, v);
  };
  // qemu-img's order (that of its QDict's hash buckets).
  optional("image-end-offset", r.image_end_offset);
  optional("compressed-clusters", r.compressed_clusters);
  optional("total-clusters", r.total_clusters);
  optional("corruptions", r.corruptions);
  optional("corruptions-fixed", r.corruptions_fixed);
  out.emplace_back("check-errors", r.check_errors);
  optional("leaks", r.leaks);
  optional("leaks-fixed", r.leaks_fixed);
  optional("allocated-clusters", r.allocated_clusters);
  out.emplace_back("filename", filename);
  out.emplace_back("format", std::string("qcow2"));
  optional("fragmented-clusters", r.fragmented_clusters);
  return out;
}

}  // namespace uq::qcow2
