#include "tools/size_format.h"

#include <cmath>
#include <cstdio>

namespace uq::tools {

std::string HumanSize(uint64_t bytes) {
  static constexpr const char* kSuffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  // frexp() yields e with 2^(e-1) <= x < 2^e. Scaling by 1024/1000 first makes
  // the unit switch as soon as the integer part would reach 1000, so "1000
  // KiB" prints as "0.977 MiB" (qemu's rule, kept for identical output).
  int exponent = 0;
  std::frexp(static_cast<double>(bytes) / (1000.0 / 1024.0), &exponent);
  int unit = (exponent - 1) / 10;  // truncates toward zero: 0 bytes -> unit 0
  if (unit < 0) unit = 0;
  if (unit > 6) unit = 6;
  double value = static_cast<double>(bytes) / static_cast<double>(uint64_t{1} << (unit * 10));
  // printf's %g, not fmt's: the same rounding and exponent form ("1e+03 KiB")
  // as qemu-img, which also goes through the C library.
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%0.3g %sB", value, kSuffixes[unit]);
  return buf;
}

}  // namespace uq::tools
