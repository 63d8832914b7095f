#include "tools/secret_object.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>

#include "qcow2/create/option_list.h"

namespace uq::tools {
namespace {

using qcow2::crypto::SecretBytes;

// A passphrase longer than this is no passphrase (QEMU's secret objects have
// no limit; we will not read a device file whole).
constexpr size_t kMaxSecretBytes = 1 << 20;

Result<SecretBytes> DecodeBase64(const SecretBytes& text) {
  std::string_view t(reinterpret_cast<const char*>(text.data()), text.size());
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r')) t.remove_suffix(1);
  if (t.size() % 4 != 0) {
    return Status::InvalidArgument("secret: data is not valid base64");
  }
  SecretBytes out(t.size() / 4 * 3);
  const int n = EVP_DecodeBlock(out.uchar(), reinterpret_cast<const unsigned char*>(t.data()),
                                static_cast<int>(t.size()));
  if (n < 0) return Status::InvalidArgument("secret: data is not valid base64");
  size_t len = static_cast<size_t>(n);
  // EVP_DecodeBlock counts the padding as decoded zero bytes.
  if (!t.empty() && t.back() == '=') len--;
  if (t.size() >= 2 && t[t.size() - 2] == '=') len--;
  return SecretBytes(out.span().first(len));
}

}  // namespace

Result<SecretBytes> ReadSecretFile(const std::string& path, std::string_view what) {
  const std::string context = path + ": cannot read " + std::string(what);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, context);
  SecretBytes buf(kMaxSecretBytes + 1);
  size_t got = 0;
  Status st;
  while (got < buf.size()) {
    const ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      st = Status::FromErrno(errno, context);
      break;
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  if (!st.ok()) return st;
  if (got == 0) return Status::InvalidArgument(path + ": " + std::string(what) + " is empty");
  if (got > kMaxSecretBytes) {
    return Status::InvalidArgument(path + ": " + std::string(what) + " is larger than 1 MiB");
  }
  return SecretBytes(buf.span().first(got));
}

Result<SecretObject> ParseSecretObject(std::string_view argument) {
  // QemuOpts syntax: the first item without '=' is the type (qom-type).
  // Its own message quotes the list, which may hold the secret (data=).
  Result<std::vector<qcow2::OptionItem>> split = qcow2::SplitOptionList(argument);
  if (!split.ok()) return Status::InvalidArgument("--object: invalid option list");
  std::vector<qcow2::OptionItem> items = std::move(split).value();
  std::optional<std::string> type, id, file, format;
  std::optional<SecretBytes> data;
  for (size_t i = 0; i < items.size(); i++) {
    qcow2::OptionItem& item = items[i];
    const bool bare =
        i == 0 && argument.substr(0, argument.find(',')).find('=') == std::string_view::npos;
    if (bare || item.key == "qom-type") {
      type = bare ? item.key : item.value;
    } else if (item.key == "id") {
      id = item.value;
    } else if (item.key == "data") {
      data = SecretBytes::FromString(item.value);
      // The copy in `items` is wiped below.
    } else if (item.key == "file") {
      file = item.value;
    } else if (item.key == "format") {
      format = item.value;
    } else if (item.key == "keyid" || item.key == "iv") {
      return Status::NotSupported("secret: encrypted secrets (keyid, iv) are not supported");
    } else {
      return Status::InvalidArgument("Parameter '" + item.key + "' is unexpected");
    }
  }
  for (qcow2::OptionItem& item : items) OPENSSL_cleanse(item.value.data(), item.value.size());
  if (!type) return Status::InvalidArgument("Parameter 'qom-type' is missing");
  if (*type != "secret") {
    return Status::InvalidArgument("Parameter 'qom-type' does not accept value '" + *type + "'");
  }
  if (!id) return Status::InvalidArgument("Parameter 'id' is missing");
  if (data && file) return Status::InvalidArgument("'file' and 'data' are mutually exclusive");
  if (!data && !file) return Status::InvalidArgument("Either 'file' or 'data' must be provided");
  if (format && *format != "raw" && *format != "base64") {
    return Status::InvalidArgument("Parameter 'format' does not accept value '" + *format + "'");
  }
  SecretObject out;
  out.id = *id;
  if (file) {
    ASSIGN_OR_RETURN(out.value, ReadSecretFile(*file, "secret file"));
  } else {
    out.value = std::move(*data);
  }
  if (format == "base64") {
    ASSIGN_OR_RETURN(out.value, DecodeBase64(out.value));
  }
  return out;
}

}  // namespace uq::tools
