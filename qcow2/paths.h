// Path rules for files an image names: backing files and external data files.
#ifndef UBLK_QCOW2_QCOW2_PATHS_H_
#define UBLK_QCOW2_QCOW2_PATHS_H_

#include <string>

namespace uq::qcow2 {

// `name` as seen from the image at `image_path`: absolute names stay as they
// are; relative ones are taken relative to the image's directory (QEMU's rule
// for backing files). "dir/a.qcow2" + "b.qcow2" -> "dir/b.qcow2".
std::string ResolveRelativeTo(const std::string& image_path, const std::string& name);

// Where the external data file `name` (from the header or `create -o
// data_file=`) is: QEMU opens the name as it is, so a relative one is taken
// relative to the working directory of the process opening the image, not to
// the image's directory. `working_dir` stands in for the process's working
// directory when not empty (the device daemon runs in "/").
std::string DataFilePath(const std::string& name, const std::string& working_dir);

// A key that is equal for two paths naming the same file (realpath when the
// file exists on the host, else the lexically normalised path). Used to
// detect backing chain loops.
std::string FileIdentity(const std::string& path);

// True for names QEMU treats as protocol or JSON specifications
// ("json:{...}", "nbd://..."), which we do not open.
bool IsProtocolName(const std::string& name);

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_PATHS_H_
