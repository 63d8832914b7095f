#include "qcow2/create/parse_size.h"

#include <fmt/format.h>

#include <cctype>

namespace uq::qcow2 {

namespace {

Status SizeError(std::string_view key) {
  return Status::InvalidArgument(
      fmt::format("Parameter '{}' expects a non-negative number below 2^64 (optional "
                  "suffix k, "
                  "M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes)",
                  key));
}

}  // namespace

// qemu_strtosz(): a decimal number with an optional fraction, or a hex
// integer, then an optional suffix b/k/M/G/T/P/E (binary multiples, any case).
Result<uint64_t> ParseSize(std::string_view key, std::string_view s) {
  size_t i = 0;
  unsigned __int128 whole = 0;
  uint64_t frac_num = 0, frac_den = 1;
  bool digits = false;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    i = 2;
    while (i < s.size() && std::isxdigit(static_cast<unsigned char>(s[i]))) {
      char c = static_cast<char>(std::tolower(static_cast<unsigned char>(s[i])));
      whole = whole * 16 + static_cast<unsigned>(c <= '9' ? c - '0' : c - 'a' + 10);
      if (whole >> 64) return SizeError(key);
      digits = true;
      i++;
    }
  } else {
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) {
      whole = whole * 10 + static_cast<unsigned>(s[i] - '0');
      if (whole >> 64) return SizeError(key);
      digits = true;
      i++;
    }
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
  if (!digits) return SizeError(key);
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
        return SizeError(key);
    }
    i++;
  }
  if (i != s.size()) return SizeError(key);
  // "1.5" or "1.5b": not whole bytes.
  if (frac_num != 0 && mult == 1) return SizeError(key);
  unsigned __int128 total = whole * mult + (unsigned __int128)frac_num * mult / frac_den;
  if (total >> 64) return SizeError(key);
  return static_cast<uint64_t>(total);
}

}  // namespace uq::qcow2
