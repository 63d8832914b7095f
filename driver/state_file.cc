#include "driver/state_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace uq::driver {

std::string StateDir() {
  const char* dir = std::getenv("UBLK_QCOW2_STATE_DIR");
  return dir != nullptr && dir[0] != '\0' ? dir : "/run/ublk-qcow2";
}

std::string RecordPath(int id) { return fmt::format("{}/{}.json", StateDir(), id); }
std::string LogPath(int id) { return fmt::format("{}/{}.log", StateDir(), id); }
std::string SocketPath(int id) { return fmt::format("{}/{}.sock", StateDir(), id); }

std::string RecordToJson(const DeviceRecord& r) {
  nlohmann::ordered_json j;
  j["id"] = r.id;
  j["image"] = r.image;
  j["pid"] = r.pid;
  j["queues"] = r.queues;
  j["depth"] = r.depth;
  j["size"] = r.size;
  j["read_only"] = r.read_only;
  j["working_dir"] = r.working_dir;
  j["direct"] = r.direct;
  j["cache_size"] = r.cache_size;
  j["preallocate"] = r.preallocate;
  j["max_io"] = r.max_io;
  j["poll_us"] = r.poll_us;
  j["recovery"] = r.recovery;
  j["encrypted"] = r.encrypted;
  return j.dump() + "\n";
}

Result<DeviceRecord> RecordFromJson(const std::string& text, const std::string& origin) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return Status::Corruption(fmt::format("{}: not a JSON object", origin));
  }
  DeviceRecord r;
  auto field = [&](const char* name, auto& out, bool optional = false) -> Status {
    auto it = j.find(name);
    if (it == j.end() && optional) return Status::Ok();  // keeps the default
    if (it == j.end()) return Status::Corruption(fmt::format("{}: no \"{}\"", origin, name));
    using T = std::decay_t<decltype(out)>;
    bool ok;
    if constexpr (std::is_same_v<T, bool>) {
      ok = it->is_boolean();
    } else if constexpr (std::is_same_v<T, std::string>) {
      ok = it->is_string();
    } else {
      ok = it->is_number_integer();
    }
    if (!ok) return Status::Corruption(fmt::format("{}: \"{}\" has the wrong type", origin, name));
    out = it->template get<T>();
    return Status::Ok();
  };
  RETURN_IF_ERROR(field("id", r.id));
  RETURN_IF_ERROR(field("image", r.image));
  RETURN_IF_ERROR(field("pid", r.pid));
  RETURN_IF_ERROR(field("queues", r.queues));
  RETURN_IF_ERROR(field("depth", r.depth));
  RETURN_IF_ERROR(field("size", r.size));
  RETURN_IF_ERROR(field("read_only", r.read_only));
  RETURN_IF_ERROR(field("working_dir", r.working_dir, true));
  RETURN_IF_ERROR(field("direct", r.direct, true));
  RETURN_IF_ERROR(field("cache_size", r.cache_size, true));
  RETURN_IF_ERROR(field("preallocate", r.preallocate, true));
  RETURN_IF_ERROR(field("max_io", r.max_io, true));
  RETURN_IF_ERROR(field("poll_us", r.poll_us, true));
  RETURN_IF_ERROR(field("recovery", r.recovery, true));
  RETURN_IF_ERROR(field("encrypted", r.encrypted, true));
  return r;
}

Status EnsureStateDir() {
  const std::string dir = StateDir();
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) return Status::FromErrno(errno, dir);
  return Status::Ok();
}

Status WriteRecord(const DeviceRecord& record) {
  RETURN_IF_ERROR(EnsureStateDir());
  const std::string path = RecordPath(record.id);
  const std::string tmp = path + ".tmp";
  const std::string text = RecordToJson(record);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, tmp);
  ssize_t n = ::write(fd, text.data(), text.size());
  int err = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(text.size())) {
    ::unlink(tmp.c_str());
    return Status::FromErrno(n < 0 ? err : EIO, tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    err = errno;
    ::unlink(tmp.c_str());
    return Status::FromErrno(err, path);
  }
  return Status::Ok();
}

Result<std::optional<DeviceRecord>> ReadRecord(int id) {
  const std::string path = RecordPath(id);
  std::ifstream in(path);
  if (!in) {
    if (errno == ENOENT) return std::optional<DeviceRecord>();
    return Status::FromErrno(errno, path);
  }
  std::stringstream text;
  text << in.rdbuf();
  ASSIGN_OR_RETURN(DeviceRecord record, RecordFromJson(text.str(), path));
  return std::optional<DeviceRecord>(std::move(record));
}

Status RemoveRecord(int id) {
  // A daemon that was killed left its socket too: nobody listens there.
  ::unlink(SocketPath(id).c_str());
  const std::string path = RecordPath(id);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Status::FromErrno(errno, path);
  return Status::Ok();
}

std::vector<int> RecordIds() {
  std::vector<int> ids;
  DIR* dir = ::opendir(StateDir().c_str());
  if (dir == nullptr) return ids;
  while (dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name.size() < 6 || name.substr(name.size() - 5) != ".json") continue;
    std::string stem = name.substr(0, name.size() - 5);
    if (stem.empty() || !std::all_of(stem.begin(), stem.end(), ::isdigit) || stem.size() > 9)
      continue;
    ids.push_back(std::stoi(stem));
  }
  ::closedir(dir);
  std::sort(ids.begin(), ids.end());
  return ids;
}

}  // namespace uq::driver
