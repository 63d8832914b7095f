#include "tools/amend_command.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "qcow2/create/option_list.h"
#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/sync_env.h"
#include "tools/image_key.h"

namespace uq::tools {

const char kAmendHelp[] =
    "Amend options for 'qcow2':\n"
    "  backing_file=<str>     - File name of a base image\n"
    "  backing_fmt=<str>      - Image format of the base image\n"
    "  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n"
    "  data_file=<str>        - File name of an external data file\n"
    "  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image\n"
    "  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds\n"
    "  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly\n"
    "  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to "
    "erase\n"
    "  encrypt.old-secret=<str> - Select all keyslots that match this password\n"
    "  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)\n"
    "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"
    "  refcount_bits=<num>    - Width of a reference count entry in bits\n"
    "  size=<size>            - Virtual disk size\n";

namespace {

enum class Type { kString, kBool, kNumber, kSize };
struct Key {
  std::string_view name;
  Type type;
};

// qcow2's amend options (QEMU 7.2), in the order qcow2_amend_options judges them.
constexpr Key kAmendKeys[] = {
    {"encrypt.state", Type::kString},
    {"encrypt.keyslot", Type::kNumber},
    {"encrypt.old-secret", Type::kString},
    {"encrypt.new-secret", Type::kString},
    {"encrypt.iter-time", Type::kNumber},
    {"size", Type::kSize},
    {"compat", Type::kString},
    {"backing_file", Type::kString},
    {"backing_fmt", Type::kString},
    {"data_file", Type::kString},
    {"data_file_raw", Type::kBool},
    {"lazy_refcounts", Type::kBool},
    {"refcount_bits", Type::kNumber},
};
// Those only create takes: qemu-img amend names them as such.
constexpr Key kCreateOnlyKeys[] = {
    {"encryption", Type::kBool},
    {"encrypt.format", Type::kString},
    {"encrypt.key-secret", Type::kString},
    {"encrypt.cipher-alg", Type::kString},
    {"encrypt.cipher-mode", Type::kString},
    {"encrypt.ivgen-alg", Type::kString},
    {"encrypt.ivgen-hash-alg", Type::kString},
    {"encrypt.hash-alg", Type::kString},
    {"cluster_size", Type::kSize},
    {"extended_l2", Type::kBool},
    {"preallocation", Type::kString},
    {"compression_type", Type::kString},
};

template <size_t N>
const Key* Find(const Key (&keys)[N], std::string_view name) {
  for (const Key& k : keys) {
    if (k.name == name) return &k;
  }
  return nullptr;
}

// QemuOpts' check of one value of its type.
Status CheckValue(const Key& key, const std::string& value) {
  switch (key.type) {
    case Type::kBool:
      return qcow2::ParseOptionBool(key.name, value).status();
    case Type::kNumber:
      return qcow2::ParseOptionNumber(key.name, value).status();
    case Type::kSize:
      return qcow2::ParseOptionSize(key.name, value).status();
    case Type::kString:
      break;
  }
  return Status::Ok();
}

// The value given last for `name`, as qemu_opt_get finds it.
const std::string* Last(const std::vector<qcow2::OptionItem>& items, std::string_view name) {
  for (auto it = items.rbegin(); it != items.rend(); ++it) {
    if (it->key == name) return &it->value;
  }
  return nullptr;
}

}  // namespace

Result<qcow2::AmendOptions> ParseAmendOptions(std::string_view list, const qcow2::Header& header,
                                              const std::string& image) {
  auto fail = [&image](std::string_view why) {
    return Status::InvalidArgument(fmt::format("{}: {}", image, why));
  };
  Result<std::vector<qcow2::OptionItem>> split = qcow2::SplitOptionList(list);
  if (!split.ok()) return split.status();
  const std::vector<qcow2::OptionItem>& items = *split;

  // QemuOpts reads the list item by item: an unknown key or a bad value ends it.
  for (const qcow2::OptionItem& item : items) {
    const Key* key = Find(kAmendKeys, item.key);
    if (key == nullptr) {
      // qemu-img retries with the create options; if the whole list passes
      // then, it says so.
      bool create_ok = true;
      for (const qcow2::OptionItem& i : items) {
        const Key* k = Find(kAmendKeys, i.key);
        if (k == nullptr) k = Find(kCreateOnlyKeys, i.key);
        if (k == nullptr || !CheckValue(*k, i.value).ok()) create_ok = false;
      }
      return fail(
          fmt::format("Invalid parameter '{}'{}", item.key,
                      create_ok ? " (this option is only supported for image creation)" : ""));
    }
    Status st = CheckValue(*key, item.value);
    if (!st.ok()) return fail(st.message());
  }

  qcow2::AmendOptions o;
  // The keys set, in qcow2_amend_options' order.
  for (const Key& key : kAmendKeys) {
    const std::string* v = Last(items, key.name);
    if (v == nullptr) continue;
    if (key.name.starts_with("encrypt.")) {
      // Encrypted images do not open here, so there is never encryption.
      return fail("Can't amend encryption options - encryption not present");
    } else if (key.name == "size") {
      o.size = *qcow2::ParseOptionSize(key.name, *v);
    } else if (key.name == "compat") {
      if (*v == "0.10" || *v == "v2") {
        o.version = 2;
      } else if (*v == "1.1" || *v == "v3") {
        o.version = 3;
      } else {
        return fail(fmt::format("Unknown compatibility level {}", *v));
      }
    } else if (key.name == "data_file") {
      if (!header.has_data_file()) {
        return fail("data-file can only be set for images that use an external data file");
      }
      o.data_file = *v;
    } else if (key.name == "data_file_raw") {
      o.data_file_raw = *qcow2::ParseOptionBool(key.name, *v);
      if (*o.data_file_raw && !header.data_file_raw()) {
        return fail("data-file-raw cannot be set on existing images");
      }
    } else if (key.name == "lazy_refcounts") {
      o.lazy_refcounts = *qcow2::ParseOptionBool(key.name, *v);
    } else if (key.name == "refcount_bits") {
      // QEMU keeps the number in an int.
      const int bits = static_cast<int>(*qcow2::ParseOptionNumber(key.name, *v));
      if (bits <= 0 || bits > 64 || (bits & (bits - 1)) != 0) {
        return fail("Refcount width must be a power of two and may not exceed 64 bits");
      }
      o.refcount_bits = static_cast<uint32_t>(bits);
    }
  }
  const uint32_t version = o.version.value_or(header.version);
  if (o.refcount_bits && *o.refcount_bits != header.refcount_bits() && version < 3 &&
      *o.refcount_bits != 16) {
    return fail(
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use "
        "compat=1.1 or greater)");
  }
  // The backing link stays as it is: backing_file and backing_fmt may only
  // repeat it (QEMU compares both, an absent one with none).
  const std::string* backing_file = Last(items, "backing_file");
  const std::string* backing_fmt = Last(items, "backing_fmt");
  if (backing_file != nullptr || backing_fmt != nullptr) {
    const bool file_same = backing_file == nullptr ? header.backing_file.empty()
                                                   : !header.backing_file.empty() &&
                                                         *backing_file == header.backing_file;
    const bool fmt_same = backing_fmt == nullptr
                              ? !header.backing_format.has_value()
                              : header.backing_format && *backing_fmt == *header.backing_format;
    if (!file_same || !fmt_same) {
      return fail("Cannot amend the backing file (you can use 'ublk-qcow2 rebase' instead)");
    }
  }
  return o;
}

namespace {

class AmendCommand final : public Command {
 public:
  void AddFlags(CLI::App& app) override {
    app.add_option("IMAGE", images_, "The image to amend");
    app.add_option("-o,--options", options_,
                   "compat, lazy_refcounts, data_file_raw, data_file, size, refcount_bits "
                   "(-o help lists them)")
        ->allow_extra_args(false);
    app.add_option("-f,--format", format_, "IMAGE's format (default: probe)");
    app.add_option("-t,--cache", cache_, "Cache mode (accepted, as qemu-img's; ignored)");
    app.add_flag("-p,--progress", progress_, "Show progress");
    app.add_flag("-q,--quiet", quiet_, "Print nothing");
    app.add_flag("--force", force_, "Accepted for qemu-img's command line (no effect)");
  }

