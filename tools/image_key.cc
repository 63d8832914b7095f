#include "tools/image_key.h"

#include <fmt/format.h>
#include <openssl/crypto.h>

#include <map>
#include <vector>

#include "tools/secret_object.h"

namespace uq::tools {
namespace {

using qcow2::crypto::SecretBytes;

struct Flags {
  std::string key_file;
  std::string key_secret;
  std::vector<std::string> objects;
};

Flags& TheFlags() {
  static Flags flags;
  return flags;
}

// Not const: `add` and `recover` hand the passphrase to their daemon, which
// wipes it once the image is open (ImageKeyToWipe).
std::shared_ptr<SecretBytes>& Key() {
  static std::shared_ptr<SecretBytes> key;
  return key;
}

std::shared_ptr<SecretBytes>& FileKey() {
  static std::shared_ptr<SecretBytes> key;
  return key;
}

std::map<std::string, std::shared_ptr<SecretBytes>>& Secrets() {
  static std::map<std::string, std::shared_ptr<SecretBytes>> secrets;
  return secrets;
}

Status NoSecret(const std::string& id) {
  return Status::InvalidArgument("No secret with id '" + id + "'");
}

}  // namespace

void AddKeyFlags(CLI::App& app) {
  Flags& f = TheFlags();
  app.add_option("--key-file", f.key_file,
                 "Passphrase of encrypted (LUKS) images: the file's whole content");
  app.add_option("--object", f.objects,
                 "qemu-img's secret,id=ID,file=FILE or secret,id=ID,data=STRING "
                 "(see -o encrypt.key-secret=ID)")
      ->allow_extra_args(false);
  app.add_option("--key-secret", f.key_secret,
                 "The --object secret that opens encrypted images (default: the only one)");
}

Status LoadImageKey() {
  Flags& f = TheFlags();
  for (std::string& argument : f.objects) {
    Result<SecretObject> object = ParseSecretObject(argument);
    // The argument may hold the secret (data=): wipe it either way.
    OPENSSL_cleanse(argument.data(), argument.size());
    if (!object.ok()) return object.status();
    if (Secrets().contains(object->id)) {
      return Status::InvalidArgument("attempt to add duplicate property '" + object->id +
                                     "' to object (type 'container')");
    }
    Secrets()[object->id] = std::make_shared<SecretBytes>(std::move(object->value));
  }
  if (!f.key_file.empty()) {
    if (!f.key_secret.empty()) {
      return Status::InvalidArgument("--key-file and --key-secret name two keys: give one");
    }
    ASSIGN_OR_RETURN(SecretBytes key, ReadSecretFile(f.key_file, "key file"));
    FileKey() = std::make_shared<SecretBytes>(std::move(key));
    Key() = FileKey();
  } else if (!f.key_secret.empty()) {
    auto it = Secrets().find(f.key_secret);
    if (it == Secrets().end()) return NoSecret(f.key_secret);
    Key() = it->second;
  } else if (Secrets().size() == 1) {
    Key() = Secrets().begin()->second;
  }
  return Status::Ok();
}

std::shared_ptr<const SecretBytes> ImageKey() { return Key(); }

std::shared_ptr<SecretBytes> ImageKeyToWipe() { return Key(); }

Result<std::shared_ptr<const SecretBytes>> SecretById(const std::string& id) {
  auto it = Secrets().find(id);
  if (it == Secrets().end()) return NoSecret(id);
  return std::shared_ptr<const SecretBytes>(it->second);
}

Result<std::shared_ptr<const SecretBytes>> NewImageKey(const std::string& key_secret) {
  if (!key_secret.empty()) return SecretById(key_secret);
  return std::shared_ptr<const SecretBytes>(FileKey());
}

void UseImageKey(qcow2::ImageOptions& options) {
  options.key = ImageKey();
  options.key_hint = kKeyFlagsHint;
}

Status NeedKeyForDevice(int id, const std::string& image, bool encrypted, const char* verb) {
  if (!encrypted || ImageKey()) return Status::Ok();
  return Status::InvalidArgument(
      fmt::format("ublk device {}: {} is encrypted: {} needs its passphrase: {}", id, image, verb,
                  kKeyFlagsHint));
}

}  // namespace uq::tools
