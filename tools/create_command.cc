#include "tools/create_command.h"

#include <fmt/format.h>

#include <cstdio>
#include <string>
#include <vector>

#include "qcow2/create/create.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"

namespace uq::tools {
namespace {

// The encrypt options given, in the order qemu-img's "Formatting" line
// lists them (its option table's order), the secret's id but never a key.
std::string EncryptWords(const qcow2::CreateOptions& options) {
  if (!options.encrypt) return "";
  static constexpr const char* kOrder[] = {
      "encryption",          "encrypt.format",    "encrypt.key-secret",     "encrypt.cipher-alg",
      "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
      "encrypt.iter-time"};
  std::string out;
  for (const char* key : kOrder) {
    auto it = options.encrypt->given.find(key);
    if (it != options.encrypt->given.end()) out += fmt::format(" {}={}", key, it->second);
  }
  return out;
}

class CreateCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", image_, "The image to create")->required();
    app.add_option("SIZE", size_, "Virtual size (512, 64k, 20G, ...); default: the backing file's");
    app.add_option("-f,--format", format_, "Image format")->check(CLI::IsMember({"qcow2"}));
    app.add_option("-o,--options", options_,
                   "cluster_size, compat, refcount_bits, extended_l2, compression_type, "
                   "lazy_refcounts, data_file, data_file_raw, preallocation (off|metadata), "
                   "encrypt.format=luks, encrypt.key-secret, encrypt.cipher-alg, "
                   "encrypt.cipher-mode, encrypt.ivgen-alg, encrypt.ivgen-hash-alg, "
                   "encrypt.hash-alg, encrypt.iter-time")
        ->allow_extra_args(false);
    app.add_option("-b,--backing", backing_, "Backing file");
    app.add_option("-F,--backing-format", backing_format_, "Backing file format (qcow2 or raw)");
    app.add_flag("-q,--quiet", quiet_, "Print nothing on success");
  }

  Status Run() override {
    qcow2::CreateOptions base;
    base.path = image_;
    if (!backing_.empty()) base.backing_file = backing_;
    if (!backing_format_.empty()) base.backing_format = backing_format_;
    std::string list;
    for (const std::string& o : options_) list += (list.empty() ? "" : ",") + o;
    if (!size_.empty()) list += (list.empty() ? "" : ",") + std::string("size=") + size_;
    Result<qcow2::CreateOptions> parsed = qcow2::ParseCreateOptions(list, base);
    if (!parsed.ok()) return parsed.status().WithContext(image_);
    qcow2::CreateOptions options = std::move(parsed).value();
    if (options.encrypt) {
      Result<std::shared_ptr<const qcow2::crypto::SecretBytes>> key =
          NewImageKey(options.encrypt->key_secret);
      if (!key.ok()) return key.status().WithContext(image_);
      options.passphrase = *key;
    }
    if (!options.size && !options.backing_file) {
      return Status::InvalidArgument(
          fmt::format("{}: no size given (and no backing file to take it from)", image_));
    }
    Status st = BlockOn(qcow2::CreateImage(qcow2::SyncEnv(), options));
    if (!st.ok()) return st.WithContext(image_);
    if (!quiet_) {
      std::printf(
          "Formatting '%s', fmt=qcow2%s cluster_size=%u extended_l2=%s compression_type=%s%s "
          "size=%s "
          "lazy_refcounts=%s refcount_bits=%u\n",
          image_.c_str(), EncryptWords(options).c_str(), options.cluster_size,
          options.extended_l2 ? "on" : "off", options.compression_type.c_str(),
          options.backing_file ? fmt::format(" backing_file={}", *options.backing_file).c_str()
                               : "",
          options.size ? std::to_string(*options.size).c_str() : "(backing)",
          options.lazy_refcounts ? "on" : "off", options.refcount_bits);
    }
    return Status::Ok();
  }

 private:
  std::string image_, size_, format_ = "qcow2", backing_, backing_format_;
  std::vector<std::string> options_;
  bool quiet_ = false;
};

}  // namespace

std::unique_ptr<Command> MakeCreateCommand() { return std::make_unique<CreateCommand>(); }

}  // namespace uq::tools
