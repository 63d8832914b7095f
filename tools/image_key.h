// The passphrase of encrypted (LUKS) images on the command line, declared
// once for every verb that opens images.
//
// `--key-file FILE`: the passphrase is the file's whole content, byte for
// byte (no newline stripped), as QEMU's `--object secret,id=ID,file=FILE`
// reads it. main() declares the flag on each image verb (AddKeyFlags), reads
// the file once after parsing (LoadImageKey), and every place that builds
// qcow2::ImageOptions takes ImageKey(). The key lives in wiped memory
// (crypto::SecretBytes) and never enters a message: errors name the file.
//
// Thread model: set once on the main thread before any verb runs.
#ifndef UBLK_QCOW2_TOOLS_IMAGE_KEY_H_
#define UBLK_QCOW2_TOOLS_IMAGE_KEY_H_

#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "base/status.h"
#include "qcow2/crypto/secret.h"

namespace uq::tools {

// Declares --key-file on a verb's subcommand.
void AddKeyFlags(CLI::App& app);

// Reads the file --key-file named, if any. Errors: IoError naming the file
// ("cannot read key file"), InvalidArgument for an empty or oversized file.
Status LoadImageKey();

// The passphrase LoadImageKey read, or null.
std::shared_ptr<const qcow2::crypto::SecretBytes> ImageKey();

// The same passphrase, for `add` and `recover` to hand to their daemon,
// which wipes it (SecretBytes::Clear) once the image is open.
std::shared_ptr<qcow2::crypto::SecretBytes> ImageKeyToWipe();

// The key file's path ("" if none).
const std::string& ImageKeyFile();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_IMAGE_KEY_H_
