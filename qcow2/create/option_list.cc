#include "qcow2/create/option_list.h"

#include <fmt/format.h>

#include <cctype>
#include <utility>

namespace uq::qcow2 {
namespace {

// Splits at single commas; ",," is an escaped comma. Empty items are errors,
// as in QEMU's option parser.
Result<std::vector<std::string>> SplitItems(std::string_view list) {
  std::vector<std::string> items;
  std::string cur;
  for (size_t i = 0; i < list.size(); i++) {
    if (list[i] != ',') {
      cur += list[i];
    } else if (i + 1 < list.size() && list[i + 1] == ',') {
      cur += ',';
      i++;
    } else {
      if (cur.empty()) {
        return Status::InvalidArgument(fmt::format("Invalid option list: {}", list));
      }
      items.push_back(std::move(cur));
      cur.clear();
    }
  }
  if (cur.empty()) {
    return Status::InvalidArgument(fmt::format("Invalid option list: {}", list));
  }
  items.push_back(std::move(cur));
  return items;
}

Status SizeError(std::string_view key) {
  return Status::InvalidArgument(
      fmt::format("Parameter '{}' expects a non-negative number below 2^64 (optional "
                  "suffix k, "
                  "M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes)",
                  key));
}

}  // namespace

SizeParse ParseQemuSize(std::string_view s, uint64_t* value) {
  size_t i = 0;
  unsigned __int128 whole = 0;
  uint64_t frac_num = 0, frac_den = 1;
  bool digits = false;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {  // as QEMU: no blank or sign
    i = 2;
    while (i < s.size() && std::isxdigit(static_cast<unsigned char>(s[i]))) {
      char c = static_cast<char>(std::tolower(static_cast<unsigned char>(s[i])));
      whole = whole * 16 + static_cast<unsigned>(c <= '9' ? c - '0' : c - 'a' + 10);
      if (whole >> 64) return SizeParse::kRange;
      digits = true;
      i++;
    }
  } else {
    // strtoull's leading blanks and plus sign.
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) i++;
    if (i < s.size() && s[i] == '+') i++;
    bool overflow = false;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) {
      whole = whole * 10 + static_cast<unsigned>(s[i] - '0');
      if (whole >> 64) {
        overflow = true;
        whole = 0;
      }
      digits = true;
      i++;
    }
    // qemu-img calls a number too long for 64 bits out of range only when
    // nothing follows it ("99999999999999999999k" is a syntax error there).
    if (overflow) return i == s.size() ? SizeParse::kRange : SizeParse::kSyntax;
    if (i < s.size() && s[i] == '.') {
      i++;
      while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) {
        if (frac_den < 1000000000000000000ull) {
          frac_num = frac_num * 10 + static_cast<unsigned>(s[i] - '0');
          frac_den *= 10;
        }
        digits = true;
        i++;
      }
    }
  }
  if (!digits) return SizeParse::kSyntax;
  uint64_t mult = 1;
  if (i < s.size()) {
    switch (std::tolower(static_cast<unsigned char>(s[i]))) {
      case 'b':
        mult = 1;
        break;
      case 'k':
        mult = 1ull << 10;
        break;
      case 'm':
        mult = 1ull << 20;
        break;
      case 'g':
        mult = 1ull << 30;
        break;
      case 't':
        mult = 1ull << 40;
        break;
      case 'p':
        mult = 1ull << 50;
        break;
      case 'e':
        mult = 1ull << 60;
        break;
      default:
        return SizeParse::kSyntax;
    }
    i++;
  }
  if (i != s.size()) return SizeParse::kSyntax;
  // "1.5" or "1.5b": not whole bytes.
  if (frac_num != 0 && mult == 1) return SizeParse::kSyntax;
  unsigned __int128 total = whole * mult + (unsigned __int128)frac_num * mult / frac_den;
  if (total >> 64) return SizeParse::kRange;
  *value = static_cast<uint64_t>(total);
  return SizeParse::kOk;
}

Result<uint64_t> ParseOptionSize(std::string_view key, std::string_view s) {
  uint64_t value = 0;
  switch (ParseQemuSize(s, &value)) {
    case SizeParse::kOk:
      return value;
    case SizeParse::kRange:
      return Status::InvalidArgument(
          fmt::format("Value '{}' is out of range for parameter '{}'", s, key));
    case SizeParse::kSyntax:
      break;
  }
  return SizeError(key);
}

Result<std::vector<OptionItem>> SplitOptionList(std::string_view list) {
  std::vector<OptionItem> out;
  if (list.empty()) return out;
  ASSIGN_OR_RETURN(std::vector<std::string> items, SplitItems(list));
  for (const std::string& item : items) {
    size_t eq = item.find('=');
    if (eq != std::string::npos) {
      out.push_back({item.substr(0, eq), item.substr(eq + 1)});
    } else if (IsBoolOption(item)) {
      out.push_back({item, "on"});  // "lazy_refcounts" alone means on
    } else if (item.starts_with("no") && IsBoolOption(item.substr(2))) {
      out.push_back({item.substr(2), "off"});  // "nolazy_refcounts" means off
    } else {
      out.push_back({item, ""});
    }
  }
  return out;
}

bool IsBoolOption(std::string_view key) {
  return key == "extended_l2" || key == "lazy_refcounts" || key == "data_file_raw" ||
         key == "encryption" || key == "nocow";
}

Result<uint64_t> ParseOptionNumber(std::string_view key, std::string_view text) {
  std::string_view s = text;
  auto err = [&] {
    return Status::InvalidArgument(fmt::format("Parameter '{}' expects a number", key));
  };
  // strtoull's leading blanks and sign; a minus wraps, as there.
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  const bool negative = !s.empty() && s.front() == '-';
  if (!s.empty() && (s.front() == '-' || s.front() == '+')) s.remove_prefix(1);
  if (s.empty()) return err();
  unsigned base = 10;
  size_t i = 0;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    base = 16;
    i = 2;
  } else if (s.size() > 1 && s[0] == '0') {
    base = 8;
    i = 1;
  }
  unsigned __int128 v = 0;
  for (; i < s.size(); i++) {
    int c = std::tolower(static_cast<unsigned char>(s[i]));
    unsigned d;
    if (c >= '0' && c <= '9') {
      d = static_cast<unsigned>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      d = static_cast<unsigned>(c - 'a' + 10);
    } else {
      return err();
    }
    if (d >= base) return err();
    v = v * base + d;
    if (v >> 64) {
      return Status::InvalidArgument(
          fmt::format("Value '{}' is too large for parameter '{}'", text, key));
    }
  }
  const uint64_t value = static_cast<uint64_t>(v);
  return negative ? uint64_t{0} - value : value;
}

Result<bool> ParseOptionBool(std::string_view key, std::string_view s) {
  if (s == "on" || s == "yes" || s == "true" || s == "y") return true;
  if (s == "off" || s == "no" || s == "false" || s == "n") return false;
  return Status::InvalidArgument(fmt::format("Parameter '{}' expects 'on' or 'off'", key));
}

}  // namespace uq::qcow2
