#include "tools/info_format.h"

#include <fmt/format.h>

#include <ctime>
#include <string_view>

#include "tools/size_format.h"

namespace uq::tools {
namespace {

using nlohmann::ordered_json;

constexpr uint64_t kNanosPerSecond = 1'000'000'000;

ordered_json SnapshotToJson(const qcow2::SnapshotInfo& s) {
  ordered_json j = ordered_json::object();
  if (s.icount != -1) j["icount"] = s.icount;
  j["vm-clock-nsec"] = s.vm_clock_nsec % kNanosPerSecond;
  j["name"] = s.name;
  j["date-sec"] = s.date_sec;
  j["date-nsec"] = s.date_nsec;
  j["vm-clock-sec"] = s.vm_clock_nsec / kNanosPerSecond;
  j["id"] = s.id;
  // QAPI's SnapshotInfo declares vm-state-size as int: qemu-img shows a size
  // of 2^63 or more as a negative number (all ones: -1).
  j["vm-state-size"] = static_cast<int64_t>(s.vm_state_size);
  return j;
}

// One bitmap: flags ("in-use" before "auto", as QEMU maps them), name, granularity.
ordered_json BitmapToJson(const qcow2::BitmapInfo& b) {
  ordered_json flags = ordered_json::array();
  if (b.in_use) flags.push_back("in-use");
  if (b.enabled) flags.push_back("auto");
  ordered_json j = ordered_json::object();
  j["flags"] = std::move(flags);
  j["name"] = b.name;
  j["granularity"] = b.granularity;
  return j;
}

// The "encrypt" member, in the order qemu-img prints its QDict.
ordered_json EncryptToJson(const qcow2::EncryptInfo& e) {
  ordered_json j = ordered_json::object();
  if (e.format == "aes") {  // legacy AES: no header, nothing else to show
    j["format"] = e.format;
    return j;
  }
  j["ivgen-alg"] = e.ivgen_alg;
  j["hash-alg"] = e.hash_alg;
  j["cipher-alg"] = e.cipher_alg;
  j["uuid"] = e.uuid;
  if (!e.ivgen_hash_alg.empty()) j["ivgen-hash-alg"] = e.ivgen_hash_alg;
  j["format"] = e.format;
  j["cipher-mode"] = e.cipher_mode;
  ordered_json slots = ordered_json::array();
  for (const qcow2::LuksSlotInfo& s : e.slots) {
    ordered_json slot = ordered_json::object();
    slot["active"] = s.active;
    if (s.active) slot["iters"] = s.iters;
    slot["key-offset"] = s.key_offset;
    if (s.active) slot["stripes"] = s.stripes;
    slots.push_back(std::move(slot));
  }
  j["slots"] = std::move(slots);
  j["payload-offset"] = e.payload_offset;
  j["master-key-iters"] = e.master_key_iters;
  return j;
}

// The "data" member of format-specific for a qcow2 image.
ordered_json Qcow2DataToJson(const qcow2::Qcow2SpecificInfo& q) {
  const bool v3 = q.compat != "0.10";
  ordered_json j = ordered_json::object();
  j["compat"] = q.compat;
  j["compression-type"] = q.compression_type;
  if (v3) j["lazy-refcounts"] = q.lazy_refcounts;
  if (v3 && !q.bitmaps.empty()) {
    ordered_json list = ordered_json::array();
    for (const qcow2::BitmapInfo& b : q.bitmaps) list.push_back(BitmapToJson(b));
    j["bitmaps"] = std::move(list);
  }
  j["refcount-bits"] = q.refcount_bits;
  if (q.encrypt.has_value()) j["encrypt"] = EncryptToJson(*q.encrypt);
  if (v3 && q.data_file.has_value()) {
    j["data-file"] = *q.data_file;
    j["data-file-raw"] = q.data_file_raw;
  }
  if (v3) {
    j["corrupt"] = q.corrupt;
    j["extended-l2"] = q.extended_l2;
  }
  return j;
}

// QEMU's JSON printer opens and closes an empty list on lines of their own
// ("[" then "]" at the list's indentation) where nlohmann writes "[]".
std::string SplitEmptyArrays(const std::string& text) {
  std::string out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + start, end - start);
    // Strings are escaped to ASCII and end in a quote, so a line ending in
    // "[]" or "[]," is an empty array.
    std::string_view rest = line.ends_with(",") ? line.substr(0, line.size() - 1) : line;
    if (rest.ends_with("[]")) {
      const size_t indent = line.find_first_not_of(' ');
      out.append(rest.substr(0, rest.size() - 1));
      out += '\n';
      out.append(indent == std::string_view::npos ? 0 : indent, ' ');
      out.append(line.substr(rest.size() - 1));
    } else {
      out.append(line);
    }
    if (end < text.size()) out += '\n';
    start = end + 1;
  }
  return out;
}

std::string Dump(const ordered_json& j) {
  return SplitEmptyArrays(
             j.dump(4, ' ', /*ensure_ascii=*/true, ordered_json::error_handler_t::replace)) +
         "\n";
}

// A scalar as qemu's human dump prints it: strings bare, booleans as words.
std::string ScalarToText(const ordered_json& value) {
  if (value.is_string()) return value.get<std::string>();
  return value.dump(-1, ' ', false, ordered_json::error_handler_t::replace);
}

bool IsComposite(const ordered_json& value) { return value.is_object() || value.is_array(); }

