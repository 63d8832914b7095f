// The passphrase of encrypted (LUKS) images on the command line, declared
// once for every verb that opens or creates images.
//
// Two sources, as ublk-qcow2 and qemu-img spell them:
//   --key-file FILE   the passphrase is the file's whole content, byte for
//                     byte (no newline stripped).
//   --object secret,id=ID,file=FILE | data=STRING [,format=raw|base64]
//                     qemu-img's secret objects (tools/secret_object.h),
//                     repeatable; `-o encrypt.key-secret=ID` (create,
//                     convert -O qcow2) names the one a new encrypted image
//                     gets.
// The key that opens existing encrypted images (ImageKey()): --key-file;
// else the secret --key-secret ID names; else the only --object secret given
// (with several, --key-secret must pick one). qemu-img would name it with
// --image-opts ...,encrypt.key-secret=ID, which we do not parse.
//
// main() declares the flags on each image verb (AddKeyFlags), reads files
// and objects once after parsing (LoadImageKey). Keys live in wiped memory
// (crypto::SecretBytes) and never enter a message: errors name the file or
// the id.
//
// Thread model: set once on the main thread before any verb runs.
#ifndef UBLK_QCOW2_TOOLS_IMAGE_KEY_H_
#define UBLK_QCOW2_TOOLS_IMAGE_KEY_H_

#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "qcow2/crypto/secret.h"
#include "qcow2/open_image.h"

namespace uq::tools {

// Declares --key-file, --object and --key-secret on a verb's subcommand.
void AddKeyFlags(CLI::App& app);

// Reads the file --key-file named and the --object secrets, if any, and
// picks the opening key. Errors: IoError naming a file ("cannot read key
// file"), InvalidArgument for an empty or oversized file, a malformed
// --object (QEMU's words), a duplicate id ("attempt to add duplicate
// property 'ID' to object (type 'container')"), --key-secret naming no
// secret ("No secret with id 'ID'"), --key-file with --key-secret.
Status LoadImageKey();

// The passphrase that opens encrypted images, or null.
std::shared_ptr<const qcow2::crypto::SecretBytes> ImageKey();

// The --object secret with id `id`. Errors: InvalidArgument "No secret with
// id 'ID'" (QEMU's words).
Result<std::shared_ptr<const qcow2::crypto::SecretBytes>> SecretById(const std::string& id);

// The passphrase of a new encrypted image: the secret -o
// encrypt.key-secret=ID names, else --key-file's key (our own spelling), else
// null (create then says QEMU's "Parameter 'encrypt.key-secret' is required
// for cipher").
Result<std::shared_ptr<const qcow2::crypto::SecretBytes>> NewImageKey(
    const std::string& key_secret);

// For verbs that start a new daemon for a running device (recover, upgrade): OK unless the
// device's image is encrypted and no key was given, then InvalidArgument "ublk device ID:
// IMAGE is encrypted: VERB needs its passphrase: give --key-file FILE, or --object ..."
// (kKeyFlagsHint). No daemon and no file under /run/ublk-qcow2 keeps the passphrase,
// so it must come again.
Status NeedKeyForDevice(int id, const std::string& image, bool encrypted, const char* verb);

// How the command line gives the passphrase of an encrypted image: every verb that opens
// images takes these flags, and each message asking for a key names them all.
inline constexpr std::string_view kKeyFlagsHint =
    "give --key-file FILE, or --object secret,id=ID,file=FILE (and --key-secret ID to pick one "
    "of several)";

// Gives `options` the key that opens existing images (ImageKey()) and the hint above.
void UseImageKey(qcow2::ImageOptions& options);

// The passphrase ImageKey() returns, for `add` and `recover` to hand to
// their daemon, which wipes it (SecretBytes::Clear) once the image is open.
std::shared_ptr<qcow2::crypto::SecretBytes> ImageKeyToWipe();

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_IMAGE_KEY_H_
