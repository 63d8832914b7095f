// qemu-img's `-o key=value,...` lists, read as QEMU's option parser reads
// them (QemuOpts), before any driver judges the values.
//
// Shared by `create` (ParseCreateOptions) and `measure`, which take the same
// keys but judge them differently: create refuses what it cannot make, while
// qemu-img measure only looks at a few keys and lets the others be (e.g.
// compat=0.10 with lazy_refcounts=on, or compression_type=bad, measure fine).
#ifndef UBLK_QCOW2_QCOW2_CREATE_OPTION_LIST_H_
#define UBLK_QCOW2_QCOW2_CREATE_OPTION_LIST_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace uq::qcow2 {

struct OptionItem {
  std::string key;
  std::string value;
};

// Splits "a=b,c=d" (",," is a literal comma inside a value) into items, in
// order. A boolean key alone means on ("lazy_refcounts"), with a "no" prefix
// off ("nolazy_refcounts"); any other key without '=' gets an empty value.
// Errors: "Invalid option list: <list>" for an empty item (",", "a=b,,,").
Result<std::vector<OptionItem>> SplitOptionList(std::string_view list);

// Whether `key` is one of qcow2's boolean create options (extended_l2,
// lazy_refcounts, data_file_raw, encryption, nocow).
bool IsBoolOption(std::string_view key);

// qemu_strtosz(): a decimal number with an optional fraction (leading blanks
// and a plus sign allowed), or a 0x hex integer, then an optional suffix
// b/k/M/G/T/P/E (binary multiples, any case). kRange: the value does not fit
// in 64 bits; kSyntax: anything else wrong. Sets *value on kOk only.
enum class SizeParse { kOk, kSyntax, kRange };
SizeParse ParseQemuSize(std::string_view text, uint64_t* value);

// ParseQemuSize for an option's value, with QEMU's messages naming `key`:
// "Parameter '<key>' expects a non-negative number below 2^64 (optional
// suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and
// exabytes)", or "Value '<value>' is out of range for parameter '<key>'".
Result<uint64_t> ParseOptionSize(std::string_view key, std::string_view value);

// qemu_strtou64(..., base 0): decimal, 0x hex or 0 octal, after optional
// blanks and a sign (a minus wraps around, as strtoull's). Errors:
// "Parameter '<key>' expects a number", "Value '<value>' is too large for
// parameter '<key>'".
Result<uint64_t> ParseOptionNumber(std::string_view key, std::string_view value);

// on/off (also yes/no, true/false, y/n). Errors: "Parameter '<key>' expects
// 'on' or 'off'".
Result<bool> ParseOptionBool(std::string_view key, std::string_view value);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_CREATE_OPTION_LIST_H_
