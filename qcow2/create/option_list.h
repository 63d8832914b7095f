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

// qemu_strtosz(): a decimal number with an optional fraction, or a hex
// integer, then an optional suffix b/k/M/G/T/P/E (binary multiples, any
// case). Errors name `key` as QEMU does: "Parameter '<key>' expects a
// non-negative number below 2^64 (optional suffix k, M, G, T, P or E means
// kilo-, mega-, giga-, tera-, peta- and exabytes)".
Result<uint64_t> ParseOptionSize(std::string_view key, std::string_view value);

// qemu_strtou64(..., base 0): decimal, 0x hex or 0 octal. Errors:
// "Parameter '<key>' expects a number".
Result<uint64_t> ParseOptionNumber(std::string_view key, std::string_view value);

// on/off (also yes/no, true/false, y/n). Errors: "Parameter '<key>' expects
// 'on' or 'off'".
Result<bool> ParseOptionBool(std::string_view key, std::string_view value);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_CREATE_OPTION_LIST_H_
