// What `amend` may change in a qcow2 image (qemu-img amend's -o keys that
// the engine acts on), already parsed; every field left unset stays as it is.
// The command line (tools/amend_command.cc) parses and checks the syntax;
// Qcow2Image::Amend judges the values against the image, with QEMU's rules.
#ifndef UBLK_QCOW2_QCOW2_AMEND_OPTIONS_H_
#define UBLK_QCOW2_QCOW2_AMEND_OPTIONS_H_

#include <cstdint>
#include <optional>
#include <string>

namespace uq::qcow2 {

struct AmendOptions {
  std::optional<uint32_t> version;  // compat: 2 (0.10, v2) or 3 (1.1, v3)
  std::optional<bool> lazy_refcounts;
  std::optional<bool> data_file_raw;
  // REQUIRES: a power of two in [1, 64] (the parser's check, with QEMU's message).
  std::optional<uint32_t> refcount_bits;
  // The external data file's name ("" drops the name: QEMU's data_file=).
  std::optional<std::string> data_file;
  // A new virtual size; 0 is none, as QEMU reads size=0.
  uint64_t size = 0;
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_AMEND_OPTIONS_H_