// qemu-img's human dump of a QDict or QList (its dump_qobject): one line per
// member at 4 spaces per `level`, keys with dashes turned into spaces, list
// items as "[i]:", nested dicts and lists on the lines below.
void DumpHuman(const ordered_json& value, int level, std::string& out) {
  const std::string indent(4 * level, ' ');
  auto member = [&](const std::string& label, const ordered_json& v) {
    out += indent + label + ":";
    if (IsComposite(v)) {
      out += '\n';
      DumpHuman(v, level + 1, out);
    } else {
      out += ' ' + ScalarToText(v) + '\n';
    }
  };
  if (value.is_object()) {
    for (const auto& [key, v] : value.items()) {
      std::string label = key;
      for (char& c : label) {
        if (c == '-') c = ' ';
      }
      member(label, v);
    }
  } else if (value.is_array()) {
    for (size_t i = 0; i < value.size(); ++i) member(fmt::format("[{}]", i), value[i]);
  }
}

std::string LocalDateTime(uint32_t date_sec) {
  std::time_t t = static_cast<std::time_t>(date_sec);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[64];
  if (std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm) == 0) return "?";
  return buf;
}

}  // namespace

ordered_json ImageInfoToJson(const qcow2::ImageInfo& info) {
  const bool has_backing = info.backing_filename.has_value();
  ordered_json j = ordered_json::object();
  if (has_backing && info.backing_format.has_value()) {
    j["backing-filename-format"] = *info.backing_format;
  }
  if (!info.snapshots.empty()) {
    ordered_json list = ordered_json::array();
    for (const qcow2::SnapshotInfo& s : info.snapshots) list.push_back(SnapshotToJson(s));
    j["snapshots"] = std::move(list);
  }
  j["virtual-size"] = info.virtual_size;
  j["filename"] = info.filename;
  if (info.cluster_size.has_value()) j["cluster-size"] = *info.cluster_size;
  j["format"] = info.format;
  j["actual-size"] = info.actual_size;
  if (info.qcow2.has_value()) {
    ordered_json spec = ordered_json::object();
    spec["type"] = "qcow2";
    spec["data"] = Qcow2DataToJson(*info.qcow2);
    j["format-specific"] = std::move(spec);
  }
  if (has_backing && info.full_backing_filename.has_value()) {
    j["full-backing-filename"] = *info.full_backing_filename;
  }
  if (info.encrypted) j["encrypted"] = true;
  if (has_backing) j["backing-filename"] = *info.backing_filename;
  j["dirty-flag"] = info.dirty_flag;
  return j;
}

std::string FormatInfoJson(std::span<const qcow2::ImageInfo> infos, bool as_array) {
  if (!as_array)
    return infos.empty() ? Dump(ordered_json::object()) : Dump(ImageInfoToJson(infos[0]));
  ordered_json list = ordered_json::array();
  for (const qcow2::ImageInfo& info : infos) list.push_back(ImageInfoToJson(info));
  return Dump(list);
}

std::string SnapshotTableHeader() {
  return fmt::format("{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}", "ID", "TAG", "VM SIZE", "DATE",
                     "VM CLOCK", "ICOUNT");
}

std::string SnapshotTableRow(const qcow2::SnapshotInfo& s) {
  // qemu copies id and name into fixed buffers of 128 and 256 bytes.
  std::string id = s.id.substr(0, 127);
  std::string name = s.name.substr(0, 255);
  uint64_t secs = s.vm_clock_nsec / kNanosPerSecond;
  std::string clock = fmt::format("{:02}:{:02}:{:02}.{:03}", static_cast<int>(secs / 3600),
                                  static_cast<int>((secs / 60) % 60), static_cast<int>(secs % 60),
                                  static_cast<int>((s.vm_clock_nsec / 1'000'000) % 1000));
  std::string icount = s.icount == -1 ? "" : std::to_string(s.icount);
  return fmt::format("{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}", id, name, HumanSize(s.vm_state_size),
                     LocalDateTime(s.date_sec), clock, icount);
}

std::string FormatInfoHuman(const qcow2::ImageInfo& info) {
  std::string out;
  auto line = [&out](std::string_view text) {
    out += text;
    out += '\n';
  };
  line(fmt::format("image: {}", info.filename));
  line(fmt::format("file format: {}", info.format));
  line(fmt::format("virtual size: {} ({} bytes)", HumanSize(info.virtual_size), info.virtual_size));
  line(fmt::format("disk size: {}", HumanSize(info.actual_size)));
  if (info.encrypted) line("encrypted: yes");
  if (info.cluster_size.has_value()) line(fmt::format("cluster_size: {}", *info.cluster_size));
  if (info.dirty_flag) line("cleanly shut down: no");
  if (info.backing_filename.has_value()) {
    std::string backing = fmt::format("backing file: {}", *info.backing_filename);
    if (!info.full_backing_filename.has_value()) {
      backing += " (cannot determine actual path)";
    } else if (*info.full_backing_filename != *info.backing_filename) {
      backing += fmt::format(" (actual path: {})", *info.full_backing_filename);
    }
    line(backing);
    if (info.backing_format.has_value()) {
      line(fmt::format("backing file format: {}", *info.backing_format));
    }
  }
  if (!info.snapshots.empty()) {
    line("Snapshot list:");
    line(SnapshotTableHeader());
    for (const qcow2::SnapshotInfo& s : info.snapshots) line(SnapshotTableRow(s));
  }
  if (info.qcow2.has_value()) {
    line("Format specific information:");
    DumpHuman(Qcow2DataToJson(*info.qcow2), 1, out);
  }
  return out;
}

std::string FormatInfoHumanList(std::span<const qcow2::ImageInfo> infos) {
  std::string out;
  for (size_t i = 0; i < infos.size(); ++i) {
    if (i > 0) out += '\n';
    out += FormatInfoHuman(infos[i]);
  }
  return out;
}

}  // namespace uq::tools