  // qemu-img amend's option parser exits 1 on a bad command line.
  int usage_exit_code() const override { return kExitError; }

  Status Run() override {
    if (options_.empty()) return Status::InvalidArgument("Must specify options (-o)");
    std::string list;
    for (const std::string& o : options_) list += (list.empty() ? "" : ",") + o;
    if (images_.size() != 1) return Status::InvalidArgument("Expecting one image file name");
    const std::string& image = images_[0];
    if (list.empty() || !qcow2::SplitOptionList(list).ok()) {
      return Status::InvalidArgument(fmt::format("Invalid option list: {}", list));
    }

    qcow2::ImageOptions options;

    UseImageKey(options);
    options.env = qcow2::SyncEnv();
    options.format = format_;
    options.no_backing = true;  // only the header is looked at first
    qcow2::Header header;
    {
      ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                       BlockOn(qcow2::OpenImage(image, options)));
      auto* qcow2 = dynamic_cast<qcow2::Qcow2Image*>(device.get());
      if (qcow2 == nullptr) {
        return Status::NotSupported(
            fmt::format("{}: Format driver 'raw' does not support option amendment", image));
      }
      header = qcow2->header();
    }
    if (HasHelp(list)) {
      std::fputs(kAmendHelp, stdout);
      return Status::Ok();
    }
    ASSIGN_OR_RETURN(qcow2::AmendOptions amend, ParseAmendOptions(list, header, image));

    // qemu-img amend -p draws its line at 0% and at 100% (then "\r\n"); the
    // steps between depend on QEMU's operations and are left out.
    const bool progress = progress_ && !quiet_;
    if (progress) {
      std::fputs("    (0.00/100%)\r", stdout);
      std::fflush(stdout);
    }
    options.no_backing = false;
    options.writable = true;
    ASSIGN_OR_RETURN(std::unique_ptr<qcow2::BlockDevice> device,
                     BlockOn(qcow2::OpenImage(image, options)));
    auto* qcow2 = dynamic_cast<qcow2::Qcow2Image*>(device.get());
    Status st = BlockOn(qcow2->Amend(amend));
    Status closed = BlockOn(device->Close());
    if (st.ok()) st = closed;
    if (!st.ok()) return st;
    if (progress) std::fputs("    (100.00/100%)\r\n", stdout);
    return Status::Ok();
  }

 private:
  // qemu-img's has_help_option: an item "help" or "?".
  static bool HasHelp(const std::string& list) {
    Result<std::vector<qcow2::OptionItem>> items = qcow2::SplitOptionList(list);
    if (!items.ok()) return false;
    return std::any_of(items->begin(), items->end(),
                       [](const qcow2::OptionItem& i) { return i.key == "help" || i.key == "?"; });
  }

  std::vector<std::string> images_, options_;
  std::string format_, cache_;
  bool progress_ = false, quiet_ = false, force_ = false;
};

}  // namespace

std::unique_ptr<Command> MakeAmendCommand() { return std::make_unique<AmendCommand>(); }

}  // namespace uq::tools
