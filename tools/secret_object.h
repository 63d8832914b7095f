// qemu-img's `--object secret,id=ID,data=STRING` and
// `--object secret,id=ID,file=FILE` (optionally format=raw|base64): a named
// passphrase that `-o encrypt.key-secret=ID` (create, convert) refers to, so
// that qemu-img command lines work unchanged.
//
// The value is the data string or the file's whole content, byte for byte
// (no newline stripped), as QEMU's secret object reads it; format=base64
// decodes it. Errors are QEMU's words where it has them ("Either 'file' or
// 'data' must be provided", "'file' and 'data' are mutually exclusive",
// "Parameter 'id' is missing", "Parameter 'X' is unexpected"); a file that
// cannot be read is named, the secret never is. QEMU's encrypted secrets
// (keyid=, iv=) are NotSupported.
//
// Thread model: pure functions.
#ifndef UBLK_QCOW2_TOOLS_SECRET_OBJECT_H_
#define UBLK_QCOW2_TOOLS_SECRET_OBJECT_H_

#include <string>
#include <string_view>

#include "base/status.h"
#include "qcow2/crypto/secret.h"

namespace uq::tools {

struct SecretObject {
  std::string id;
  qcow2::crypto::SecretBytes value;
};

// Parses one --object argument and reads its file. An object of another
// type is refused as QEMU's qemu-img refuses types it lacks: "Parameter
// 'qom-type' does not accept value 'foo'". REQUIRES: nothing; the argument
// may itself hold the secret (data=), so it is never quoted in errors.
Result<SecretObject> ParseSecretObject(std::string_view argument);

// A file's whole content as a secret (at most 1 MiB; empty is refused).
// Errors: IoError "FILE: cannot read <what>", InvalidArgument for an empty or
// oversized file, naming it.
Result<qcow2::crypto::SecretBytes> ReadSecretFile(const std::string& path, std::string_view what);

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_SECRET_OBJECT_H_
